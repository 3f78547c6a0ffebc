"""The errors a caller of voxrelay can see.

Every failure that reaches a door is a :class:`VoxrelayError` carrying one code of
SPEC's WebSocket vocabulary; each door maps the code to its own wire form in one table.
"""

from __future__ import annotations

import math

__all__ = [
    "ERROR_CODES",
    "ERROR_TYPES",
    "MAX_WAIT_S",
    "Busy",
    "Forbidden",
    "Internal",
    "InvalidRequest",
    "RateLimited",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "UpstreamError",
    "UpstreamTimeout",
    "VoxrelayError",
    "clamp_wait",
    "error_for_code",
]

#: The longest wait voxrelay ever advises (``retry_after_ms``, ``RetryInfo``, ``Retry-After``).
MAX_WAIT_S = 3600.0


def clamp_wait(seconds: float | None) -> float | None:
    """Return *seconds* within [0, :data:`MAX_WAIT_S`]; None for no advice (or NaN).

    A wait can come from an upstream's ``Retry-After``: whatever it says, what voxrelay
    passes on fits a protobuf ``Duration``, a JSON number and an ``asyncio.sleep``.
    """
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_WAIT_S)


class VoxrelayError(Exception):
    """A failure with a stable code, a message for humans and retry advice."""

    code: str = "internal"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = clamp_wait(retry_after_s)
        if retryable is not None:
            self.retryable = retryable

    @property
    def retry_after_ms(self) -> int | None:
        """The suggested wait in whole milliseconds, if any."""
        if self.retry_after_s is None:
            return None
        return max(0, round(self.retry_after_s * 1000))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(VoxrelayError):
    """The request cannot be served as written; the message says what to fix."""

    code = "invalid_request"


class TooLarge(VoxrelayError):
    """The input is over a size limit; it is refused, never truncated."""

    code = "too_large"


class Unauthorized(VoxrelayError):
    """No valid credentials were presented."""

    code = "unauthorized"


class Forbidden(VoxrelayError):
    """The credentials are valid but not allowed to do this."""

    code = "forbidden"


class RateLimited(VoxrelayError):
    """voxrelay's own limit on this caller was reached."""

    code = "rate_limited"
    retryable = True


class Busy(VoxrelayError):
    """voxrelay is at capacity (or this connection already has a stream in flight)."""

    code = "busy"
    retryable = True


class UpstreamError(VoxrelayError):
    """An upstream (LLM or TTS) failed, replied malformed data, or kept refusing.

    ``retryable`` says whether trying again may help (429, 5xx, a reset); the core
    retries those before a segment's first audio byte. ``status`` is the upstream's
    HTTP status when it answered with one.
    """

    code = "upstream_error"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        retryable: bool | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s, retryable=retryable)
        self.status = status


class UpstreamTimeout(VoxrelayError):
    """An upstream stage used up its time budget."""

    code = "upstream_timeout"
    retryable = True


class Unavailable(VoxrelayError):
    """voxrelay or an upstream cannot take work now (draining, breaker open)."""

    code = "unavailable"
    retryable = True


class Internal(VoxrelayError):
    """A bug: something voxrelay did not expect."""

    code = "internal"


#: Every kind of error a caller can see, in SPEC's order; their codes are the vocabulary
#: of the WebSocket ``error`` frame and of the metrics on every door.
ERROR_TYPES: tuple[type[VoxrelayError], ...] = (
    InvalidRequest,
    Unauthorized,
    Forbidden,
    RateLimited,
    Busy,
    TooLarge,
    UpstreamError,
    UpstreamTimeout,
    Unavailable,
    Internal,
)
ERROR_CODES: tuple[str, ...] = tuple(kind.code for kind in ERROR_TYPES)

_BY_CODE: dict[str, type[VoxrelayError]] = {kind.code: kind for kind in ERROR_TYPES}


def error_for_code(
    code: str,
    message: str,
    *,
    retry_after_s: float | None = None,
    retryable: bool | None = None,
) -> VoxrelayError:
    """Rebuild the error a wire code names, as a client does with what a door sent.

    A code this version does not know still becomes a :class:`VoxrelayError`
    that carries it, so a newer server's refusals stay readable.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        error = VoxrelayError(message, retry_after_s=retry_after_s, retryable=retryable)
        error.code = code
        return error
    return cls(message, retry_after_s=retry_after_s, retryable=retryable)
