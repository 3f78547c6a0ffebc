"""Sample voxrelay's stacks with py-spy during a phase, and say where its CPU went.

py-spy is optional (``pip install py-spy``); ``--nonblocking`` because ptrace-stopping the
process is not allowed everywhere and would disturb the timings anyway.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import children

__all__ = ["Profiler", "summarise"]

_LINE = re.compile(r":\d+\)$")
#: Frames every sample of the main thread shares: they say nothing about the work.
_TRIVIAL = (
    "<frozen runpy>",
    "gateways/cli.py",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "threading.py",
)


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` on *pid* for *seconds*, writing collapsed stacks to *path*."""

    def __init__(
        self, pid: int, path: Path, seconds: float, rate: int = 100, prefix: Sequence[str] = ()
    ) -> None:
        self.pid = pid
        self.prefix = list(prefix)  # e.g. taskset, to keep py-spy off voxrelay's core
        self.path = path
        self.seconds = seconds
        self.rate = rate
        self._proc: asyncio.subprocess.Process | None = None

    @staticmethod
    def available() -> bool:
        return _py_spy() is not None

    async def start(self) -> None:
        exe = _py_spy()
        if exe is None:
            return
        self._proc = await children.spawn(
            "py-spy",
            *self.prefix,
            exe,
            "record",
            "--nonblocking",
            "--threads",
            "-p",
            str(self.pid),
            "-d",
            str(max(1, round(self.seconds))),
            "-r",
            str(self.rate),
            "-f",
            "raw",
            "-o",
            str(self.path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait(self) -> bool:
        if self._proc is None:
            return False
        try:
            await asyncio.wait_for(self._proc.wait(), self.seconds + 30)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        children.forget(self._proc.pid)
        return self.path.exists()


#: Where a sample's CPU went, by the first of these its stack holds (most specific first).
_FRAMING = (
    "gateways/grpc_server.py",
    "gateways/ws_server.py",
    "gateways/ws_frames.py",
    "grpc/aio/",
    "grpc/_cython",
    "websockets/",
    "_poll_wrapper",
)
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("encoding", ("service/audio.py", "EncoderRunner", "(av/")),
    ("framing", _FRAMING),
    ("chat parsing", ("openai_chat.py", "_write (", "_text (", "service/chunker.py")),
    ("tts relay", ("openai_speech.py", "_speak (")),
    (
        "pipeline",
        (
            "service/pipeline.py",
            "service/output.py",
            "service/resilience.py",
            "service/synthesizer.py",
            "service/relay.py",
        ),
    ),
)
OTHER_STAGE = "event loop and other"


def stage_of(frames: Sequence[str]) -> str:
    """Name the stage a sample's stack belongs to (:data:`STAGES`)."""
    for name, markers in STAGES:
        if any(marker in frame for frame in frames for marker in markers):
            return name
    return OTHER_STAGE


def summarise(path: Path, top: int = 30) -> dict[str, Any]:
    """Read collapsed stacks; return stage shares and the heaviest frames, in %."""
    stages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        stages[stage_of(frames)] += n
        threads[re.sub(r"\s*\(\d+\)", "", frames[0])] += n
        leaf[frames[-1]] += n
        seen = set()
        for frame in frames[1:]:
            key = _LINE.sub(")", frame)
            if key in seen or any(t in key for t in _TRIVIAL):
                continue
            seen.add(key)
            inclusive[key] += n

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "pct": round(100 * n / total, 1)} for f, n in counter.most_common(top)]

    return {
        "samples": total,
        "stages": [
            {"stage": name, "pct": round(100 * stages[name] / total, 1) if total else 0.0}
            for name in [*(n for n, _ in STAGES), OTHER_STAGE]
        ],
        "threads": rows(threads) if total else [],
        "inclusive": rows(inclusive) if total else [],
        "self": rows(leaf) if total else [],
    }
