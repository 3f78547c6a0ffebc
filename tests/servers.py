"""Start voxrelay for a test: the real app on free ports, or the real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from voxrelay.gateways.app import App
from voxrelay.service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test server: loopback, free ports, embedded providers, no .env."""
    values: dict[str, Any] = dict(
        host="127.0.0.1",
        grpc_port=0,
        ws_port=0,
        metrics_port=0,
        http_port=0,
        # Off: a repeated text would be replayed, not spoken. Tests of the cache turn it on.
        cache_mb=0,
        llm="echo",
        tts="espeak",
        # Tests that count an engine's bytes see them untouched; the trimming's own tests
        # (tests/unit/test_silence.py) turn it on.
        trim_silence=False,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def running_app(settings: Settings | None = None, **overrides: Any) -> AsyncIterator[App]:
    """Run the whole app (gRPC, WebSocket, metrics) in this event loop."""
    app = App(settings or make_settings(**overrides))
    await app.start()
    try:
        yield app
    finally:
        await app.drain_and_stop()


class ServerProcess:
    """``voxrelay serve`` (or ``make run``) as a child process, ports read from its log."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.startup: dict[str, Any] = {}
        self.lines: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._line = asyncio.Event()

    async def __aenter__(self) -> ServerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())
        waiter = asyncio.create_task(self._started.wait())
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({waiter, exited}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        exited.cancel()
        if not self._started.is_set():
            await self.__aexit__()
            raise RuntimeError(f"server did not start: {self.lines[-5:]}")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"raw": raw.decode(errors="replace").rstrip()}
            self.lines.append(line)
            self._line.set()
            self._line = asyncio.Event()
            if line.get("event") == "startup":
                self.startup = line
                self._started.set()

    async def wait_for_line(
        self, matches: Callable[[dict[str, Any]], bool], limit: float = 30
    ) -> dict[str, Any]:
        """Wait for the first log line that *matches*; return it."""
        async with asyncio.timeout(limit):
            while True:
                for line in self.lines:
                    if matches(line):
                        return line
                await self._line.wait()

    async def wait_for_event(self, event: str, limit: float = 30) -> dict[str, Any]:
        """Wait for the first log line whose ``event`` is *event*; return it."""
        return await self.wait_for_line(lambda line: line.get("event") == event, limit)

    @property
    def grpc_target(self) -> str:
        return str(self.startup["grpc"])

    @property
    def ws_url(self) -> str:
        return str(self.startup["websocket"])

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group (``make run`` and the server it started)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    async def wait(self, limit: float = 60) -> int:
        """Wait for the process to exit and its log to be read; return the exit code."""
        assert self.proc is not None
        async with asyncio.timeout(limit):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await self.wait(30)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()


def serve_process(**env_overrides: str) -> ServerProcess:
    """``voxrelay serve`` on free ports with the embedded providers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env.update(VOXRELAY_GRPC_PORT="0", VOXRELAY_WS_PORT="0", VOXRELAY_METRICS_PORT="0")
    env.update(VOXRELAY_HTTP_PORT="0", VOXRELAY_CACHE_MB="0")  # as make_settings does
    env.update(env_overrides)
    return ServerProcess([sys.executable, "-m", "voxrelay.gateways.cli", "serve"], env)


def workers_process(count: int = 2, *args: str, **env_overrides: str) -> ServerProcess:
    """``voxrelay serve --workers COUNT`` (a supervisor and its workers) on free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(VOXRELAY_GRPC_PORT="0", VOXRELAY_WS_PORT="0", VOXRELAY_METRICS_PORT="0")
    env.update(VOXRELAY_HTTP_PORT="0", VOXRELAY_CACHE_MB="0")  # as make_settings does
    env.update(env_overrides)
    argv = [sys.executable, "-m", "voxrelay.gateways.cli", "serve", "--workers", str(count)]
    return ServerProcess([*argv, *args], env)


def ready_pids(server: ServerProcess) -> dict[int, list[int]]:
    """Each worker index's pids, in the order they became ready."""
    pids: dict[int, list[int]] = {}
    for line in server.lines:
        if line.get("event") == "worker_ready":
            pids.setdefault(line["worker_index"], []).append(line["pid"])
    return pids


def ends(server: ServerProcess) -> list[dict[str, Any]]:
    """The server's ``stream_end`` log lines so far."""
    return [line for line in server.lines if line.get("event") == "stream_end"]


def scrape(server: ServerProcess) -> str:
    """The server's ``/metrics`` (blocking: from a coroutine, call it in a thread)."""
    with urllib.request.urlopen(server.startup["metrics"], timeout=10) as response:
        return str(response.read().decode())


def value(text: str, name: str, **labels: str) -> float:
    """The sample *name* with *labels* in a Prometheus exposition *text*."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")
