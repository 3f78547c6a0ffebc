"""``voxrelay serve --workers 2``: the real supervisor and its workers, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import connect

from tests.servers import ROOT, ends, ready_pids, scrape, value, workers_process
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

WAIT = 60.0
#: Connections per door: each is a fresh 4-tuple the kernel hashes to one worker, so all of
#: them landing on one of two workers has a chance of 2**-(REQUESTS-1).
REQUESTS = 16
LONG = " ".join(f"Sentence number {i} is spoken while the workers drain." for i in range(12))
PROMTOOL = shutil.which("promtool")


async def speak_grpc(
    target: str, text: str = "Hello there.", key: str | None = None
) -> list[pb.SynthesizeResponse]:
    # grpc shares one connection among channels to a target unless told not to.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        request = pb.SynthesizeRequest(text=text, mode=pb.MODE_SPEAK)
        metadata = [("authorization", f"Bearer {key}")] if key else None
        return [r async for r in stub.Synthesize(request, timeout=WAIT, metadata=metadata)]


async def speak_ws(url: str, text: str = "Hello there.") -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with connect(url, compression=None, max_size=None, open_timeout=WAIT) as ws:
        await ws.send(json.dumps({"type": "synthesize", "id": "a", "text": text, "mode": "speak"}))
        async with asyncio.timeout(WAIT):
            async for message in ws:
                if isinstance(message, str):
                    frames.append(json.loads(message))
                    if frames[-1]["type"] in ("finished", "error", "cancelled"):
                        break
    return frames


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - a log line has no event to await
            await asyncio.sleep(0.02)


async def test_two_workers_serve_both_doors_behind_one_metrics() -> None:
    async with workers_process(2) as server:
        assert server.startup["workers"] == 2
        grpc_port = server.grpc_target.rpartition(":")[2]
        assert grpc_port != "0" and server.ws_url.split(":")[2] != "0/v1/stream"
        grpc_replies = await asyncio.gather(
            *(speak_grpc(server.grpc_target) for _ in range(REQUESTS))
        )
        # One at a time: an open WebSocket door allows a client address 4 streams at once.
        ws_replies = [await speak_ws(server.ws_url) for _ in range(REQUESTS)]
        assert all(r[-1].HasField("finished") for r in grpc_replies)
        assert all(r[-1]["type"] == "finished" for r in ws_replies)

        await eventually(lambda: len(ends(server)) >= 2 * REQUESTS)
        for protocol in ("grpc", "ws"):
            served_by = {line["worker"] for line in ends(server) if line["protocol"] == protocol}
            assert served_by == {0, 1}, protocol

        text = scrape(server)
        for protocol in ("grpc", "ws"):
            labels = {"protocol": protocol, "mode": "speak", "outcome": "ok"}
            assert value(text, "voxrelay_requests_total", **labels) == REQUESTS
            assert value(text, "voxrelay_time_to_first_audio_seconds_count", protocol=protocol) == (
                REQUESTS
            )
            assert value(text, "voxrelay_active_streams", protocol=protocol) == 0
        assert value(text, "voxrelay_workers") == 2
        assert value(text, "voxrelay_build_info", version=server.startup["version"]) == 1
        assert 'pid="' not in text  # every gauge has a mode that folds the workers together
        if PROMTOOL is not None:
            check = promtool_check(text)
            assert check.returncode == 0, check.stdout + check.stderr
        metrics_dir = str(server.startup["metrics_dir"])
        assert await asyncio.to_thread(os.path.isdir, metrics_dir)

        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    assert not await asyncio.to_thread(os.path.exists, metrics_dir)


async def test_a_killed_worker_is_replaced_while_the_other_serves() -> None:
    async with workers_process(2) as server:
        [victim] = ready_pids(server)[0]
        os.kill(victim, signal.SIGKILL)
        # Once it is gone (a connection the kernel queued on its listener dies with it),
        # new connections reach the worker left until the replacement is ready.
        exit_line = await server.wait_for_event("worker_exit")
        assert exit_line["worker_index"] == 0 and exit_line["exit"] == "signal SIGKILL"
        replies = [await speak_ws(server.ws_url) for _ in range(4)]
        assert all(r[-1]["type"] == "finished" for r in replies)
        await eventually(lambda: len(ready_pids(server)[0]) == 2)
        assert ready_pids(server)[0][1] != victim

        grpc_replies = await asyncio.gather(
            *(speak_grpc(server.grpc_target) for _ in range(REQUESTS))
        )
        assert all(r[-1].HasField("finished") for r in grpc_replies)
        await eventually(lambda: len(ends(server)) >= 4 + REQUESTS)
        replacement = {line["worker"] for line in ends(server)[4:] if line["protocol"] == "grpc"}
        assert replacement == {0, 1}
        text = scrape(server)
        assert value(text, "voxrelay_worker_restarts_total") == 1
        assert value(text, "voxrelay_workers") == 2
        # The dead worker's streams still count; its gauges are gone with it.
        ok = {"protocol": "ws", "mode": "speak", "outcome": "ok"}
        assert value(text, "voxrelay_requests_total", **ok) == 4


async def test_sigterm_drains_every_worker_and_a_second_changes_nothing() -> None:
    async with workers_process(2, VOXRELAY_DRAIN_S="30") as server:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(
                pb.SynthesizeRequest(text=LONG, mode=pb.MODE_SPEAK), timeout=WAIT
            )
            assert (await call.read()).HasField("started")
            server.signal(signal.SIGTERM)
            await server.wait_for_event("drain")
            server.signal(signal.SIGTERM)
            rest = []
            while (response := await call.read()) is not grpc.aio.EOF:
                rest.append(response)
        assert rest[-1].HasField("finished")
        assert rest[-1].finished.segments >= 2
        assert await server.wait() == 0
    messages = [line.get("msg", "") for line in server.lines]
    assert "SIGTERM again: the drain goes on" in messages
    assert not any(line.get("event") == "worker_exit" for line in server.lines)
    # Each worker drained and stopped, then the supervisor.
    stopped = [line.get("worker") for line in server.lines if line.get("event") == "shutdown"]
    assert sorted(stopped, key=str) == [0, 1, None]


async def test_sigterms_up_to_the_exit_change_nothing() -> None:
    # A process-group SIGTERM may come again at any moment of the stop, its very end included
    # (a deployment's teardown, a second Ctrl-C): the exit is still the drain's clean one.
    async with workers_process(2) as server:
        metrics_dir = str(server.startup["metrics_dir"])
        assert server.proc is not None

        async def keep_signalling() -> None:
            while server.proc is not None and server.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    server.signal(signal.SIGTERM)
                await asyncio.sleep(0.005)

        signalling = asyncio.create_task(keep_signalling())
        try:
            assert await server.wait() == 0
        finally:
            signalling.cancel()
    assert not await asyncio.to_thread(os.path.exists, metrics_dir)


async def run_failing(*args: str, **env_overrides: str) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env.update(VOXRELAY_GRPC_PORT="0", VOXRELAY_WS_PORT="0", VOXRELAY_METRICS_PORT="0")
    env.update(VOXRELAY_HTTP_PORT="0")
    env.update(env_overrides)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voxrelay.gateways.cli",
        "serve",
        *args,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, err.decode().strip().splitlines()


async def test_a_port_in_use_stops_the_supervisor_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = await run_failing("--workers", "2", VOXRELAY_WS_PORT=str(port))
    assert code == 1
    assert lines == [
        f"voxrelay: cannot start: the WebSocket port 127.0.0.1:{port} is in use (another"
        " voxrelay?): stop it, or set VOXRELAY_WS_PORT (0 picks a free port)"
    ]


async def test_a_worker_that_keeps_failing_to_start_stops_the_supervisor(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("worker-test-key\n")
    async with workers_process(2, VOXRELAY_API_KEYS_FILE=str(keys)) as server:
        keys.unlink()  # a replacement cannot read its keys: it must not serve an open door
        os.kill(ready_pids(server)[0][0], signal.SIGKILL)
        assert await server.wait(120) == 1
    exits = [line for line in server.lines if line.get("event") == "worker_exit"]
    assert [line["restart_in_s"] for line in exits] == [0.5, 1.0, 2.0, 4.0]
    assert len(ready_pids(server)[0]) == 1  # no replacement ever served
    assert server.lines[-1] == {
        "raw": f"voxrelay: worker 0 cannot start: VOXRELAY_API_KEYS_FILE {str(keys)!r} cannot be"
        " read: No such file or directory; it failed to start 4 times in a row"
    }


async def test_sighup_reloads_the_keys_of_every_worker(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("worker-old-key\n")
    limits = {"VOXRELAY_MAX_STREAMS_PER_KEY": "0"}  # per worker: 4 each, 16 at once here
    async with workers_process(2, VOXRELAY_API_KEYS_FILE=str(keys), **limits) as server:
        assert (await speak_grpc(server.grpc_target, key="worker-old-key"))[-1].HasField("finished")
        keys.write_text("worker-new-key\n")
        server.signal(signal.SIGHUP)

        def reloaded() -> set[int]:
            loaded = [line for line in server.lines if line.get("msg") == "API keys loaded"]
            return {line["worker"] for line in loaded[2:]}  # after each worker's first load

        await eventually(lambda: reloaded() == {0, 1})
        replies = await asyncio.gather(
            *(speak_grpc(server.grpc_target, key="worker-new-key") for _ in range(REQUESTS))
        )
        assert all(r[-1].HasField("finished") for r in replies)
        await eventually(lambda: len(ends(server)) >= 1 + REQUESTS)
        assert {line["worker"] for line in ends(server)[1:]} == {0, 1}
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await speak_grpc(server.grpc_target, key="worker-old-key")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_workers_drain_and_exit_when_the_supervisor_is_killed() -> None:
    async with workers_process(2) as server:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        # Their log lines share the supervisor's stderr: it closes once both have exited.
        assert await server.wait() == -signal.SIGKILL
    stopped = {line.get("worker") for line in server.lines if line.get("event") == "shutdown"}
    assert stopped == {0, 1}


async def test_a_worker_that_cannot_listen_stops_the_supervisor_with_one_line(
    tmp_path: Path,
) -> None:
    # grpc binds the port first and reads the certificate as it listens: this one it cannot use.
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    code, lines = await run_failing(
        "--workers", "2", VOXRELAY_TLS_CERT=str(garbage), VOXRELAY_TLS_KEY=str(garbage)
    )
    assert code == 1
    assert lines[-1].startswith("voxrelay: worker ")
    assert " cannot start: " in lines[-1] and "cannot listen for gRPC" in lines[-1]
    assert not any('"worker_exit"' in line for line in lines)  # no restart at the first start
