"""Streamed input from the caller's side: ``Client.synthesize_stream`` and ``say --stream``."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import av
import pytest

from fakes.openai_upstream import FakeOpenAI, Latency
from tests.conftest import AppFactory
from tests.servers import ROOT
from voxrelay.client import FLUSH, AudioChunk, Client, Flush, SegmentStarted, StreamFinished
from voxrelay.gateways.app import App

VIAS = ["grpc", "ws"]
FIRST, REST = "Hello world. This is", " the rest, written after the first audio came back."
WAIT = 20.0


def target(app: App, via: str) -> str:
    return f"127.0.0.1:{app.grpc_port if via == 'grpc' else app.ws_port}"


async def wait_until(predicate: object, within: float = WAIT) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110 - a file, no event
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("via", VIAS)
async def test_client_speaks_pieces_while_they_are_written(
    app_factory: AppFactory, via: str
) -> None:
    app = await app_factory()
    heard = asyncio.Event()
    sent_rest_after_audio: list[bool] = []

    async def pieces() -> AsyncIterator[str | Flush]:
        for ch in FIRST:
            yield ch
        await asyncio.wait_for(heard.wait(), WAIT)
        sent_rest_after_audio.append(True)
        yield REST
        yield FLUSH
        yield " Bye."

    segments: list[str] = []
    finished = None
    async with Client(target(app, via), via=via) as client:  # type: ignore[arg-type]
        async for event in client.synthesize_stream(pieces(), format="wav"):
            if isinstance(event, AudioChunk):
                heard.set()
            elif isinstance(event, SegmentStarted):
                segments.append(event.text)
            elif isinstance(event, StreamFinished):
                finished = event
        assert sent_rest_after_audio == [True]
        assert segments == ["Hello world.", "This is" + REST, "Bye."]
        assert finished is not None and finished.reply_text == FIRST + REST + " Bye."

        # A failing source cancels the stream and its error comes out; the client goes on.
        async def broken() -> AsyncIterator[str]:
            yield "Some words. "
            yield "More words."
            raise ValueError("the source broke")

        with pytest.raises(ValueError, match="the source broke"):
            async for _ in client.synthesize_stream(broken()):
                pass
        events = [e async for e in client.synthesize("Next one.", mode="speak")]
        assert isinstance(events[-1], StreamFinished)
    await wait_until(lambda: app.runtime.active_streams == 0)


@pytest.mark.parametrize("via", VIAS)
async def test_say_stream_speaks_stdin_as_it_is_piped(
    app_factory: AppFactory, tmp_path: Path, via: str
) -> None:
    app = await app_factory()
    out = tmp_path / "reply.mp3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxrelay.gateways.cli", "say", "--stream", "-",
        "--via", via, "--server", target(app, via), "-o", str(out),
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(FIRST.encode())
    await proc.stdin.drain()
    # The first sentence is spoken (the file holds audio) before the rest is written.
    await wait_until(lambda: out.exists() and out.stat().st_size > 0)
    proc.stdin.write(REST.encode())
    proc.stdin.close()
    _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    assert "in 2 segments" in err.decode()
    with av.open(io.BytesIO(out.read_bytes()), format="mp3") as container:
        assert sum(f.samples for f in container.decode(audio=0)) > 0


async def test_say_stream_refuses_text_and_chat() -> None:
    for args in (["say", "--stream", "Hello"], ["say", "--stream", "--mode", "chat", "-"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxrelay.gateways.cli", *args, "-o", "/dev/null",
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 2 and "--stream" in err.decode()


async def test_the_llm_example_speaks_a_chat_stream(
    app_factory: AppFactory, tmp_path: Path
) -> None:
    app = await app_factory()
    async with FakeOpenAI(latency=Latency(ttft_s=0.05, token_s=0.005)) as llm:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
        env.update(
            OPENAI_API_KEY="sk-example",
            OPENAI_BASE_URL=llm.base_url,
            VOXRELAY_TARGET=target(app, "grpc"),
            OUT=str(tmp_path / "reply.mp3"),
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "examples/llm_to_speech.py", "How much is a ticket?",
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    assert "segments →" in out.decode() and len(llm.chat_requests) == 1
    with av.open(io.BytesIO((tmp_path / "reply.mp3").read_bytes()), format="mp3") as container:
        assert sum(f.samples for f in container.decode(audio=0)) > 0
