"""What every provider that talks to an OpenAI-compatible upstream shares.

One :class:`openai.AsyncOpenAI` client per provider, with the SDK's own retries off: the
core retries, backs off and trips the breaker, so there is exactly one retry mechanism.
Its HTTP transport is the SDK's aiohttp one (``openai[aiohttp]``): aiohttp parses responses
in C and hands over all the body that has arrived in one read (docs/performance.md).

Failures of a call become :mod:`voxrelay.service.errors` in one place
(:func:`upstream_errors`); what an upstream says about a failure is logged, redacted, and
never passed on to callers (:func:`upstream_said`).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import aiohttp
import anyio
import httpx2
import openai

from ..descriptors import out_of_descriptors, shortage_error
from ..errors import UpstreamError, UpstreamTimeout, VoxrelayError, clamp_wait
from ..logs import redact, register_secrets

__all__ = [
    "build_client",
    "call_timeout",
    "retry_after",
    "status_error",
    "upstream_errors",
    "upstream_said",
]

log = logging.getLogger(__name__)

# Transport failures the SDK lets through unwrapped (mid-body reads: those the aiohttp
# transport maps to httpx errors and those it does not, TLS, anyio streams).
_TRANSPORT_ERRORS = (
    httpx2.RequestError,
    aiohttp.ClientError,
    ssl.SSLError,
    anyio.EndOfStream,
    ConnectionError,
)


def build_client(
    *, api_key: str, base_url: str | None, connect_timeout: float, max_connections: int
) -> openai.AsyncOpenAI:
    """Return an SDK client on aiohttp, its own retries off, its pool sized for our streams.

    Its key is registered as a secret: no log line can carry it, whatever an upstream echoes.
    """
    register_secrets([api_key])
    return openai.AsyncOpenAI(
        api_key=api_key,
        # The settings already resolved OPENAI_BASE_URL; do not let the SDK read it again.
        base_url=base_url or "https://api.openai.com/v1",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(
            # Limits
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # Timeouts: per call, ``stream`` and ``synthesize`` replace these.
            timeout=openai.Timeout(600.0, connect=connect_timeout),
        ),
    )


def call_timeout(timeout: float, connect_timeout: float) -> openai.Timeout:
    """Return the SDK timeout of one call: *timeout* for every network wait."""
    return openai.Timeout(timeout, connect=min(timeout, connect_timeout))


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Return the wait the upstream asked for (``retry-after-ms`` first), in seconds.

    The wait is clamped to [0, :data:`~service.errors.MAX_WAIT_S`]: a negative one means
    now, an enormous one (``1e306``, ``inf``) the longest voxrelay advises; NaN is none.
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = clamp_wait(float(value) * scale)
        except ValueError:
            continue  # an HTTP date: rare from LLM APIs; the core's backoff applies
        if seconds is not None:
            return seconds
    return None


def upstream_said(stage: str, answer: str, detail: str) -> None:
    """Log what an upstream said about a failure; its caller is told only *answer*.

    An upstream's error text can name the operator's account, organisation, quota or
    billing: the operator's business, not a caller's. *detail* must be redacted already.
    """
    if detail:
        log.warning(
            "%s upstream answered %s",
            stage,
            answer,
            extra={
                "event": "upstream_error",
                "upstream": stage,
                "answer": answer,
                "detail": detail,
            },
        )


def status_error(stage: str, status: int, detail: str, headers: Mapping[str, str]) -> UpstreamError:
    """Return the error for an upstream's HTTP *status*: retryable for 429, 5xx, 408, 409.

    The error names the stage and the status; *detail* (the redacted body) is logged.
    """
    upstream_said(stage, str(status), detail)
    if status == 429 or status >= 500 or status in (408, 409):
        return UpstreamError(
            f"{stage} upstream is unavailable: {status}",
            retryable=True,
            status=status,
            retry_after_s=retry_after(headers),
        )
    return UpstreamError(
        f"{stage} upstream rejected the request: {status}", retryable=False, status=status
    )


def _status_error(stage: str, exc: openai.APIStatusError, api_key: str) -> UpstreamError:
    detail = exc.code if isinstance(exc.code, str) else ""
    # OpenAI nests {"error": {...}} (the SDK unwraps it); others send a flat object or text.
    message = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
    if isinstance(message, str) and message.strip():
        detail += f": {' '.join(message.split())[:300]}"
    return status_error(stage, exc.status_code, redact(detail), exc.response.headers)


@contextmanager
def upstream_errors(stage: str, api_key: str) -> Iterator[None]:
    """Translate SDK and transport failures of one call into :mod:`voxrelay.service.errors`.

    *stage* names the upstream in messages ("chat", "speech"); *api_key* is scrubbed
    from anything the upstream echoed back. A call that found no file descriptor free
    (the SDK reports it as a connect timeout or error) is :class:`Unavailable`: our
    shortage, not the upstream's failure.
    """
    try:
        with _sdk_errors(stage, api_key):
            yield
    except VoxrelayError as exc:
        if out_of_descriptors(exc):
            raise shortage_error(stage) from exc
        raise


@contextmanager
def _sdk_errors(stage: str, api_key: str) -> Iterator[None]:
    try:
        yield
    except openai.APITimeoutError as exc:
        raise UpstreamTimeout(f"{stage} upstream timed out") from exc
    except openai.APIStatusError as exc:
        raise _status_error(stage, exc, api_key) from exc
    except openai.APIConnectionError as exc:
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
        raise UpstreamError(f"{stage} upstream connection failed ({cause})") from exc
    except httpx2.TimeoutException as exc:
        raise UpstreamTimeout(f"{stage} upstream timed out") from exc
    except _TRANSPORT_ERRORS as exc:
        raise UpstreamError(f"{stage} upstream connection failed ({type(exc).__name__})") from exc
    except openai.APIResponseValidationError as exc:
        raise UpstreamError(f"{stage} upstream sent a malformed reply", retryable=False) from exc
    except openai.APIError as exc:
        # An error event inside a 200 stream: the upstream failed after it began to answer.
        upstream_said(stage, "an error mid-stream", redact(exc.message[:300]))
        raise UpstreamError(f"{stage} upstream failed mid-stream") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpstreamError(f"{stage} upstream sent a malformed reply", retryable=False) from exc
