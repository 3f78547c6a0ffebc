"""File descriptors, sans-I/O: what the caps need, and a shortage told from a failure."""

from __future__ import annotations

import errno

from tests.servers import make_settings
from voxrelay.service.descriptors import (
    BASE_DESCRIPTORS,
    descriptors_needed,
    out_of_descriptors,
    shortage_error,
)
from voxrelay.service.errors import UpstreamError, UpstreamTimeout
from voxrelay.service.resilience import _is_failure


def test_descriptors_needed_follow_the_caps() -> None:
    assert descriptors_needed(make_settings()) == 4096 + 256 * (2 + 2) + BASE_DESCRIPTORS
    small = make_settings(max_connections=100, max_streams=10, lookahead_segments=1)
    assert descriptors_needed(small) == 100 + 10 * 3 + BASE_DESCRIPTORS
    assert descriptors_needed(make_settings(max_connections=0)) is None
    assert descriptors_needed(make_settings(max_streams=0)) is None


def _raised_from(cause: BaseException, error: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise error from exc
    except BaseException as raised:
        return raised


def test_a_shortage_is_found_down_the_cause_chain() -> None:
    for code in (errno.EMFILE, errno.ENFILE):
        deep = _raised_from(OSError(code, "Too many open files"), ConnectionError("connect"))
        timeout = _raised_from(deep, UpstreamTimeout("chat upstream timed out"))
        assert out_of_descriptors(timeout)
        assert not _is_failure(timeout)
    refused = _raised_from(
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"), UpstreamError("x")
    )
    assert not out_of_descriptors(refused)
    assert _is_failure(refused)
    looped = UpstreamError("loop")
    looped.__context__ = looped
    assert not out_of_descriptors(looped)


def test_a_shortage_is_unavailable_and_retryable() -> None:
    error = shortage_error("chat")
    assert (error.code, error.retryable, error.retry_after_ms) == ("unavailable", True, 1000)
    assert not _is_failure(error)
