"""The wire codecs both ways: what one side writes, the other reads back as it was."""

from __future__ import annotations

import dataclasses
import json

import grpc
import pytest
from google.rpc import status_pb2

from voxrelay.gateways import grpc_codec, ws_frames
from voxrelay.gateways.errors import GRPC_STATUS
from voxrelay.service import errors, model
from voxrelay.service.errors import VoxrelayError, error_for_code

STARTED = model.StreamStarted("r-1", model.AudioFormat.OPUS, "audio/ogg", 48000, 1, "v", "l", "t")
SEGMENT = model.SegmentStarted(2, "Hello there.", 1250)
FINISHED = model.StreamFinished(
    reply_text="Hi.", segments=1, audio_bytes=10, audio_ms=20, time_to_first_audio_ms=30,
    total_ms=40, llm_first_token_ms=5, tts_first_byte_ms=6, prompt_tokens=7, completion_tokens=8,
)  # fmt: skip
REQUEST = model.SynthesisRequest(
    text="Hi.",
    mode=model.Mode.SPEAK,
    voice="en-us",
    format=model.AudioFormat.MULAW,
    sample_rate_hz=8000,
    instructions="calmly",
    speed=1.5,
    request_id="r-2",
)
CODES = [cls.code for cls in VoxrelayError.__subclasses__() if cls.__module__ == errors.__name__]


def test_error_for_code_knows_every_code_of_the_module() -> None:
    for code in CODES:
        error = error_for_code(code, "why", retry_after_s=1.5)
        assert type(error).code == code and error.message == "why"
        assert error.retry_after_ms == 1500
    unknown = error_for_code("newer_code", "from a newer server", retryable=True)
    assert unknown.code == "newer_code" and unknown.retryable


@pytest.mark.parametrize("event", [STARTED, SEGMENT, FINISHED, model.AudioChunk(1, 7, b"abc")])
def test_grpc_events_round_trip(event: model.Event) -> None:
    assert grpc_codec.response_event(grpc_codec.to_response(event)) == event


def test_grpc_requests_round_trip() -> None:
    history = (model.ChatMessage("user", "a"), model.ChatMessage("assistant", "b"))
    request = dataclasses.replace(REQUEST, mode=model.Mode.CHAT, history=history)
    message = grpc_codec.request_message(request)
    assert grpc_codec.to_request(message, "ignored") == request


@pytest.mark.parametrize("code", CODES)
def test_grpc_statuses_name_the_exact_code(code: str) -> None:
    sent = error_for_code(code, "no.", retry_after_s=2.0 if code == "busy" else None)
    status = grpc_codec.to_status(sent)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    rich = status_pb2.Status.FromString(details)
    received = grpc_codec.status_error(status.code, status.details, rich)
    assert type(received) is type(sent) and received.message == "no."
    assert received.retryable == sent.retryable
    assert received.retry_after_s == sent.retry_after_s
    # Without the rich status, the status code alone still reads as a code it stands for.
    plain = grpc_codec.status_error(GRPC_STATUS[code], "no.", None)
    assert GRPC_STATUS[plain.code] == GRPC_STATUS[code]


def test_a_status_outside_the_table_is_internal() -> None:
    assert grpc_codec.status_error(grpc.StatusCode.DATA_LOSS, "?", None).code == "internal"


@pytest.mark.parametrize("event", [STARTED, SEGMENT, FINISHED])
def test_ws_events_round_trip(
    event: model.StreamStarted | model.SegmentStarted | model.StreamFinished,
) -> None:
    frame = ws_frames.dumps(ws_frames.event_frame("r-1", event))
    assert ws_frames.parse_server_frame(frame) == event


def test_ws_requests_round_trip() -> None:
    frame = ws_frames.synthesize_frame(REQUEST, request_id="r-2")
    parsed = ws_frames.parse_frame(json.dumps(frame))
    assert isinstance(parsed, ws_frames.SynthesizeFrame) and parsed.request == REQUEST
    with pytest.raises(errors.InvalidRequest, match="history"):
        history = (model.ChatMessage("user", "a"),)
        ws_frames.synthesize_frame(dataclasses.replace(REQUEST, history=history), request_id="x")


@pytest.mark.parametrize("code", CODES)
def test_ws_errors_round_trip(code: str) -> None:
    sent = error_for_code(code, "no.", retry_after_s=0.25)
    frame = ws_frames.parse_server_frame(ws_frames.dumps(ws_frames.error_frame("r-1", sent)))
    assert isinstance(frame, ws_frames.ErrorFrame) and frame.id == "r-1"
    assert type(frame.error) is type(sent) and frame.error.retry_after_s == 0.25


def test_ws_frames_a_client_skips_or_refuses() -> None:
    assert ws_frames.parse_server_frame('{"type":"newer","id":"r"}') is None
    cancelled = ws_frames.parse_server_frame('{"type":"cancelled","id":"r","audio_ms":5}')
    assert cancelled == ws_frames.Cancelled("r", 5)
    with pytest.raises(errors.Internal):
        ws_frames.parse_server_frame('{"type":"started"}')
    with pytest.raises(errors.Internal):
        ws_frames.parse_server_frame("not json")
