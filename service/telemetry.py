"""What a door records about each stream: metrics and the end-of-stream log line.

Both doors use the same :class:`StreamRecord`, so a gRPC stream and a WebSocket
stream are counted and logged alike. Label values are from closed sets only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import metrics
from .errors import VoxrelayError
from .model import AudioFormat, Mode, StreamFinished, SynthesisRequest

__all__ = ["StreamRecord"]

log = logging.getLogger("voxrelay.stream")

_FORMATS = frozenset(f.value for f in AudioFormat)


class StreamRecord:
    """Account for one stream from its request to its outcome."""

    def __init__(self, protocol: str, peer: str, request: SynthesisRequest, *,
                 log_text: bool = False) -> None:
        self.protocol = protocol
        self.peer = peer
        self.request = request
        self.log_text = log_text
        self.request_id = request.request_id
        self.mode = request.mode.value if isinstance(request.mode, Mode) else "chat"
        self.voice = request.voice
        self.format = request.format.value if request.format else ""
        self.started = time.monotonic()
        self.first_audio_at: float | None = None
        self.audio_bytes = 0
        self._ended = False
        metrics.ACTIVE_STREAMS.labels(protocol).inc()

    def started_stream(self, request_id: str, voice: str, fmt: AudioFormat) -> None:
        """Note the resolved id, voice and format once the stream is accepted."""
        self.request_id, self.voice, self.format = request_id, voice, fmt.value

    def audio(self, nbytes: int) -> None:
        """Note audio bytes handed to the client."""
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
            metrics.TIME_TO_FIRST_AUDIO.labels(self.protocol).observe(
                self.first_audio_at - self.started
            )
        self.audio_bytes += nbytes
        fmt = self.format if self.format in _FORMATS else "unknown"
        metrics.AUDIO_BYTES.labels(self.protocol, fmt).inc(nbytes)

    def end(self, outcome: str, finished: StreamFinished | None = None,
            error: VoxrelayError | None = None, audio_ms: int | None = None) -> None:
        """Count the outcome (``ok``, ``cancelled`` or an error code) and log the line."""
        if self._ended:
            return
        self._ended = True
        metrics.ACTIVE_STREAMS.labels(self.protocol).dec()
        metrics.REQUESTS.labels(self.protocol, self.mode, outcome).inc()
        if error is not None:
            metrics.ERRORS.labels(self.protocol, error.code).inc()
        now = time.monotonic()
        fields: dict[str, Any] = {
            "event": "stream_end",
            "request_id": self.request_id,
            "protocol": self.protocol,
            "peer": self.peer,
            "mode": self.mode,
            "voice": self.voice,
            "format": self.format,
            "outcome": outcome,
            "ttfa_ms": (
                round((self.first_audio_at - self.started) * 1000)
                if self.first_audio_at is not None else None
            ),
            "total_ms": round((now - self.started) * 1000),
            "audio_bytes": self.audio_bytes,
            "audio_ms": finished.audio_ms if finished else audio_ms,
            "llm_first_token_ms": finished.llm_first_token_ms if finished else None,
            "tts_first_byte_ms": finished.tts_first_byte_ms if finished else None,
            "prompt_tokens": finished.prompt_tokens if finished else None,
            "completion_tokens": finished.completion_tokens if finished else None,
        }
        if finished is not None:
            metrics.AUDIO_SECONDS.labels(self.protocol).inc(finished.audio_ms / 1000)
        if error is not None:
            fields["error"] = error.message
        if self.log_text:
            fields["text"] = self.request.text
            if finished is not None:
                fields["reply_text"] = finished.reply_text
        level = logging.WARNING if error is not None and error.code == "internal" else logging.INFO
        log.log(level, "stream %s", outcome, extra=fields)
