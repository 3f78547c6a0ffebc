"""voxrelay as a user runs it: the real process, its CLI, its signals."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.servers import ROOT, ServerProcess, serve_process
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

LONG = " ".join(f"Sentence number {i} is spoken while the server drains." for i in range(12))


async def check_health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return int(reply.status)


async def test_make_run_serves_and_answers_health() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env.update(
        VOXRELAY_GRPC_PORT="0", VOXRELAY_WS_PORT="0", VOXRELAY_METRICS_PORT="0", MAKEFLAGS="-s"
    )
    env.update(VOXRELAY_HTTP_PORT="0")
    async with ServerProcess(["make", "--no-print-directory", "run"], env) as server:
        assert server.startup["llm"] == "echo" and server.startup["tts"] == "espeak"
        assert "no API key" in server.startup["llm_reason"]
        assert await check_health(server.grpc_target) == health_pb2.HealthCheckResponse.SERVING


async def test_say_writes_a_file_that_decodes(tmp_path: Path) -> None:
    async with serve_process() as server:
        out = tmp_path / "hello.mp3"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "voxrelay.gateways.cli",
            "say",
            "--mode",
            "speak",
            "Hello world. This is voxrelay.",
            "-o",
            str(out),
            "--server",
            server.grpc_target,
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert b"time to first audio" in err
        with av.open(io.BytesIO(out.read_bytes()), format="mp3") as container:
            seconds = sum(f.samples for f in container.decode(audio=0)) / 22050
        assert 1.0 < seconds < 4.0


async def test_sigterm_drains_a_stream_in_flight() -> None:
    async with serve_process(VOXRELAY_DRAIN_S="30") as server:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(
                pb.SynthesizeRequest(text=LONG, mode=pb.MODE_SPEAK), timeout=60
            )
            assert (await call.read()).HasField("started")
            server.signal(signal.SIGTERM)
            rest = []
            while (response := await call.read()) is not grpc.aio.EOF:
                rest.append(response)
        assert rest[-1].HasField("finished")
        assert rest[-1].finished.segments >= 2
        assert await server.wait() == 0
        events = [line.get("event") for line in server.lines]
        assert "drain" in events and "shutdown" in events


async def test_a_second_sigterm_does_not_cut_the_drain_short() -> None:
    # `kill -TERM -PGID` of `make run` delivers two: make passes its own on to the server.
    async with serve_process(VOXRELAY_DRAIN_S="30") as server:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(
                pb.SynthesizeRequest(text=LONG, mode=pb.MODE_SPEAK), timeout=60
            )
            assert (await call.read()).HasField("started")
            server.signal(signal.SIGTERM)
            await server.wait_for_event("drain")
            server.signal(signal.SIGTERM)
            rest = []
            while (response := await call.read()) is not grpc.aio.EOF:
                rest.append(response)
        assert rest[-1].HasField("finished")
        assert await server.wait() == 0
        events = [line.get("event") for line in server.lines]
        assert "drain" in events and events[-1] == "shutdown"


async def test_a_second_ctrl_c_ends_the_drain_at_once() -> None:
    async with serve_process(VOXRELAY_DRAIN_S="60") as server:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(
                pb.SynthesizeRequest(text=LONG, mode=pb.MODE_SPEAK), timeout=60
            )
            assert (await call.read()).HasField("started")
            server.signal(signal.SIGINT)
            await server.wait_for_event("drain")
            server.signal(signal.SIGINT)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while await call.read() is not grpc.aio.EOF:
                    pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await server.wait() == 0
        messages = [line.get("msg", "") for line in server.lines]
        assert any(m.startswith("interrupted again; ending 1 streams") for m in messages)
        assert server.lines[-1].get("event") == "shutdown"


async def test_bad_setting_stops_startup_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env["VOXRELAY_MAX_INPUT_CHARS"] = "zero"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voxrelay.gateways.cli",
        "serve",
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "VOXRELAY_MAX_INPUT_CHARS" in lines[0]
