"""The processes under test: the fake upstream and voxrelay, pinned, and what they cost.

Each runs as its own child process (see :mod:`bench.children`), started under ``taskset``
so that voxrelay has a core to itself and the fake shares the other with the load generator
(this process). CPU and memory are read from ``/proc/<pid>/stat`` and ``/proc/<pid>/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import children

__all__ = [
    "CPU_GENERATOR",
    "CPU_VOXRELAY",
    "ChildProcess",
    "CpuClock",
    "Pinning",
    "cores_busy",
    "fake_process",
    "floor_process",
    "free_port",
    "pin_self",
    "rss_bytes",
    "voxrelay_process",
]

ROOT = Path(__file__).resolve().parent.parent
#: voxrelay gets core 0; the fake and the load generator share core 1.
CPU_VOXRELAY = 0
CPU_GENERATOR = 1

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_FAKE_URL = re.compile(r"fake OpenAI upstream on (\S+)")
_FLOOR = re.compile(r"floor doors on grpc=(?P<grpc>\S+) ws=(?P<websocket>\S+) http=(?P<http>\S+)")


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which cores each party runs on, or why nothing is pinned."""

    enabled: bool
    voxrelay: tuple[int, ...]
    fake: tuple[int, ...]
    generator: tuple[int, ...]
    note: str = ""

    @classmethod
    def none(cls, why: str) -> Pinning:
        return cls(False, (), (), (), f"not pinned: {why}")

    @classmethod
    def detect(cls) -> Pinning:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2 or shutil.which("taskset") is None:
            why = "fewer than 2 cores" if len(cores) < 2 else "taskset not found"
            return cls(False, tuple(cores), tuple(cores), tuple(cores), f"not pinned: {why}")
        return cls(True, (cores[CPU_VOXRELAY],), (cores[CPU_GENERATOR],), (cores[CPU_GENERATOR],))

    def prefix(self, cores: tuple[int, ...]) -> list[str]:
        """Return the argv prefix that runs a command on *cores*."""
        if not self.enabled:
            return []
        return ["taskset", "-c", ",".join(str(c) for c in cores)]


def pin_self(pinning: Pinning) -> None:
    """Run this process (the load generator) on its cores."""
    if pinning.enabled:
        os.sched_setaffinity(0, set(pinning.generator))


class CpuClock:
    """Read a process's CPU time (user + system, all threads) from /proc."""

    def __init__(self, pid: int | None = None) -> None:
        self.path = f"/proc/{pid or 'self'}/stat"

    def seconds(self) -> float:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except OSError:
            return 0.0
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = raw[raw.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS


class TreeCpuClock(CpuClock):
    """A process's CPU time and that of its live descendants (a supervisor and its workers).

    A descendant's time counts while it lives: the workers of a run outlive its phases.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.pid = pid

    def seconds(self) -> float:
        total, pending = 0.0, [self.pid]
        while pending:
            pid = pending.pop()
            total += CpuClock(pid).seconds()
            try:
                with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
                    pending += [int(x) for x in f.read().split()]
            except OSError:
                pass
        return total


def cores_busy() -> dict[str, float]:
    """Return each core's busy time so far, in seconds (from /proc/stat)."""
    busy = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            busy[name] = (user + nice + system + irq + softirq + steal) / _TICKS
    return busy


def rss_bytes(pid: int | None = None, field_name: str = "VmRSS") -> int:
    """Return a process's resident memory (``VmRSS``, or ``VmHWM`` for the peak)."""
    try:
        with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(slots=True)
class ChildProcess:
    """A started child: its pid, what it told us at start-up, and its stderr lines."""

    name: str
    proc: asyncio.subprocess.Process
    info: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    #: its CPU is its own and its descendants' (``serve --workers N``)
    tree: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def cpu(self) -> CpuClock:
        return TreeCpuClock(self.pid) if self.tree else CpuClock(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def problems(self) -> list[str]:
        """Return the log lines at warning level or above (voxrelay logs JSON lines)."""
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                if json.loads(line).get("level", "").lower() in ("warning", "error", "critical"):
                    out.append(line)
                    continue
            if line.startswith("Traceback"):
                out.append(line)
        return out

    async def stop(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """SIGTERM, wait, SIGKILL its whole process group if it will not go."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                await self.proc.wait()
        children.forget(self.pid)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _start(
    name: str,
    argv: list[str],
    env: dict[str, str],
    *,
    ready: re.Pattern[str],
    timeout: float = 60.0,  # noqa: ASYNC109
) -> ChildProcess:
    """Start *argv* and wait for a stdout line matching *ready*.

    Its named groups are kept as the child's ``info``, else group 1 as ``base_url``.
    """
    proc = await children.spawn(
        name,
        *argv,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    child = ChildProcess(name, proc)
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if len(child.lines) < 10_000:
                child.lines.append(line)
            if not started.done() and (m := ready.search(line)):
                child.info = m.groupdict() or {"base_url": m.group(1)}
                started.set_result(None)

    child.reader = asyncio.create_task(read())
    exited: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
    waiting: list[asyncio.Future[Any]] = [started, exited]
    try:
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if not started.done():
        await child.stop()
        tail = "\n".join(child.lines[-10:])
        raise RuntimeError(f"{name} did not start:\n{tail}")
    return child


async def fake_process(
    pinning: Pinning,
    *,
    ttft_ms: float,
    token_ms: float,
    tts_first_byte_ms: float,
    tts_rtf: float,
    reply: str | None,
    module: str = "fakes.openai_upstream",
    leading_silence_ms: int = 0,
) -> ChildProcess:
    """Start the fake OpenAI upstream (its CLI keeps no history) on a free port.

    *module* is any module with the fake's command line that prints its start-up line.
    """
    argv = [
        *pinning.prefix(pinning.fake),
        sys.executable,
        "-m",
        module,
        "--port",
        "0",
        "--ttft-ms",
        str(ttft_ms),
        "--token-ms",
        str(token_ms),
        "--tts-first-byte-ms",
        str(tts_first_byte_ms),
        "--tts-rtf",
        str(tts_rtf),
        "--leading-silence-ms",
        str(leading_silence_ms),
    ]
    if reply is not None:
        argv += ["--reply", reply]
    return await _start("fake", argv, _clean_env(), ready=_FAKE_URL)


async def floor_process(pinning: Pinning) -> ChildProcess:
    """Start :mod:`bench.floor` on voxrelay's core: each door's hop, with nothing behind it."""
    argv = [
        *pinning.prefix(pinning.voxrelay),
        sys.executable,
        "-m",
        "bench.floor",
        "--grpc-port",
        str(free_port()),
        "--ws-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
    ]
    return await _start("floor", argv, _clean_env(), ready=_FLOOR)


#: The benchmark's limits configuration: every per-client cap raised or off.
BENCH_LIMITS = {
    "VOXRELAY_MAX_STREAMS": "10000",
    "VOXRELAY_MAX_CONNECTIONS": "10000",
    "VOXRELAY_MAX_CONNECTIONS_PER_IP": "10000",
    "VOXRELAY_RATE_LIMIT_PER_MIN": "0",
    "VOXRELAY_CHARS_PER_MIN": "0",
    "VOXRELAY_MAX_STREAMS_PER_KEY": "0",
    # Every load stream asks for the same reply: with the phrase cache on, the load would
    # measure replays, not the upstream path. The cache has a scenario of its own.
    "VOXRELAY_CACHE_MB": "0",
}


def free_port() -> int:
    """Return a TCP port on the loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _ready(ws_port: int, proc: asyncio.subprocess.Process, timeout: float) -> bool:  # noqa: ASYNC109
    """Poll ``GET /readyz`` until it answers 200 or the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.returncode is None:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", ws_port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return True
        await asyncio.sleep(0.1)
    return False


async def voxrelay_process(
    pinning: Pinning,
    upstream: str,
    *,
    extra_env: Mapping[str, str] | None = None,
    tree: bool = False,
) -> ChildProcess:
    """Start ``voxrelay serve`` on free ports against *upstream*, with the bench limits.

    *extra_env* is applied last: it may change the providers or put limits back.

    At log level warning voxrelay does not log its start-up line, so the ports are picked
    here and readiness is polled on ``/readyz``.
    """
    env = _clean_env()
    env.update(BENCH_LIMITS)
    ports = {"grpc": free_port(), "ws": free_port(), "metrics": free_port(), "http": free_port()}
    env.update(
        VOXRELAY_HOST="127.0.0.1",
        VOXRELAY_GRPC_PORT=str(ports["grpc"]),
        VOXRELAY_WS_PORT=str(ports["ws"]),
        VOXRELAY_METRICS_PORT=str(ports["metrics"]),
        VOXRELAY_HTTP_PORT=str(ports["http"]),
        VOXRELAY_LLM="openai",
        VOXRELAY_TTS="openai",
        VOXRELAY_LLM_BASE_URL=upstream,
        VOXRELAY_TTS_BASE_URL=upstream,
        OPENAI_API_KEY="bench",
        VOXRELAY_LOG_LEVEL="warning",
        # Every request is a first turn, on both doors alike.
        VOXRELAY_MEMORY_TURNS="0",
    )
    env.update(extra_env or {})
    argv = [
        *pinning.prefix(pinning.voxrelay),
        sys.executable,
        "-m",
        "voxrelay.gateways.cli",
        "serve",
    ]
    proc = await children.spawn(
        "voxrelay",
        *argv,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    child = ChildProcess("voxrelay", proc, tree=tree)

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            if len(child.lines) < 10_000:
                child.lines.append(raw.decode(errors="replace").rstrip())

    child.reader = asyncio.create_task(read())
    if not await _ready(ports["ws"], proc, 60.0):
        await child.stop()
        tail = "\n".join(child.lines[-10:])
        raise RuntimeError(f"voxrelay did not become ready:\n{tail}")
    child.info = {
        "grpc": f"127.0.0.1:{ports['grpc']}",
        "websocket": f"ws://127.0.0.1:{ports['ws']}/v1/stream",
        "http": f"http://127.0.0.1:{ports['http']}/v1",
        "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics",
    }
    return child
