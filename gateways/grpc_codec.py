"""Translate between ``voxrelay.v1`` protobuf messages and the core's types, both ways (sans-I/O).

The server door reads requests and writes events (:func:`to_request`, :func:`to_response`,
:func:`to_status`); :mod:`voxrelay.client` does the opposite (:func:`request_message`,
:func:`response_event`, :func:`status_error`). A failure travels as a ``google.rpc.Status``:
its code from :data:`~voxrelay.gateways.errors.GRPC_STATUS`, an ``ErrorInfo`` whose reason is
the core's own code (several share a status code) and a ``RetryInfo`` where a wait helps.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from voxrelay.service import model
from voxrelay.service.errors import Internal, InvalidRequest, VoxrelayError, error_for_code
from voxrelay.service.text_input import TextInput
from voxrelay.v1 import synthesis_pb2 as pb

from .errors import GRPC_STATUS

__all__ = [
    "ERROR_DOMAIN",
    "FORMATS",
    "FORMAT_ENUM",
    "MODES",
    "MODE_ENUM",
    "NORMALIZATION",
    "NORMALIZATION_ENUM",
    "request_message",
    "response_event",
    "status_error",
    "stream_config",
    "stream_config_message",
    "to_request",
    "to_response",
    "to_status",
]

FORMATS: dict[int, model.AudioFormat | None] = {
    pb.AUDIO_FORMAT_UNSPECIFIED: None,
    **{getattr(pb, f"AUDIO_FORMAT_{fmt.name}"): fmt for fmt in model.AudioFormat},
}
FORMAT_ENUM = {fmt: num for num, fmt in FORMATS.items() if fmt is not None}
MODES = {
    pb.MODE_UNSPECIFIED: model.Mode.CHAT,
    **{getattr(pb, f"MODE_{mode.name}"): mode for mode in model.Mode},
}
MODE_ENUM = {mode: num for num, mode in MODES.items() if num != pb.MODE_UNSPECIFIED}
#: ``TextNormalization`` → on, off, or None for the server's default.
NORMALIZATION: dict[int, bool | None] = {
    pb.TEXT_NORMALIZATION_UNSPECIFIED: None,
    pb.TEXT_NORMALIZATION_OFF: False,
    pb.TEXT_NORMALIZATION_ON: True,
}
NORMALIZATION_ENUM = {value: num for num, value in NORMALIZATION.items()}

#: ``ErrorInfo.domain`` of voxrelay's own errors; the reason is the core's code, upper case.
ERROR_DOMAIN = "voxrelay"

#: The figures ``StreamFinished`` carries on the wire, read off the message itself.
_FINISHED_FIELDS = tuple(f.name for f in pb.StreamFinished.DESCRIPTOR.fields)
#: ``StreamStarted``'s fields that need no translation (all but the format enum).
_STARTED_FIELDS = tuple(f.name for f in pb.StreamStarted.DESCRIPTOR.fields if f.name != "format")

#: gRPC status → the core code a status means when a server did not name one (the first
#: code of GRPC_STATUS with that status: ``RESOURCE_EXHAUSTED`` reads as ``rate_limited``).
_CODE_OF_STATUS: dict[grpc.StatusCode, str] = {}
for _code, _status in GRPC_STATUS.items():
    _CODE_OF_STATUS.setdefault(_status, _code)


# Server side: requests in, events and errors out


def to_request(msg: pb.SynthesizeRequest, request_id: str) -> model.SynthesisRequest:
    """Translate a ``SynthesizeRequest``, refusing enum values this server does not know."""
    if msg.mode not in MODES:
        raise InvalidRequest(f"mode {msg.mode} is not a known Mode (use MODE_CHAT or MODE_SPEAK)")
    if msg.format not in FORMATS:
        raise InvalidRequest(f"format {msg.format} is not a known AudioFormat")
    if msg.normalization not in NORMALIZATION:
        raise InvalidRequest(f"normalization {msg.normalization} is not a known TextNormalization")
    return model.SynthesisRequest(
        text=msg.text,
        mode=MODES[msg.mode],
        voice=msg.voice,
        format=FORMATS[msg.format],
        sample_rate_hz=msg.sample_rate_hz,
        instructions=msg.instructions,
        history=tuple(model.ChatMessage(m.role, m.content) for m in msg.history),
        speed=msg.speed,
        request_id=msg.request_id or request_id,
        word_timestamps=msg.word_timestamps,
        normalization=NORMALIZATION[msg.normalization],
    )


def stream_config(
    msg: pb.SynthesizeStreamConfig, request_id: str, text_input: TextInput
) -> model.SynthesisRequest:
    """Translate a ``SynthesizeStreamConfig`` into a speak-mode request fed by *text_input*."""
    if msg.format not in FORMATS:
        raise InvalidRequest(f"format {msg.format} is not a known AudioFormat")
    if msg.normalization not in NORMALIZATION:
        raise InvalidRequest(f"normalization {msg.normalization} is not a known TextNormalization")
    return model.SynthesisRequest(
        text="",
        mode=model.Mode.SPEAK,
        voice=msg.voice,
        format=FORMATS[msg.format],
        sample_rate_hz=msg.sample_rate_hz,
        instructions=msg.instructions,
        speed=msg.speed,
        request_id=msg.request_id or request_id,
        word_timestamps=msg.word_timestamps,
        normalization=NORMALIZATION[msg.normalization],
        input=text_input,
    )


def to_response(event: model.Event) -> pb.SynthesizeResponse:
    """Translate one core event into its ``SynthesizeResponse``."""
    match event:
        case model.AudioChunk():
            # Filled in place: a nested message passed to the constructor is built, then
            # copied, audio and all.
            response = pb.SynthesizeResponse()
            audio = response.audio
            audio.segment_index = event.segment_index
            audio.seq = event.seq
            audio.data = event.data
            return response
        case model.SegmentStarted():
            segment = pb.TextSegment(
                index=event.index, text=event.text, start_ms=event.start_ms, spoken=event.spoken
            )
            return pb.SynthesizeResponse(segment=segment)
        case model.WordTimings():
            words = [
                pb.WordTiming(
                    text=w.text, start_ms=w.start_ms, end_ms=w.end_ms, text_offset=w.text_offset
                )
                for w in event.words
            ]
            timings = pb.WordTimings(
                segment_index=event.segment_index, words=words, estimated=event.estimated
            )
            return pb.SynthesizeResponse(words=timings)
        case model.StreamStarted():
            started: dict[str, Any] = {name: getattr(event, name) for name in _STARTED_FIELDS}
            return pb.SynthesizeResponse(
                started=pb.StreamStarted(format=FORMAT_ENUM[event.format], **started)
            )
        case model.StreamFinished():
            figures = {name: getattr(event, name) for name in _FINISHED_FIELDS}
            return pb.SynthesizeResponse(finished=pb.StreamFinished(**figures))
    raise TypeError(f"unknown event {event!r}")


def to_status(error: VoxrelayError) -> grpc.Status:
    """Build the rich status for *error*: its code named, ``RetryInfo`` where a wait helps."""
    code = GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(
        reason=error.code.upper(),
        domain=ERROR_DOMAIN,
        metadata={"retryable": "true" if error.retryable else "false"},
    )
    details = [info]
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(error.retry_after_ms or 0)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    result: grpc.Status = rpc_status.to_status(status)
    return result


# Client side: requests out, events and errors in


def request_message(request: model.SynthesisRequest) -> pb.SynthesizeRequest:
    """Build the ``SynthesizeRequest`` for a core request (the inverse of :func:`to_request`)."""
    return pb.SynthesizeRequest(
        text=request.text,
        mode=MODE_ENUM[request.mode],
        voice=request.voice,
        format=pb.AUDIO_FORMAT_UNSPECIFIED
        if request.format is None
        else FORMAT_ENUM[request.format],
        sample_rate_hz=request.sample_rate_hz,
        instructions=request.instructions,
        history=[pb.ChatMessage(role=m.role, content=m.content) for m in request.history],
        speed=request.speed,
        request_id=request.request_id,
        word_timestamps=request.word_timestamps,
        normalization=NORMALIZATION_ENUM[request.normalization],  # type: ignore[arg-type]
    )


def stream_config_message(request: model.SynthesisRequest) -> pb.SynthesizeStreamRequest:
    """Build the first message of a ``SynthesizeStream`` call for a speak-mode request."""
    return pb.SynthesizeStreamRequest(
        config=pb.SynthesizeStreamConfig(
            voice=request.voice,
            format=pb.AUDIO_FORMAT_UNSPECIFIED
            if request.format is None
            else FORMAT_ENUM[request.format],
            sample_rate_hz=request.sample_rate_hz,
            speed=request.speed,
            instructions=request.instructions,
            request_id=request.request_id,
            word_timestamps=request.word_timestamps,
            normalization=NORMALIZATION_ENUM[request.normalization],  # type: ignore[arg-type]
        )
    )


def response_event(msg: pb.SynthesizeResponse) -> model.Event | None:
    """Translate one ``SynthesizeResponse`` into its core event.

    Return ``None`` for an event this version does not know (a newer server's), which a
    client skips.
    """
    kind = msg.WhichOneof("event")
    if kind == "audio":
        audio = msg.audio
        return model.AudioChunk(audio.segment_index, audio.seq, audio.data)
    if kind == "segment":
        segment = msg.segment
        return model.SegmentStarted(segment.index, segment.text, segment.start_ms, segment.spoken)
    if kind == "words":
        words = msg.words
        return model.WordTimings(
            words.segment_index,
            tuple(
                model.WordTiming(w.text, w.start_ms, w.end_ms, w.text_offset) for w in words.words
            ),
            words.estimated,
        )
    if kind == "started":
        started = msg.started
        fmt = FORMATS.get(started.format)
        if fmt is None:
            raise Internal(f"the server started a stream in unknown format {started.format}")
        return model.StreamStarted(
            format=fmt, **{name: getattr(started, name) for name in _STARTED_FIELDS}
        )
    if kind == "finished":
        return model.StreamFinished(
            **{name: getattr(msg.finished, name) for name in _FINISHED_FIELDS}
        )
    return None


def status_error(
    code: grpc.StatusCode, message: str, status: status_pb2.Status | None
) -> VoxrelayError:
    """Rebuild the core error a call ended with, from its status code and rich status.

    The ``ErrorInfo`` names the exact code; a status without one (another server's, or
    grpc's own) falls back to the code its status stands for, else ``internal``.
    """
    name = _CODE_OF_STATUS.get(code, "internal")
    retry_after_s: float | None = None
    retryable: bool | None = None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        delay = error_details_pb2.RetryInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN and info.reason:
            name = info.reason.lower()
            if "retryable" in info.metadata:
                retryable = info.metadata["retryable"] == "true"
        elif detail.Unpack(delay):
            retry_after_s = delay.retry_delay.ToMilliseconds() / 1000
    return error_for_code(name, message, retry_after_s=retry_after_s, retryable=retryable)
