"""The WebSocket protocol's frames, both ways (sans-I/O).

Server side: :func:`parse_frame` turns one client frame into a typed frame or raises
:class:`BadFrame` saying what is wrong; :func:`event_frame` and :func:`error_frame`
build the server's JSON frames. Client side (:mod:`voxrelay.client`): :func:`synthesize_frame` and
:func:`cancel_frame` build requests, :func:`parse_server_frame` reads the server's frames
back into core events and errors, :func:`close_error` reads a close code.
No sockets here: every piece is testable alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from websockets.frames import Close
from websockets.typing import Data

from voxrelay.service import model
from voxrelay.service.errors import Internal, InvalidRequest, VoxrelayError, error_for_code

from .errors import WS_CLOSE

__all__ = [
    "AppendFrame",
    "AuthFrame",
    "BadFrame",
    "CancelFrame",
    "Cancelled",
    "ClientFrame",
    "EndFrame",
    "ErrorFrame",
    "FlushFrame",
    "ResetFrame",
    "ServerFrame",
    "SynthesizeFrame",
    "append_frame",
    "cancel_frame",
    "close_error",
    "dumps",
    "end_frame",
    "error_frame",
    "event_frame",
    "flush_frame",
    "handshake_error",
    "parse_frame",
    "parse_server_frame",
    "synthesize_frame",
]

# Limits
MAX_ID_CHARS = 128
MAX_SAMPLE_RATE_HZ = 384_000

_MODES = {m.value: m for m in model.Mode}
_FORMATS = {f.value: f for f in model.AudioFormat}
_NORMALIZATION = {"on": True, "off": False}


# Client frames


@dataclass(frozen=True, slots=True)
class SynthesizeFrame:
    """``synthesize``: a request; ``id`` is empty when the client sent none."""

    id: str
    request: model.SynthesisRequest
    stream: bool = True
    #: ``"input":"stream"``: the text comes in ``append`` frames (``request.text`` is
    #: the first piece, possibly empty) until ``end``.
    streamed_input: bool = False


@dataclass(frozen=True, slots=True)
class AppendFrame:
    """``append``: the next piece of streamed input *id*."""

    id: str | None
    text: str


@dataclass(frozen=True, slots=True)
class FlushFrame:
    """``flush``: speak what streamed input *id* has buffered, now."""

    id: str | None


@dataclass(frozen=True, slots=True)
class EndFrame:
    """``end``: streamed input *id* has no more text."""

    id: str | None


@dataclass(frozen=True, slots=True)
class CancelFrame:
    """``cancel``: stop the stream in flight (``id`` ``None`` means whichever it is).

    ``played_ms``, the client's playback position in the stream's audio, asks for the
    text that was heard.
    """

    id: str | None = None
    played_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ResetFrame:
    """``reset``: forget this connection's conversation."""


@dataclass(frozen=True, slots=True)
class AuthFrame:
    """``auth``: an API key, for browsers that cannot set headers."""

    token: str


ClientFrame = (
    SynthesizeFrame | CancelFrame | ResetFrame | AuthFrame | AppendFrame | FlushFrame | EndFrame
)
InputFrame = AppendFrame | FlushFrame | EndFrame


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
        played = data.get("played_ms")
        if played is not None and (
            not isinstance(played, int) or isinstance(played, bool) or played < 0
        ):
            raise BadFrame("played_ms must be a whole number of milliseconds", request_id)
        return CancelFrame(request_id, played)
    if kind == "reset":
        return ResetFrame()
    if kind == "append":
        text = data.get("text")
        if not isinstance(text, str):
            raise BadFrame('append needs "text": the next piece of the text', request_id)
        return AppendFrame(request_id, text)
    if kind == "flush":
        return FlushFrame(request_id)
    if kind == "end":
        return EndFrame(request_id)
    if kind == "auth":
        token = data.get("token")
        if not isinstance(token, str):
            raise BadFrame('auth needs a "token" string', request_id)
        return AuthFrame(token)
    shown = json.dumps(kind)[:40]
    raise BadFrame(
        f"unknown frame type {shown}: use synthesize, append, flush, end, cancel, reset or auth",
        request_id,
    )


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

    input_name = optional("input", (str,), '"text" or "stream"')
    if input_name is not None and input_name not in ("text", "stream"):
        raise bad('input must be "text" (the default) or "stream"')
    streamed = input_name == "stream"
    text = data.get("text")
    if streamed and text is None:
        text = ""
    if not isinstance(text, str):
        raise bad('synthesize needs "text": the words to answer or speak')
    mode_name = optional("mode", (str,), '"chat" or "speak"')
    default_mode = model.Mode.SPEAK if streamed else model.Mode.CHAT
    mode = _MODES.get(mode_name.lower()) if mode_name is not None else default_mode
    if mode is None:
        raise bad('mode must be "chat" or "speak"')
    if streamed and mode is not model.Mode.SPEAK:
        raise bad('"input":"stream" is spoken as written: it takes "mode":"speak", not chat')
    if streamed and "history" in data:
        raise bad('"input":"stream" takes no history: it is spoken as written')
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
    normalization = optional("normalization", (str,), '"on" or "off"')
    if normalization is not None and normalization not in _NORMALIZATION:
        raise bad('normalization must be "on" or "off"')
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
            word_timestamps=bool(optional("word_timestamps", (bool,), "true or false")),
            normalization=None if normalization is None else _NORMALIZATION[normalization],
        ),
        stream=True if stream is None else stream,
        streamed_input=streamed,
    )


# Server frames


def event_frame(
    request_id: str,
    event: model.StreamStarted | model.SegmentStarted | model.WordTimings | model.StreamFinished,
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
            segment = {
                "type": "segment",
                "id": request_id,
                "index": event.index,
                "text": event.text,
                "start_ms": event.start_ms,
            }
            if event.spoken:
                segment["spoken"] = event.spoken
            return segment
        case model.WordTimings():
            return {
                "type": "words",
                "id": request_id,
                "segment_index": event.segment_index,
                "estimated": event.estimated,
                "words": [dataclasses.asdict(word) for word in event.words],
            }
        case model.StreamFinished():
            return {"type": "finished", "id": request_id, **dataclasses.asdict(event)}
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


# Client side: requests out, server frames in


def synthesize_frame(
    request: model.SynthesisRequest, *, request_id: str, streamed_input: bool = False
) -> dict[str, Any]:
    """Build the ``synthesize`` frame for a core request (what :func:`parse_frame` reads).

    Defaults (empty strings, zeros) are left out, as the server fills them in. With
    *streamed_input*, the text follows in ``append`` frames.
    """
    if request.history:
        raise InvalidRequest(
            "history cannot be sent over WebSocket, where the connection remembers its own"
            " turns: send it over gRPC"
        )
    frame: dict[str, Any] = {
        "type": "synthesize",
        "id": request_id,
        "text": request.text,
        "mode": request.mode.value,
    }
    optional: dict[str, Any] = {
        "voice": request.voice,
        "format": request.format.value if request.format is not None else "",
        "sample_rate_hz": request.sample_rate_hz,
        "instructions": request.instructions,
        "speed": request.speed,
    }
    frame.update((name, value) for name, value in optional.items() if value)
    if streamed_input:
        frame["input"] = "stream"
    return frame


def append_frame(request_id: str, text: str) -> dict[str, Any]:
    """Build the ``append`` frame that adds *text* to streamed input *request_id*."""
    return {"type": "append", "id": request_id, "text": text}


def flush_frame(request_id: str) -> dict[str, Any]:
    """Build the ``flush`` frame of streamed input *request_id*."""
    return {"type": "flush", "id": request_id}


def end_frame(request_id: str) -> dict[str, Any]:
    """Build the ``end`` frame of streamed input *request_id*."""
    return {"type": "end", "id": request_id}


def cancel_frame(request_id: str, played_ms: int | None = None) -> dict[str, Any]:
    """Build the ``cancel`` frame that stops stream *request_id* (at *played_ms*, if known)."""
    frame: dict[str, Any] = {"type": "cancel", "id": request_id}
    if played_ms is not None:
        frame["played_ms"] = played_ms
    return frame


@dataclass(frozen=True, slots=True)
class Cancelled:
    """``cancelled``: the stream stopped as asked; not one more byte of it follows.

    ``heard_text`` is there when the cancel gave the playback position.
    """

    id: str | None
    audio_ms: int
    heard_text: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """``error``: the request *id* (``None``: a frame the server could not read) failed."""

    id: str | None
    error: VoxrelayError


ServerFrame = (
    model.StreamStarted
    | model.SegmentStarted
    | model.WordTimings
    | model.StreamFinished
    | Cancelled
    | ErrorFrame
)

#: The figures of ``finished``, read off the core's event (one source with :func:`event_frame`).
_FINISHED_FIELDS = tuple(f.name for f in dataclasses.fields(model.StreamFinished))


def parse_server_frame(message: str) -> ServerFrame | None:
    """Read one JSON frame of the server (audio comes in binary frames, not here).

    Return ``None`` for a frame type this version does not know (a newer server's, which
    a client skips); raise :class:`~voxrelay.service.errors.Internal` for one it cannot read.
    """
    try:
        frame = json.loads(message)
        kind = frame["type"]
        if kind == "started":
            return model.StreamStarted(
                request_id=str(frame["id"]),
                format=model.AudioFormat(frame["format"]),
                content_type=frame["content_type"],
                sample_rate_hz=int(frame["sample_rate_hz"]),
                channels=int(frame["channels"]),
                voice=frame["voice"],
                llm_model=frame["llm_model"],
                tts_model=frame["tts_model"],
            )
        if kind == "segment":
            return model.SegmentStarted(
                int(frame["index"]),
                frame["text"],
                int(frame.get("start_ms", 0)),
                str(frame.get("spoken", "")),
            )
        if kind == "words":
            return model.WordTimings(
                int(frame["segment_index"]),
                tuple(
                    model.WordTiming(
                        str(w["text"]), int(w["start_ms"]), int(w["end_ms"]), int(w["text_offset"])
                    )
                    for w in frame["words"]
                ),
                bool(frame["estimated"]),
            )
        if kind == "finished":
            return model.StreamFinished(
                **{name: frame[name] for name in _FINISHED_FIELDS if name in frame}
            )
        if kind == "cancelled":
            heard = frame.get("heard_text")
            return Cancelled(
                frame.get("id"),
                int(frame.get("audio_ms") or 0),
                heard if isinstance(heard, str) else None,
            )
        if kind == "error":
            retry_ms = frame.get("retry_after_ms")
            error = error_for_code(
                str(frame["code"]),
                str(frame.get("message", "")),
                retry_after_s=retry_ms / 1000 if isinstance(retry_ms, int | float) else None,
                retryable=frame.get("retryable")
                if isinstance(frame.get("retryable"), bool)
                else None,
            )
            return ErrorFrame(frame.get("id"), error)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise Internal(f"the server sent a frame this client cannot read: {exc!r}") from None
    return None


#: A close code that ends a stream early → the error code it stands for, and its meaning.
_CLOSE_ERRORS: dict[int, tuple[str, str]] = {
    WS_CLOSE["going_away"]: ("unavailable", "the server is shutting down: retry in a moment"),
    WS_CLOSE["policy"]: ("forbidden", "refused by policy"),
    WS_CLOSE["too_big"]: ("too_large", "a frame was too large"),
    WS_CLOSE["internal"]: ("internal", "internal server error"),
    WS_CLOSE["try_again_later"]: ("busy", "the server is over capacity: retry in a moment"),
}


def close_error(close: Close | None, *, token_sent: bool) -> VoxrelayError | None:
    """Explain a close the server sent before the stream finished.

    Return ``None`` when the close names no failure (none was received, or a plain
    1000): the connection was simply lost.
    """
    if close is None:
        return None
    if close.code == WS_CLOSE["policy"] and "authentication" in close.reason:
        # Keeps the close's own words ("1008 (policy violation) authentication …").
        hint = "check the API key" if token_sent else "this server requires an API key"
        return error_for_code("unauthorized", f"{hint} (the server closed with {close})")
    known = _CLOSE_ERRORS.get(close.code)
    if known is None:
        return None
    code, meaning = known
    return error_for_code(code, f"the server closed the connection with {close} ({meaning})")


#: HTTP statuses the handshake can be refused with → the error code and what it means.
_HANDSHAKE_REFUSALS: dict[int, tuple[str, str]] = {
    401: ("unauthorized", "the server refused the API key (HTTP 401)"),
    403: ("forbidden", "the server refused this client's Origin (HTTP 403)"),
    404: ("invalid_request", "no WebSocket endpoint at this URL (HTTP 404)"),
    503: ("busy", "the server has too many connections (HTTP 503): retry in a moment"),
}


def handshake_error(status: int) -> VoxrelayError | None:
    """Explain a handshake refused with HTTP *status* (``None``: not one voxrelay sends)."""
    known = _HANDSHAKE_REFUSALS.get(status)
    return error_for_code(*known) if known is not None else None
