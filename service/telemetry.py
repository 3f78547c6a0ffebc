"""What a door records about each stream: metrics and the end-of-stream log line.

Both doors use the same :class:`StreamRecord`, so a gRPC stream and a WebSocket
stream are counted and logged alike::

    record = StreamRecord("grpc", peer, request, log_text=settings.log_text)
    ...                                  # record.started_stream(...), record.audio(n)
    record.end("ok", finished)           # or end("cancelled", figures) / end(code, error=error)

Label values are from closed sets only; values that came from the client (request id,
voice) are shortened before they are logged, and user text is logged only with
``log_text``. While a record is open, :data:`voxrelay.service.logs.REQUEST_ID` names its
stream, so warnings logged on its behalf (retries, breaker) carry its request id.
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextvars import Token
from typing import Any, Literal

from . import metrics
from .errors import VoxrelayError
from .logs import REQUEST_ID, shorten
from .model import AudioFormat, Mode, StreamFinished, SynthesisRequest

__all__ = ["StreamRecord", "WireProtocol"]

log = logging.getLogger("voxrelay.stream")

#: The door a stream came through.
WireProtocol = Literal["grpc", "ws", "http"]

# Limits on what a client can put into a log line.
MAX_LOGGED_ID = 128
MAX_LOGGED_VOICE = 64
MAX_LOGGED_ERROR = 300

#: Outcomes worth a warning: the upstream or voxrelay itself failed the caller.
_WARN = frozenset({"upstream_error", "upstream_timeout", "unavailable"})


class StreamRecord:
    """Account for one stream from its request to its outcome; log it once, at its end."""

    def __init__(
        self,
        protocol: WireProtocol,
        peer: str,
        request: SynthesisRequest | None,
        *,
        log_text: bool = False,
        request_id: str = "",
        mode: Mode | None = None,
    ) -> None:
        """Open the record of *request*; with None, of a request refused before it was read
        (*request_id* and *mode*, when known, name it)."""
        self.protocol: WireProtocol = protocol
        self.peer = peer
        self.request = request
        self.log_text = log_text
        if request is not None:
            request_id, mode = request.request_id, request.mode
        self.request_id = request_id
        self.mode = metrics.closed(mode.value if mode is not None else "", metrics.MODES, "chat")
        self.voice = request.voice if request is not None else ""
        self.format = request.format.value if request is not None and request.format else ""
        self.started = time.monotonic()
        self.first_audio_at: float | None = None
        self.audio_bytes = 0
        self._ended = False
        self._context: Token[str | None] | None = REQUEST_ID.set(self._logged_id)
        metrics.ACTIVE_STREAMS.labels(protocol).inc()

    @property
    def _logged_id(self) -> str | None:
        return shorten(self.request_id, MAX_LOGGED_ID) if self.request_id else None

    def started_stream(self, request_id: str, voice: str, fmt: AudioFormat) -> None:
        """Note the resolved id, voice and format once the stream is accepted."""
        self.request_id, self.voice, self.format = request_id, voice, fmt.value
        REQUEST_ID.set(self._logged_id)

    def audio(self, nbytes: int) -> None:
        """Note audio bytes handed to the client."""
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
            metrics.TIME_TO_FIRST_AUDIO.labels(self.protocol).observe(
                self.first_audio_at - self.started
            )
        self.audio_bytes += nbytes
        fmt = metrics.closed(self.format, metrics.FORMATS, "unknown")
        metrics.AUDIO_BYTES.labels(self.protocol, fmt).inc(nbytes)

    def end(
        self,
        outcome: str,
        finished: StreamFinished | None = None,
        error: VoxrelayError | None = None,
        audio_ms: int | None = None,
        reason: str | None = None,
        *,
        logged: bool = True,
        unlogged_before: int = 0,
    ) -> None:
        """Count the outcome (``ok``, ``cancelled`` or an error code) and log the line.

        *finished* holds the stream's figures (for a stream that did not finish, those
        known so far); *audio_ms*, when given, is the audio the client got, and wins.
        *reason* says more about a cancel (``deadline``, ``client``, ``disconnect``).
        With *logged* false the outcome is counted but not logged; *unlogged_before*
        says how many such lines this one stands for. Only the first call counts: a
        door may call it from more than one path.
        """
        if self._ended:
            return
        self._ended = True
        outcome = metrics.closed(outcome, metrics.OUTCOMES, "internal")
        metrics.ACTIVE_STREAMS.labels(self.protocol).dec()
        metrics.REQUESTS.labels(self.protocol, self.mode, outcome).inc()
        if error is not None:
            code = metrics.closed(error.code, metrics.ERROR_CODES, "internal")
            metrics.ERRORS.labels(self.protocol, code).inc()
        if audio_ms is None and finished is not None:
            audio_ms = finished.audio_ms
        if audio_ms:
            metrics.AUDIO_SECONDS.labels(self.protocol).inc(audio_ms / 1000)

        if not logged:
            self._leave_context()
            return
        fields = self._fields(outcome, finished, audio_ms)
        if unlogged_before:
            fields["unlogged_before"] = unlogged_before
        if reason is not None:
            fields["reason"] = reason
        if error is not None:
            fields["error"] = shorten(error.message, MAX_LOGGED_ERROR)
        if self.log_text and self.request is not None:
            fields["text"] = self.request.text
            if self.request.instructions:
                fields["instructions"] = self.request.instructions
            if finished is not None and finished.reply_text:
                fields["reply_text"] = finished.reply_text
        if outcome == "internal":
            level = logging.ERROR
        elif outcome in _WARN:
            level = logging.WARNING
        else:
            level = logging.INFO
        log.log(level, "stream %s", outcome, extra=fields)
        self._leave_context()

    def _fields(
        self, outcome: str, finished: StreamFinished | None, audio_ms: int | None
    ) -> dict[str, Any]:
        """The fields of the end-of-stream log line."""
        now = time.monotonic()
        fields: dict[str, Any] = {
            "event": "stream_end",
            "request_id": self._logged_id,
            "protocol": self.protocol,
            "peer": self.peer,
            "mode": self.mode,
            "voice": shorten(self.voice, MAX_LOGGED_VOICE) or None,
            "format": self.format or None,
            "outcome": outcome,
            "ttfa_ms": (
                round((self.first_audio_at - self.started) * 1000)
                if self.first_audio_at is not None
                else None
            ),
            "total_ms": round((now - self.started) * 1000),
            "audio_ms": audio_ms,
            "audio_bytes": self.audio_bytes,
            "segments": finished.segments if finished else None,
            "llm_first_token_ms": (
                _happened(finished.llm_first_token_ms, outcome)
                if finished and self.mode == "chat"
                else None
            ),
            "tts_first_byte_ms": (
                _happened(finished.tts_first_byte_ms, outcome) if finished else None
            ),
            "prompt_tokens": finished.prompt_tokens if finished else None,
            "completion_tokens": finished.completion_tokens if finished else None,
            "text_chars": len(self.request.text) if self.request is not None else 0,
        }
        return fields

    def _leave_context(self) -> None:
        token, self._context = self._context, None
        if token is None:
            return
        # Ended from another task than the one that opened it: that context is not ours.
        with contextlib.suppress(ValueError):
            REQUEST_ID.reset(token)


def _happened(ms: int, outcome: str) -> int | None:
    """A stream that did not finish reports 0 for a moment that never came: say None."""
    return ms if ms or outcome == "ok" else None
