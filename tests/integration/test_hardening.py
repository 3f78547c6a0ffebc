"""Hostile or odd input at both doors: each refused with its typed error, nothing else breaks.

Issue 17's smaller holes, end to end over real sockets: lone surrogates in a request, text
with Windows line endings, and (against a fake OpenAI upstream) waits and usage figures no
client should see unclamped, and upstream error bodies that must stay in the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shlex
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fakes.openai_upstream import FakeOpenAI, Latency, status
from tests.conftest import AppFactory
from tests.integration.test_websocket import (
    SHORT,
    WAIT,
    http_get,
    open_ws,
    receive,
    send,
    until_end,
)
from tests.servers import ServerProcess, serve_process
from voxrelay.gateways.app import App
from voxrelay.service.logs import JsonFormatter
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc


def ws_url(app: App) -> str:
    return f"ws://127.0.0.1:{app.ws_port}/v1/stream"


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every record as the JSON line the server would write (and can write: no crash)."""
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    for line in lines:
        line.encode()  # stderr takes UTF-8: a lone surrogate would fail right here
    return lines


# Lone surrogates and line endings


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"synthesize","id":"s1","mode":"speak","text":"Hello \\ud800 there."}',
        '{"type":"synthesize","id":"s1","mode":"speak","text":"Hi.","voice":"\\udfff"}',
        '{"type":"synthesize","id":"s1","mode":"speak","text":"Hi.","instructions":"\\ud83d"}',
    ],
)
async def test_ws_lone_surrogate_is_invalid_request(
    app_factory: AppFactory, caplog: pytest.LogCaptureFixture, frame: str
) -> None:
    caplog.set_level(logging.INFO)
    app = await app_factory()
    async with open_ws(ws_url(app)) as ws:
        await ws.send(frame)
        error = await receive(ws)
        assert isinstance(error, dict) and error["type"] == "error"
        assert (error["id"], error["code"]) == ("s1", "invalid_request")
        assert "surrogate" in error["message"]
        # The connection goes on serving, and a real emoji (a surrogate pair) is fine.
        await send(ws, type="synthesize", id="s2", mode="speak", text="Fine 😀 now.", format="pcm")
        assert (await until_end(ws))[-1]["type"] == "finished"  # type: ignore[index]
    assert app.runtime.active_streams == 0
    assert not any("Traceback" in line for line in logged(caplog))


async def test_ws_lone_surrogate_in_the_id_gets_a_null_id(app_factory: AppFactory) -> None:
    app = await app_factory()
    async with open_ws(ws_url(app)) as ws:
        await ws.send('{"type":"synthesize","id":"x\\ud800","mode":"speak","text":"Hi."}')
        error = await receive(ws)
        assert isinstance(error, dict)
        assert (error["type"], error["id"], error["code"]) == ("error", None, "invalid_request")


async def test_grpc_invalid_utf8_is_invalid_argument(app_factory: AppFactory) -> None:
    app = await app_factory()
    good = pb.SynthesizeRequest(text="Hello XXXX.", mode=pb.MODE_SPEAK).SerializeToString()
    bad = good.replace(b"XXXX", b"\xed\xa0\x80X")  # U+D800 as a lax UTF-8 encoder writes it
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        call = channel.unary_stream(
            "/voxrelay.v1.Synthesizer/Synthesize",
            request_serializer=bytes,
            response_deserializer=pb.SynthesizeResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call(bad, timeout=WAIT):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (refused.value.details() or "")
        voices = channel.unary_unary(
            "/voxrelay.v1.Synthesizer/ListVoices",
            request_serializer=bytes,
            response_deserializer=pb.ListVoicesResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await voices(b"\x0a\x02e\x80")  # language: "e" and a stray continuation byte
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The same door serves a good request meanwhile.
        stub = pb_grpc.SynthesizerStub(channel)
        responses = [
            r
            async for r in stub.Synthesize(
                pb.SynthesizeRequest(text=SHORT, mode=pb.MODE_SPEAK), timeout=WAIT
            )
        ]
        assert responses[-1].HasField("finished")


async def test_windows_line_endings_are_spoken(app_factory: AppFactory) -> None:
    app = await app_factory()
    text = "First line.\r\nSecond line.\r\n"
    async with open_ws(ws_url(app)) as ws:
        for mode in ("speak", "chat"):
            await send(ws, type="synthesize", text=text, mode=mode, instructions="Be\r\nbrief.")
            last = (await until_end(ws))[-1]
            assert isinstance(last, dict) and last["type"] == "finished", last
        await send(ws, type="synthesize", id="c", text="Bell\x07.", mode="speak")
        error = await receive(ws)
        assert isinstance(error, dict) and error["code"] == "invalid_request"
        assert "carriage return" in error["message"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        history = [pb.ChatMessage(role="user", content="a\r\nb")]
        request = pb.SynthesizeRequest(text=text, history=history)
        responses = [r async for r in stub.Synthesize(request, timeout=WAIT)]
        assert responses[-1].HasField("finished")


# What an upstream says, passed on only within bounds

CHAT_KEY = "sk-chat-hardening-5d1c9e2a7b"
TTS_KEY = "sk-speech-hardening-8f0e3b6d2c"


@dataclass
class Upstreams:
    app: App
    chat: FakeOpenAI
    tts: FakeOpenAI


@pytest.fixture
async def upstreams(app_factory: AppFactory) -> AsyncIterator[Upstreams]:
    """The app on two fake OpenAI upstreams, no retries, the breaker off."""
    async with (
        FakeOpenAI(latency=Latency.zero(), api_key=CHAT_KEY) as chat,
        FakeOpenAI(latency=Latency.zero(), api_key=TTS_KEY) as tts,
    ):
        app = await app_factory(
            llm="openai",
            tts="openai",
            llm_base_url=chat.base_url,
            llm_api_key=CHAT_KEY,
            tts_base_url=tts.base_url,
            tts_api_key=TTS_KEY,
            upstream_retries=0,
            breaker_failures=0,
        )
        yield Upstreams(app, chat, tts)
        await app.drain_and_stop()


def retry_delay_ms(error: grpc.aio.AioRpcError) -> int | None:
    status_proto = rpc_status.from_call(error)
    for detail in status_proto.details if status_proto is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return int(info.retry_delay.ToMilliseconds())
    return None


@pytest.mark.parametrize(
    ("header", "wait_ms"),
    [("1e306", 3_600_000), ("inf", 3_600_000), ("-5", 0), ("nan", None), ("7200", 3_600_000)],
)
async def test_an_upstream_wait_is_clamped_to_an_hour(
    upstreams: Upstreams, header: str, wait_ms: int | None
) -> None:
    r = upstreams
    r.chat.chat_faults.extend([status(429, retry_after=header)] * 2)
    async with open_ws(ws_url(r.app)) as ws:
        await send(ws, type="synthesize", id="w", text=SHORT, format="pcm")
        error = (await until_end(ws))[-1]
        assert isinstance(error, dict) and error["type"] == "error", error
        assert (error["code"], error["retryable"]) == ("upstream_error", True)
        assert error["retry_after_ms"] == wait_ms
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.Synthesize(pb.SynthesizeRequest(text=SHORT), timeout=WAIT):
                pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert retry_delay_ms(failed.value) == wait_ms


async def test_impossible_usage_figures_are_clamped(upstreams: Upstreams) -> None:
    r = upstreams
    r.chat.usage = {"prompt_tokens": -5, "completion_tokens": 2**40}
    async with open_ws(ws_url(r.app)) as ws:
        await send(ws, type="synthesize", text=SHORT, format="pcm")
        finished = (await until_end(ws))[-1]
        assert isinstance(finished, dict) and finished["type"] == "finished", finished
        assert (finished["prompt_tokens"], finished["completion_tokens"]) == (0, 2**32 - 1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        responses = [
            response
            async for response in stub.Synthesize(pb.SynthesizeRequest(text=SHORT), timeout=WAIT)
        ]
        assert responses[-1].finished.prompt_tokens == 0


ACCOUNT = "Org org-acme-4417 (billing@acme.example) is over its monthly quota"


@pytest.mark.parametrize("stage", ["chat", "speech"])
async def test_upstream_error_bodies_are_logged_not_sent(
    upstreams: Upstreams, caplog: pytest.LogCaptureFixture, stage: str
) -> None:
    caplog.set_level(logging.INFO)
    r = upstreams
    if stage == "chat":
        r.chat.chat_faults.append(status(429, message=f"{ACCOUNT}; key {CHAT_KEY}"))
    else:
        r.tts.speech_faults.append(status(400, message=f"{ACCOUNT}; key {TTS_KEY}"))
    mode = "chat" if stage == "chat" else "speak"
    async with open_ws(ws_url(r.app)) as ws:
        await send(ws, type="synthesize", id="b", text=SHORT, mode=mode, format="pcm")
        error = (await until_end(ws))[-1]
    assert isinstance(error, dict) and error["code"] == "upstream_error", error
    code = 429 if stage == "chat" else 400
    assert error["message"].startswith(f"{stage} upstream ")
    assert error["message"].endswith(f": {code}")
    assert "acme" not in json.dumps(error)
    # The operator finds the upstream's words in the log, the key redacted.
    lines = logged(caplog)
    said = [e for e in map(json.loads, lines) if e.get("event") == "upstream_error"]
    assert said and ACCOUNT in said[-1]["detail"], lines
    assert not any(CHAT_KEY in line or TTS_KEY in line for line in lines)


# File descriptors


@contextmanager
def no_descriptor_free() -> Iterator[None]:
    """Hold every descriptor this process may open (a lowered soft limit, filled)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 32, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_no_descriptor_free_is_unavailable_and_never_opens_the_breaker(
    app_factory: AppFactory,
) -> None:
    async with (
        FakeOpenAI(latency=Latency.zero(), api_key=CHAT_KEY) as chat,
        FakeOpenAI(latency=Latency.zero(), api_key=TTS_KEY) as tts,
    ):
        app = await app_factory(
            llm="openai",
            tts="openai",
            llm_base_url=chat.base_url,
            llm_api_key=CHAT_KEY,
            tts_base_url=tts.base_url,
            tts_api_key=TTS_KEY,
            breaker_failures=1,
        )
        async with open_ws(ws_url(app)) as ws:
            with no_descriptor_free():
                for request_id in ("a", "b"):
                    await send(ws, type="synthesize", id=request_id, text=SHORT, format="pcm")
                    error = (await until_end(ws))[-1]
                    assert isinstance(error, dict) and error["type"] == "error", error
                    assert (error["code"], error["retryable"]) == ("unavailable", True), error
                    assert "file descriptor" in error["message"]
            assert not chat.requests  # nothing reached the upstream
            # Descriptors free again: the breaker never opened, the next request is served.
            await send(ws, type="synthesize", id="c", text=SHORT, format="pcm")
            last = (await until_end(ws))[-1]
            assert isinstance(last, dict) and last["type"] == "finished", last
        await app.drain_and_stop()


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


def serve_under_ulimit(soft: int, hard: int | None = None, **env: str) -> ServerProcess:
    """``voxrelay serve`` started by a shell that set the open-file limits first."""
    server = serve_process(**env)
    command = " ".join(shlex.quote(arg) for arg in server.argv)
    limits = f"ulimit -S -n {soft}" + (f" && ulimit -H -n {hard}" if hard else "")
    return ServerProcess(["sh", "-c", f"{limits} && exec {command}"], server.env)


async def test_serve_raises_the_soft_open_file_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip("needs a finite hard limit above 1024")
    async with serve_under_ulimit(1024) as server:
        assert server.proc is not None
        assert soft_nofile(server.proc.pid) == hard
        raised = [line for line in server.lines if line.get("event") == "fd_limit"]
        needed = 4096 + 256 * 4 + 256
        if hard >= needed:
            assert raised and raised[0]["level"] == "info" and raised[0]["soft"] == hard
        else:
            assert raised and raised[0]["level"] == "warning"


async def test_serve_warns_once_when_the_hard_limit_is_below_the_caps() -> None:
    async with serve_under_ulimit(1024, 2000, VOXRELAY_MAX_CONNECTIONS="4096") as server:
        assert server.proc is not None
        assert soft_nofile(server.proc.pid) == 2000
        warned = [line for line in server.lines if line.get("event") == "fd_limit"]
        assert len(warned) == 1 and warned[0]["level"] == "warning", warned
        assert warned[0]["soft"] == 2000 and warned[0]["needed"] > 2000
        assert "VOXRELAY_MAX_CONNECTIONS" in warned[0]["msg"]
    # Caps that fit: no warning.
    async with serve_under_ulimit(
        1024, 2000, VOXRELAY_MAX_CONNECTIONS="1000", VOXRELAY_MAX_STREAMS="100"
    ) as server:
        assert not [line for line in server.lines if line.get("level") == "warning"]


# The demo page


async def test_demo_page_sends_a_content_security_policy(app_factory: AppFactory) -> None:
    app = await app_factory()
    code, headers, body = await http_get(f"http://127.0.0.1:{app.ws_port}/")
    assert code == 200 and b"<script>" in body
    policy = [part.strip() for part in headers["Content-Security-Policy"].split(";")]
    assert "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    # The page's one inline script runs by its hash: nothing injected would.
    script = next(p for p in policy if p.startswith("script-src "))
    assert "'unsafe-inline'" not in script and script.count("'sha256-") == 1


async def test_a_lone_surrogate_from_the_chat_upstream_is_replaced(upstreams: Upstreams) -> None:
    r = upstreams
    r.chat.reply = "Here is a broken \ud800 character. And more."
    async with open_ws(ws_url(r.app)) as ws:
        await send(ws, type="synthesize", text=SHORT, format="pcm")
        frames = await until_end(ws)
    finished = frames[-1]
    assert isinstance(finished, dict) and finished["type"] == "finished", finished
    assert finished["reply_text"] == "Here is a broken \ufffd character. And more."
