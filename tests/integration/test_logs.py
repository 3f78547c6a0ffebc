"""The log lines a real server writes: one per stream, request ids, no secrets, no text.

Most tests run the app in this process with the logging configuration ``voxrelay serve``
uses (:func:`service.logs.configure_logging`), its stderr handler pointed at a buffer.
The secrets test runs the real process and reads its real stderr.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fakes.openai_upstream import FakeOpenAI, Latency, hang, status
from tests.servers import running_app, serve_process
from tests.waiting import eventually
from voxrelay.gateways.app import App
from voxrelay.service import __version__
from voxrelay.service.logs import NOISY_LOGGERS, configure_logging
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

WAIT = 30.0
#: SPEC's fields of the end-of-stream line.
STREAM_FIELDS = {
    "request_id",
    "protocol",
    "peer",
    "mode",
    "voice",
    "format",
    "outcome",
    "ttfa_ms",
    "total_ms",
    "audio_ms",
    "llm_first_token_ms",
    "tts_first_byte_ms",
    "prompt_tokens",
    "completion_tokens",
}
USER_TEXT = "Quokkas juggle marmalade at midnight."


class Captured:
    """The JSON lines the process would have written to stderr."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def raw(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.raw]

    def ends(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == "stream_end"]

    def end_of(self, request_id: str) -> dict[str, Any]:
        [line] = [line for line in self.ends() if line["request_id"] == request_id]
        return line

    async def wait_ends(self, count: int) -> list[dict[str, Any]]:
        """Wait until *count* streams have logged their end (a cancel ends server-side later)."""
        await eventually(lambda: len(self.ends()) >= count)
        return self.ends()


@pytest.fixture
def log() -> Iterator[Captured]:
    """Log as ``voxrelay serve`` does, into a buffer; restore pytest's logging after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in NOISY_LOGGERS}
    configure_logging("info")
    stream = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        yield Captured(stream)
    finally:
        handlers, level, noisy = saved
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in noisy.items():
            logging.getLogger(name).setLevel(value)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(latency=Latency.zero()) as server:
        yield server


@pytest.fixture
async def app(fake: FakeOpenAI, log: Captured) -> AsyncIterator[App]:
    async with running_app(llm="openai", llm_base_url=fake.base_url, upstream_retries=0) as app:
        yield app


@pytest.fixture
async def stub(app: App) -> AsyncIterator[pb_grpc.SynthesizerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield pb_grpc.SynthesizerStub(channel)


def open_ws(app: App, **options: Any) -> Any:
    url = f"ws://127.0.0.1:{app.ws_port}/v1/stream"
    return connect(url, compression=None, max_size=None, proxy=None, open_timeout=WAIT, **options)


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def receive(ws: ClientConnection) -> dict[str, Any] | bytes:
    message = await asyncio.wait_for(ws.recv(), WAIT)
    return message if isinstance(message, bytes) else json.loads(message)


async def until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    """The JSON frames up to the next finished, error or cancelled (audio left out)."""
    frames: list[dict[str, Any]] = []
    while True:
        frame = await receive(ws)
        if isinstance(frame, dict):
            frames.append(frame)
            if frame["type"] in ("finished", "error", "cancelled"):
                return frames


async def synthesize(
    stub: pb_grpc.SynthesizerStub, request: pb.SynthesizeRequest, **options: Any
) -> list[pb.SynthesizeResponse]:
    return [r async for r in stub.Synthesize(request, timeout=WAIT, **options)]


# One line per stream


async def test_every_stream_ends_with_exactly_one_line(
    app: App, fake: FakeOpenAI, stub: pb_grpc.SynthesizerStub, log: Captured
) -> None:
    # gRPC: ok (chat, id in metadata), cancelled, refused, upstream failure (ids in the field).
    await synthesize(stub, pb.SynthesizeRequest(text="Hi."), metadata=[("x-request-id", "g-ok")])
    fake.chat_faults.append(hang())
    call = stub.Synthesize(pb.SynthesizeRequest(text="Hi.", request_id="g-cancel"), timeout=WAIT)
    assert (await call.read()).HasField("started")
    call.cancel()
    with pytest.raises(grpc.aio.AioRpcError):
        await synthesize(stub, pb.SynthesizeRequest(text=" ", request_id="g-bad"))
    fake.chat_faults.append(status(500))
    with pytest.raises(grpc.aio.AioRpcError):
        await synthesize(stub, pb.SynthesizeRequest(text="Hi.", request_id="g-up"))

    # WebSocket: ok (speak), cancelled, busy meanwhile, refused.
    async with open_ws(app) as ws:
        await send(ws, type="synthesize", id="w-ok", text="Hello there.", mode="speak")
        assert (await until_end(ws))[-1]["type"] == "finished"
        fake.chat_faults.append(hang())
        await send(ws, type="synthesize", id="w-cancel", text="Hi.", format="wav")
        assert (await until_end_or_started(ws))["type"] == "started"
        await send(ws, type="synthesize", id="w-busy", text="Me too.")
        assert (await until_end(ws))[-1]["code"] == "busy"
        await send(ws, type="cancel", id="w-cancel")
        assert (await until_end(ws))[-1]["type"] == "cancelled"
        await send(ws, type="synthesize", id="w-bad", text="x", format="mp4")
        assert (await until_end(ws))[-1]["code"] == "invalid_request"

    await log.wait_ends(8)
    await app.drain_and_stop()  # no stream can log its end after this
    ends = log.ends()
    expected = {
        "g-ok": "ok",
        "g-cancel": "cancelled",
        "g-bad": "invalid_request",
        "g-up": "upstream_error",
        "w-ok": "ok",
        "w-cancel": "cancelled",
        "w-busy": "busy",
        "w-bad": "invalid_request",
    }
    assert sorted(line["request_id"] for line in ends) == sorted(expected)
    for line in ends:
        assert set(line) >= STREAM_FIELDS, STREAM_FIELDS - set(line)
        assert line["outcome"] == expected[line["request_id"]]
        assert line["protocol"] == ("grpc" if line["request_id"][0] == "g" else "ws")
        assert "127.0.0.1:" in line["peer"]
        assert isinstance(line["total_ms"], int) and line["total_ms"] >= 0

    chat = log.end_of("g-ok")
    assert chat["mode"] == "chat" and chat["format"] == "mp3" and chat["voice"] == "en-us"
    assert 0 <= chat["ttfa_ms"] <= chat["total_ms"] and chat["audio_ms"] > 0
    assert chat["llm_first_token_ms"] is not None and chat["tts_first_byte_ms"] is not None
    assert chat["prompt_tokens"] > 0 and chat["completion_tokens"] > 0
    assert chat["level"] == "info"
    speak = log.end_of("w-ok")
    assert speak["mode"] == "speak" and speak["llm_first_token_ms"] is None
    assert speak["ttfa_ms"] is not None and speak["audio_ms"] > 0
    assert log.end_of("w-cancel")["ttfa_ms"] is None  # no audio before the cancel
    upstream = log.end_of("g-up")
    assert upstream["level"] == "warning" and "500" in upstream["error"]


async def test_a_stream_cancelled_at_once_still_ends_with_one_line(app: App, log: Captured) -> None:
    async with open_ws(app) as ws:
        for i in range(20):
            await send(ws, type="synthesize", id=f"quick-{i}", text="Hello there.", mode="speak")
            await send(ws, type="cancel", id=f"quick-{i}")
            assert (await until_end(ws))[-1]["type"] in ("cancelled", "finished")
    # The cancelled (or finished) frame goes out after the stream's end was recorded.
    ends = log.ends()
    assert sorted(line["request_id"] for line in ends) == sorted(f"quick-{i}" for i in range(20))


async def test_a_cancelled_stream_logs_what_it_had_done_and_why(
    app: App, fake: FakeOpenAI, stub: pb_grpc.SynthesizerStub, log: Captured
) -> None:
    text = "Hello there. This text goes on for a while, sentence after sentence. " * 8
    request = pb.SynthesizeRequest(text=text, mode=pb.MODE_SPEAK, request_id="c-client")
    call = stub.Synthesize(request, timeout=WAIT)
    async for response in call:
        if response.HasField("audio"):
            break
    call.cancel()
    fake.chat_faults.append(hang())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        late_call = stub.Synthesize(
            pb.SynthesizeRequest(text="Hi.", request_id="c-late"), timeout=0.3
        )
        async for _ in late_call:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    async with open_ws(app) as ws:
        await send(ws, type="synthesize", id="c-gone", text=text, mode="speak")
        while not isinstance(await receive(ws), bytes):
            pass
    await log.wait_ends(3)

    by_client = log.end_of("c-client")
    assert by_client["outcome"] == "cancelled" and by_client["reason"] == "client"
    assert by_client["segments"] >= 1 and by_client["audio_ms"] > 0
    assert by_client["tts_first_byte_ms"] is not None and by_client["ttfa_ms"] is not None
    late = log.end_of("c-late")
    assert late["outcome"] == "cancelled" and late["reason"] == "deadline"
    assert late["segments"] == 0 and late["llm_first_token_ms"] is None
    gone = log.end_of("c-gone")
    assert gone["outcome"] == "cancelled" and gone["reason"] == "disconnect"
    assert gone["segments"] >= 1 and gone["tts_first_byte_ms"] is not None


async def until_end_or_started(ws: ClientConnection) -> dict[str, Any]:
    while True:
        frame = await receive(ws)
        if isinstance(frame, dict) and frame["type"] in ("started", "error", "finished"):
            return frame


# Request ids


async def test_a_request_id_is_the_clients_or_a_generated_one(
    app: App, stub: pb_grpc.SynthesizerStub, log: Captured
) -> None:
    speak = pb.SynthesizeRequest(text="Hello.", mode=pb.MODE_SPEAK)
    given = await synthesize(stub, speak, metadata=[("x-request-id", "from-metadata-1")])
    assert given[0].started.request_id == "from-metadata-1"
    generated = (await synthesize(stub, speak))[0].started.request_id
    assert generated and generated != "from-metadata-1"

    async with open_ws(app) as ws:
        await send(ws, type="synthesize", id="ws-given", text="Hello.", mode="speak")
        frames = await until_end(ws)
        assert frames[0]["type"] == "started" and frames[0]["id"] == "ws-given"
        await send(ws, type="synthesize", text="Hello.", mode="speak")
        frames = await until_end(ws)
        ws_generated = frames[0]["id"]
        assert frames[0]["type"] == "started" and ws_generated

    await log.wait_ends(4)
    for request_id in ("from-metadata-1", generated, "ws-given", ws_generated):
        assert log.end_of(request_id)["outcome"] == "ok"

    # A refused request still has an id in its line.
    with pytest.raises(grpc.aio.AioRpcError):
        await synthesize(stub, pb.SynthesizeRequest(text=""))
    [*_, refused] = await log.wait_ends(5)
    assert refused["outcome"] == "invalid_request" and refused["request_id"]


# What never reaches a log line


@pytest.mark.parametrize("log_text", [False, True])
async def test_user_text_is_logged_only_when_enabled(
    fake: FakeOpenAI, log: Captured, log_text: bool
) -> None:
    overrides = dict(llm="openai", llm_base_url=fake.base_url, log_text=log_text)
    fake.reply = f"You said: {USER_TEXT}"
    async with running_app(**overrides) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.SynthesizerStub(channel)
            await synthesize(stub, pb.SynthesizeRequest(text=USER_TEXT, request_id="g"))
            with pytest.raises(grpc.aio.AioRpcError):
                request = pb.SynthesizeRequest(text=USER_TEXT, voice="nobody", request_id="gx")
                await synthesize(stub, request)
        async with open_ws(app) as ws:
            await send(ws, type="synthesize", id="w", text=USER_TEXT, mode="speak")
            await until_end(ws)
            await send(ws, type="synthesize", id="wx", text=USER_TEXT, format="nope")
            await until_end(ws)
        await log.wait_ends(4)

    everything = "\n".join(log.raw)
    if not log_text:
        assert "Quokkas" not in everything
        assert all("text" not in line and "reply_text" not in line for line in log.ends())
    else:
        assert log.end_of("g")["text"] == USER_TEXT
        assert USER_TEXT in log.end_of("g")["reply_text"]
        assert log.end_of("w")["text"] == USER_TEXT


async def test_client_values_are_escaped_and_shortened(
    app: App, stub: pb_grpc.SynthesizerStub, log: Captured
) -> None:
    hostile_id = "id\x1b[2J\x07\u2028\x85\u202eend"
    hostile_voice = "\x1b]0;pwned\x07" + "v" * 500 + "\r\nfake line"
    async with open_ws(app) as ws:
        await send(ws, type="synthesize", id=hostile_id, text="Hello.", voice=hostile_voice)
        assert (await until_end(ws))[-1]["code"] == "invalid_request"
    with pytest.raises(grpc.aio.AioRpcError):
        request = pb.SynthesizeRequest(text="Hi.", voice=hostile_voice, request_id="r\x00\x1b" * 99)
        await synthesize(stub, request)
    await log.wait_ends(2)

    for raw in log.raw:
        assert raw.isprintable(), raw  # no raw control character, no second line
    ws_line = log.end_of(hostile_id)
    assert ws_line["voice"].startswith("\x1b]0;pwned\x07v") and len(ws_line["voice"]) <= 64
    grpc_line = next(line for line in log.ends() if line["protocol"] == "grpc")
    assert len(grpc_line["request_id"]) <= 128 and grpc_line["request_id"].startswith("r\x00\x1b")


# Start-up and warnings


async def test_the_startup_line_names_version_listeners_and_providers(
    app: App, log: Captured
) -> None:
    [startup] = [line for line in log.lines if line.get("event") == "startup"]
    assert startup["version"] == __version__
    assert startup["grpc"].endswith(f":{app.grpc_port}")
    assert startup["websocket"].endswith(f":{app.ws_port}/v1/stream")
    assert startup["metrics"].endswith(f":{app.metrics_port}/metrics")
    assert startup["openai"] == f"http://127.0.0.1:{app.http_port}/v1"
    assert (startup["llm"], startup["tts"]) == ("openai", "espeak")
    assert startup["llm_reason"] and startup["tts_reason"]
    assert startup["log_text"] is False


async def test_a_retry_warning_names_its_stream(fake: FakeOpenAI, log: Captured) -> None:
    async with running_app(llm="openai", llm_base_url=fake.base_url) as app:
        fake.chat_faults.append(status(503, retry_after_ms=10))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.SynthesizerStub(channel)
            responses = await synthesize(stub, pb.SynthesizeRequest(text="Hi.", request_id="rt"))
        assert responses[-1].HasField("finished")
    [warning] = [line for line in log.lines if line["msg"].startswith("retrying")]
    assert warning["level"] == "warning" and warning["request_id"] == "rt"
    assert (warning["stage"], warning["provider"]) == ("llm", "openai")
    assert log.end_of("rt")["outcome"] == "ok"


async def test_secrets_reach_neither_the_logs_nor_the_metrics() -> None:
    """The real process, with recognisable keys configured, leaking them where it can."""
    upstream_key = "sk-vxleak-UPSTREAM-5f2c9e71d0"
    caller_key = "vxleak-CALLER-83ad10f6"
    wrong_key = "vxleak-WRONG-7c0e2b94"
    async with FakeOpenAI(latency=Latency.zero(), api_key=upstream_key) as fake:
        env = dict(
            OPENAI_API_KEY=upstream_key,
            OPENAI_BASE_URL=fake.base_url,
            VOXRELAY_LLM="openai",
            VOXRELAY_TTS="espeak",
            VOXRELAY_API_KEYS=caller_key,
            VOXRELAY_LOG_LEVEL="debug",
            VOXRELAY_UPSTREAM_RETRIES="1",
        )
        async with serve_process(**env) as server:
            # An upstream that echoes the key in its error, then answers.
            fake.chat_faults.append(status(503, retry_after_ms=10, message=f"bad {upstream_key}"))
            auth = [("authorization", f"Bearer {caller_key}")]
            async with grpc.aio.insecure_channel(server.grpc_target) as channel:
                stub = pb_grpc.SynthesizerStub(channel)
                request = pb.SynthesizeRequest(text=USER_TEXT, request_id="leak-1")
                await synthesize(stub, request, metadata=auth)
            headers = {"Authorization": f"Bearer {caller_key}"}
            url = server.ws_url
            options = dict(compression=None, proxy=None, open_timeout=WAIT)
            async with connect(url, additional_headers=headers, **options) as ws:
                await send(ws, type="synthesize", id="leak-2", text=USER_TEXT)
                assert (await until_end(ws))[-1]["type"] == "finished"
            with pytest.raises(InvalidStatus):
                bad = {"Authorization": f"Bearer {wrong_key}"}
                async with connect(url, additional_headers=bad, **options):
                    pass
            metrics_url = server.startup["metrics"]
            exposition = await asyncio.to_thread(
                lambda: urllib.request.urlopen(metrics_url, timeout=WAIT).read().decode()
            )
        await server.wait()

    logged = json.dumps(server.lines)
    assert [line for line in server.lines if "raw" in line] == [], "every stderr line is JSON"
    assert any(line.get("msg", "").startswith("retrying") for line in server.lines)
    assert {"leak-1", "leak-2"} <= {line.get("request_id") for line in server.lines}
    for secret in (upstream_key, caller_key, wrong_key, "UPSTREAM-5f2c9e71d0"):
        assert secret not in logged, secret
        assert secret not in exposition, secret
    assert "Quokkas" not in logged
    assert "voxrelay_requests_total" in exposition
