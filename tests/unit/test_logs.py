"""The JSON log formatter and the end-of-stream record, without a server."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest

from voxrelay.service import metrics
from voxrelay.service.errors import Busy, Internal, InvalidRequest, UpstreamTimeout, VoxrelayError
from voxrelay.service.logs import (
    REQUEST_ID,
    JsonFormatter,
    configure_logging,
    redact,
    register_secrets,
    shorten,
)
from voxrelay.service.model import AudioFormat, Mode, StreamFinished, SynthesisRequest
from voxrelay.service.telemetry import StreamRecord

SECRET = "vx-unit-secret-7d1f0c3b9a"


def record(msg: str = "hello", *args: object, level: int = logging.INFO, **extra: Any) -> str:
    rec = logging.LogRecord("voxrelay.test", level, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return JsonFormatter().format(rec)


def one_line(text: str) -> dict[str, Any]:
    assert "\n" not in text and "\r" not in text
    line: dict[str, Any] = json.loads(text)
    return line


# The formatter


def test_a_record_is_one_json_line_with_its_extra_fields() -> None:
    line = one_line(record("stream %s", "ok", event="stream_end", ttfa_ms=12, voice=None))
    assert line["msg"] == "stream ok"
    assert line["level"] == "info" and line["logger"] == "voxrelay.test"
    assert line["event"] == "stream_end" and line["ttfa_ms"] == 12 and line["voice"] is None
    assert line["ts"].endswith("Z")


def test_values_that_json_cannot_encode_are_logged_as_text() -> None:
    line = one_line(record(path=object(), when={"a": (1, 2)}, tags={"x"}))
    assert line["path"].startswith("<object")
    assert line["when"] == {"a": [1, 2]} and line["tags"] == ["x"]


@pytest.mark.parametrize(
    "hostile",
    [
        "line\nbreak",
        "carriage\rreturn",
        "\x1b[31mred\x1b[0m",
        "bell\x07 nul\x00",
        "del\x7f",
        "c1 csi\x9b2J",
        "nel\x85",
        "ls\u2028ps\u2029",
        "bidi\u202eevil\u202c",
        "isolate\u2066x\u2069",
        "lone \ud800 surrogate \udfff",
    ],
)
def test_control_characters_are_escaped_and_the_value_survives(hostile: str) -> None:
    text = record(voice=hostile, msg_arg=hostile)
    assert text.isprintable(), repr(text)
    text.encode()  # stderr takes UTF-8
    line = one_line(text)
    assert line["voice"] == hostile  # escaped on the wire, the same value once parsed


def test_non_ascii_text_stays_readable() -> None:
    text = record(voice="Zoë — 日本語")
    assert "Zoë — 日本語" in text


def test_an_exception_is_logged_inside_the_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = one_line(JsonFormatter().format(rec))
    assert "ValueError: boom" in line["exc"]


def test_the_request_id_of_the_current_task_is_added() -> None:
    token = REQUEST_ID.set("req-42")
    try:
        assert one_line(record("retrying"))["request_id"] == "req-42"
        assert one_line(record("x", request_id="own"))["request_id"] == "own"
    finally:
        REQUEST_ID.reset(token)
    assert "request_id" not in one_line(record("later"))


# Secrets


def test_registered_secrets_never_reach_a_line() -> None:
    register_secrets([SECRET, None, ""])
    text = record(
        f"upstream said: Incorrect API key provided: {SECRET}",
        error=f"401 {SECRET}",
        nested={"headers": [f"x-key: {SECRET}"]},
    )
    assert SECRET not in text
    assert "[redacted]" in one_line(text)["msg"]


def test_short_values_are_not_treated_as_secrets() -> None:
    register_secrets(["abc"])
    assert redact("abc abc") == "abc abc"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("authorization: Bearer abc.DEF-123", "authorization: Bearer [redacted]"),
        ("bearer xyz", "bearer [redacted]"),
        ("key sk-proj-ABCDEF0123456789 was refused", "key [redacted] was refused"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_token_shaped_strings_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_shorten_marks_the_cut() -> None:
    assert shorten("abc", 5) == "abc"
    assert shorten("abcdefgh", 5) == "abcd…"
    assert len(shorten("x" * 10_000, 64)) == 64


def test_configure_logging_writes_json_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("warning", secrets=["vx-configured-secret-0042"])
        logging.getLogger("voxrelay.test").info("hidden")
        logging.getLogger("voxrelay.test").warning("shown vx-configured-secret-0042")
        err = capsys.readouterr().err.strip().splitlines()
        assert [json.loads(e)["msg"] for e in err] == ["shown [redacted]"]
        assert logging.getLogger("httpx").level >= logging.WARNING
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


# The end-of-stream record


def ends(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(r))
        for r in caplog.records
        if getattr(r, "event", None) == "stream_end"
    ]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_record_logs_once_and_counts_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voxrelay.stream")
    labels = {"protocol": "grpc", "mode": "speak", "outcome": "ok"}
    before = sample("voxrelay_requests_total", **labels)
    active = sample("voxrelay_active_streams", protocol="grpc")
    request = SynthesisRequest(text="Say this.", mode=Mode.SPEAK, request_id="r1")
    rec = StreamRecord("grpc", "ipv4:127.0.0.1:1", request)
    assert sample("voxrelay_active_streams", protocol="grpc") == active + 1
    rec.started_stream("r1", "en-us", AudioFormat.WAV)
    rec.audio(100)
    finished = StreamFinished(reply_text="Say this.", segments=1, audio_ms=250)
    rec.end("ok", finished)
    rec.end("cancelled")  # a second path: ignored
    assert sample("voxrelay_requests_total", **labels) == before + 1
    assert sample("voxrelay_active_streams", protocol="grpc") == active
    [line] = ends(caplog)
    assert line["outcome"] == "ok" and line["request_id"] == "r1" and line["format"] == "wav"
    assert line["audio_ms"] == 250 and line["audio_bytes"] == 100 and line["segments"] == 1
    assert line["llm_first_token_ms"] is None  # speak mode asks no LLM
    assert "text" not in line and "reply_text" not in line
    assert line["text_chars"] == len("Say this.")


def test_user_text_is_logged_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voxrelay.stream")
    request = SynthesisRequest(text="my secret diary", instructions="whisper")
    StreamRecord("ws", "p", request).end("ok", StreamFinished(reply_text="the reply"))
    StreamRecord("ws", "p", request, log_text=True).end("ok", StreamFinished(reply_text="r2"))
    hidden, shown = ends(caplog)
    assert "my secret diary" not in json.dumps(hidden) and "the reply" not in json.dumps(hidden)
    assert shown["text"] == "my secret diary" and shown["reply_text"] == "r2"
    assert shown["instructions"] == "whisper"


def test_client_values_are_shortened(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voxrelay.stream")
    request = SynthesisRequest(text="x", voice="v" * 5000, request_id="i" * 5000)
    StreamRecord("ws", "p", request).end("invalid_request", error=InvalidRequest("m" * 5000))
    [line] = ends(caplog)
    assert len(line["voice"]) <= 64 and len(line["request_id"]) <= 128
    assert len(line["error"]) <= 300


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (Busy("busy"), "info"),
        (UpstreamTimeout("slow"), "warning"),
        (Internal("bug"), "error"),
    ],
)
def test_the_level_says_whose_fault_it_was(
    caplog: pytest.LogCaptureFixture, error: VoxrelayError, level: str
) -> None:
    caplog.set_level(logging.INFO, logger="voxrelay.stream")
    StreamRecord("grpc", "p", SynthesisRequest(text="x")).end(error.code, error=error)
    [line] = ends(caplog)
    assert line["level"] == level and line["outcome"] == error.code


def test_labels_stay_in_their_closed_sets() -> None:
    class Odd(VoxrelayError):
        code = "made_up_code"

    before = sample("voxrelay_requests_total", protocol="ws", mode="chat", outcome="internal")
    errors = sample("voxrelay_errors_total", protocol="ws", code="internal")
    StreamRecord("ws", "p", SynthesisRequest(text="x")).end("made_up_code", error=Odd("odd"))
    assert sample("voxrelay_requests_total", protocol="ws", mode="chat", outcome="internal") == (
        before + 1
    )
    assert sample("voxrelay_errors_total", protocol="ws", code="internal") == errors + 1
    exposed = metrics.REGISTRY.collect()
    assert not any(
        "made_up_code" in s.labels.values() for family in exposed for s in family.samples
    )


def test_every_error_class_has_a_listed_code() -> None:
    def subclasses(cls: type[VoxrelayError]) -> list[type[VoxrelayError]]:
        found = [cls]
        for sub in cls.__subclasses__():
            found += subclasses(sub)
        return found

    import voxrelay.service.errors as errors_module

    classes = [c for c in subclasses(VoxrelayError) if c.__module__ == errors_module.__name__]
    assert {c.code for c in classes} == set(metrics.ERROR_CODES)


def test_the_request_id_names_warnings_while_the_stream_is_open() -> None:
    rec = StreamRecord("grpc", "p", SynthesisRequest(text="x", request_id="ctx-1"))
    assert REQUEST_ID.get() == "ctx-1"
    rec.started_stream("ctx-1", "en-us", AudioFormat.MP3)
    rec.end("ok", StreamFinished())
    assert REQUEST_ID.get() is None
