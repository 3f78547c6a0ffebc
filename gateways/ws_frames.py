"""The WebSocket door's frames: client JSON in, server JSON out (sans-I/O).

:func:`parse_frame` turns one client frame into a typed frame or raises
:class:`BadFrame` saying what is wrong; :func:`event_frame` and :func:`error_frame`
build the server's JSON frames; :class:`AudioClock` works out the ``audio_ms`` of a
``cancelled`` frame. No sockets here: every piece is testable alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from websockets.typing import Data

from voxrelay.service import model
from voxrelay.service.errors import InvalidRequest, VoxrelayError

__all__ = [
    "AudioClock",
    "AuthFrame",
    "BadFrame",
    "CancelFrame",
    "ClientFrame",
    "ResetFrame",
    "SynthesizeFrame",
    "dumps",
    "error_frame",
    "event_frame",
    "parse_frame",
]

# Limits
MAX_ID_CHARS = 128
MAX_SAMPLE_RATE_HZ = 384_000

_MODES = {m.value: m for m in model.Mode}
_FORMATS = {f.value: f for f in model.AudioFormat}


# Client frames


@dataclass(frozen=True, slots=True)
class SynthesizeFrame:
    """``synthesize``: a request; ``id`` is empty when the client sent none."""

    id: str
    request: model.SynthesisRequest
    stream: bool = True


@dataclass(frozen=True, slots=True)
class CancelFrame:
    """``cancel``: stop the stream in flight (``id`` ``None`` means whichever it is)."""

    id: str | None = None


@dataclass(frozen=True, slots=True)
class ResetFrame:
    """``reset``: forget this connection's conversation."""


@dataclass(frozen=True, slots=True)
class AuthFrame:
    """``auth``: an API key, for browsers that cannot set headers."""

    token: str


ClientFrame = SynthesizeFrame | CancelFrame | ResetFrame | AuthFrame


class BadFrame(InvalidRequest):
    """A client frame that cannot be served as written.

    ``request_id`` is the frame's id when it could be read; ``is_request`` says the
    frame was a ``synthesize`` (so it counts as a refused request).
    """

    def __init__(
        self, message: str, request_id: str | None = None, *, is_request: bool = False
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.is_request = is_request


def parse_frame(message: Data) -> ClientFrame:
    """Decode one client frame, or raise :class:`BadFrame` saying what is wrong."""
    if not isinstance(message, str):
        raise BadFrame("binary frames are not accepted: send JSON text frames")
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):
        raise BadFrame("frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadFrame('frame must be a JSON object with a "type"')
    frame_id = data.get("id")
    if frame_id is not None and (
        not isinstance(frame_id, str) or len(frame_id) > MAX_ID_CHARS or _unencodable(frame_id)
    ):
        raise BadFrame(f"id must be a string of at most {MAX_ID_CHARS} valid Unicode characters")
    request_id = frame_id or None
    kind = data.get("type")
    for name, value in data.items():
        if _unencodable(name) or _unencodable(value):
            shown = json.dumps(name)[:40] if not _unencodable(name) else "a field name"
            raise BadFrame(
                f"{shown} is not valid Unicode: it holds a lone surrogate (such as \\ud800)",
                request_id,
                is_request=kind == "synthesize",
            )
    if kind == "synthesize":
        return _synthesize_frame(data, request_id or "")
    if kind == "cancel":
        return CancelFrame(request_id)
    if kind == "reset":
        return ResetFrame()
    if kind == "auth":
        token = data.get("token")
        if not isinstance(token, str):
            raise BadFrame('auth needs a "token" string', request_id)
        return AuthFrame(token)
    shown = json.dumps(kind)[:40]
    raise BadFrame(f"unknown frame type {shown}: use synthesize, cancel, reset or auth", request_id)


def _unencodable(value: Any) -> bool:
    """Say whether *value* holds a string with a lone surrogate, which no UTF-8 can carry.

    JSON may escape one (``"\\ud800"``); passed on, it fails every later encode: the
    frames echoing it, the log lines naming it, the engine given it. The walk is a loop,
    not a recursion: a frame may nest as deep as the JSON parser allows.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _synthesize_frame(data: Mapping[str, Any], request_id: str) -> SynthesizeFrame:
    def bad(message: str) -> BadFrame:
        return BadFrame(message, request_id or None, is_request=True)

    def optional(name: str, kinds: tuple[type, ...], what: str) -> Any:
        value = data.get(name)
        if value is None:
            return None
        # bool is an int in Python, but true is not a number on the wire.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise bad(f"{name} must be {what}")
        return value

    text = data.get("text")
    if not isinstance(text, str):
        raise bad('synthesize needs "text": the words to answer or speak')
    mode_name = optional("mode", (str,), '"chat" or "speak"')
    mode = _MODES.get(mode_name.lower()) if mode_name is not None else model.Mode.CHAT
    if mode is None:
        raise bad('mode must be "chat" or "speak"')
    format_name = optional("format", (str,), "a format name")
    fmt = _FORMATS.get(format_name.lower()) if format_name is not None else None
    if format_name is not None and fmt is None:
        raise bad(f"format must be one of {', '.join(_FORMATS)}")
    rate = optional("sample_rate_hz", (int,), "a whole number of Hz") or 0
    if not 0 <= rate <= MAX_SAMPLE_RATE_HZ:
        raise bad("sample_rate_hz must be 0 (the default) or a rate in Hz")
    speed = optional("speed", (int, float), "a number (1.0 is normal speed)") or 0.0
    try:
        speed = float(speed)
    except OverflowError:  # an int too big for a float
        raise bad("speed must be a number (1.0 is normal speed)") from None
    stream = optional("stream", (bool,), "true or false")
    return SynthesizeFrame(
        id=request_id,
        request=model.SynthesisRequest(
            text=text,
            mode=mode,
            voice=optional("voice", (str,), "a string") or "",
            format=fmt,
            sample_rate_hz=rate,
            instructions=optional("instructions", (str,), "a string") or "",
            speed=speed,
            request_id=request_id,
        ),
        stream=True if stream is None else stream,
    )


# Server frames


def event_frame(
    request_id: str, event: model.StreamStarted | model.SegmentStarted | model.StreamFinished
) -> dict[str, Any]:
    """Translate one core event (not audio) into its JSON frame."""
    match event:
        case model.StreamStarted():
            return {
                "type": "started",
                "id": request_id,
                "format": event.format.value,
                "content_type": event.content_type,
                "sample_rate_hz": event.sample_rate_hz,
                "channels": event.channels,
                "voice": event.voice,
                "llm_model": event.llm_model,
                "tts_model": event.tts_model,
            }
        case model.SegmentStarted():
            return {
                "type": "segment",
                "id": request_id,
                "index": event.index,
                "text": event.text,
                "start_ms": event.start_ms,
            }
        case model.StreamFinished():
            figures = {
                f.name: getattr(event, f.name)
                for f in dataclasses.fields(event)
                if f.name != "extra"
            }
            return {"type": "finished", "id": request_id, **figures}
    raise TypeError(f"unknown event {event!r}")


def error_frame(request_id: str | None, error: VoxrelayError) -> dict[str, Any]:
    """Build the ``error`` frame for *error*."""
    return {
        "type": "error",
        "id": request_id,
        "code": error.code,
        "message": error.message,
        "retryable": error.retryable,
        "retry_after_ms": error.retry_after_ms,
    }


def dumps(frame: Mapping[str, Any]) -> str:
    """Serialise a server frame compactly (non-ASCII text stays as it is)."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


# Figures of a stream in flight

#: Bytes per sample of the formats whose size says their duration.
_SAMPLE_WIDTH = {
    model.AudioFormat.PCM: 2,
    model.AudioFormat.WAV: 2,
    model.AudioFormat.MULAW: 1,
    model.AudioFormat.ALAW: 1,
}


class AudioClock:
    """Estimate how much audio a client has been sent, for ``cancelled``.

    Formats with a fixed sample size are counted exactly; for compressed ones the
    current segment's ``start_ms`` is exact and its bytes so far are scaled by the
    bytes-per-millisecond of the segments before it.
    """

    def __init__(self) -> None:
        self.format: model.AudioFormat | None = None
        self.rate = 0
        self.segment_start_ms = 0
        self.segment_bytes = 0
        self.earlier_bytes = 0

    def started(self, event: model.StreamStarted) -> None:
        self.format, self.rate = event.format, event.sample_rate_hz

    def segment(self, event: model.SegmentStarted) -> None:
        self.earlier_bytes += self.segment_bytes
        self.segment_bytes = 0
        self.segment_start_ms = event.start_ms

    def audio(self, nbytes: int) -> None:
        self.segment_bytes += nbytes

    @property
    def audio_ms(self) -> int:
        sent = self.earlier_bytes + self.segment_bytes
        if not sent:
            return 0
        width = _SAMPLE_WIDTH.get(self.format) if self.format is not None else None
        if width and self.rate:
            return sent // width * 1000 // self.rate
        if self.earlier_bytes and self.segment_start_ms:
            return self.segment_start_ms + (
                self.segment_bytes * self.segment_start_ms // self.earlier_bytes
            )
        return self.segment_start_ms
