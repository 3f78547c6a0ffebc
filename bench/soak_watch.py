"""Watch voxrelay during the soak run: its process (from /proc) and its gauges (``/metrics``).

:class:`Watch` scrapes ``/metrics`` every second (a circuit breaker may open and close
between two samples) and takes a :class:`Point` every ``every_s``: RSS and open descriptors
(all, and those that are not callers' connections) of voxrelay and every process under it,
its threads, its event loop's tasks, streams in flight, and the normal clients' time to first
audio over that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from .load import percentiles
from .soak_clients import Outcome

__all__ = ["Point", "ProcessTree", "Watch", "scrape"]


async def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Return every sample of ``/metrics`` as ``name{label="v",...}`` → value."""
    parts = urlsplit(url)
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(
                f"GET {parts.path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode()
            )
            raw = await reader.read()
        finally:
            writer.close()
    _, _, body = raw.partition(b"\r\n\r\n")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _total(metrics: dict[str, float], name: str) -> float | None:
    values = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


class ProcessTree:
    """A process and all its descendants, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        parents: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += parents.get(pid, [])
        return found

    @staticmethod
    def status(pid: int, key: str) -> int:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    @staticmethod
    def fds(pid: int) -> list[str]:
        """Return what each open descriptor points at (``socket:[inode]``, a path, ...)."""
        out: list[str] = []
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return out
        for name in names:
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        return out


_TCP_LISTEN = "0A"


def tcp_sockets() -> dict[str, tuple[int, str]]:
    """Return every TCP socket of this network namespace: ``socket:[inode]`` → (local port,
    state as /proc/net/tcp writes it)."""
    out: dict[str, tuple[int, str]] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            out[f"socket:[{fields[9]}]"] = (port, fields[3])
    return out


@dataclass(slots=True)
class Point:
    """One sample; times are seconds since the watch started."""

    t: float
    phase: str
    rss_mb: float
    #: voxrelay's own process, without its espeak workers.
    main_rss_mb: float
    fds: int
    #: descriptors other than the callers' connections (listeners, upstream pool, files...).
    own_fds: int
    threads: int
    processes: int
    tasks: float | None
    active_streams: float | None
    grpc_streams: float | None
    ws_connections: float | None
    normal_ok: int
    normal_failed: int
    ttfa_p50_ms: float | None
    ttfa_p99_ms: float | None

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Watch:
    """Sample voxrelay while the run goes on."""

    pid: int
    metrics_url: str
    outcomes: Callable[[], Sequence[Outcome]]
    #: voxrelay's listening ports: a descriptor connected on one of them is a caller's.
    ports: frozenset[int]
    every_s: float = 10.0
    phase: str = "start"
    points: list[Point] = field(default_factory=list)
    #: (seconds since start, series) for each breaker seen open.
    breaker_opened: list[tuple[float, str]] = field(default_factory=list)
    scrape_errors: int = 0
    last: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _seen_outcomes: int = 0

    def now(self) -> float:
        return time.monotonic() - self.started

    async def poll(self) -> None:
        """Scrape once; note any breaker that is open."""
        try:
            self.last = await scrape(self.metrics_url)
        except (OSError, TimeoutError, ValueError):
            self.scrape_errors += 1
            return
        for key, value in self.last.items():
            if key.startswith("voxrelay_breaker_open{") and value > 0:
                self.breaker_opened.append((self.now(), key))

    def sample(self) -> Point:
        """Take one point from /proc, the last scrape and the outcomes since the last point."""
        tree = ProcessTree(self.pid)
        pids = tree.pids()
        done = self.outcomes()
        fresh, self._seen_outcomes = done[self._seen_outcomes :], len(done)
        ttfas = [o.ttfa for o in fresh if o.ttfa is not None]
        stats = percentiles(ttfas)
        targets = [t for p in pids for t in tree.fds(p)]
        tcp = tcp_sockets()
        callers = sum(
            1 for t in targets if t in tcp and tcp[t][0] in self.ports and tcp[t][1] != _TCP_LISTEN
        )
        point = Point(
            t=round(self.now(), 1),
            phase=self.phase,
            rss_mb=round(sum(tree.status(p, "VmRSS") for p in pids) / 1024, 1),
            main_rss_mb=round(tree.status(self.pid, "VmRSS") / 1024, 1),
            fds=len(targets),
            own_fds=len(targets) - callers,
            threads=tree.status(self.pid, "Threads"),
            processes=len(pids),
            tasks=self.last.get("voxrelay_event_loop_tasks"),
            active_streams=_total(self.last, "voxrelay_active_streams"),
            grpc_streams=self.last.get('voxrelay_active_streams{protocol="grpc"}'),
            ws_connections=self.last.get("voxrelay_ws_connections"),
            normal_ok=sum(o.error is None for o in fresh),
            normal_failed=sum(o.error is not None for o in fresh),
            ttfa_p50_ms=stats["p50"],
            ttfa_p99_ms=stats["p99"],
        )
        self.points.append(point)
        return point

    async def run(self, on_point: Callable[[Point], None]) -> None:
        """Poll every second and sample every ``every_s`` until cancelled."""
        next_point = self.now()
        while True:
            await self.poll()
            if self.now() >= next_point:
                on_point(self.sample())
                next_point += self.every_s
            await asyncio.sleep(1.0)

    async def settle(self, limit_s: float) -> Point:
        """Wait (at most *limit_s*) for voxrelay to have no stream in flight; sample then."""
        deadline = self.now() + limit_s
        while self.now() < deadline:
            await self.poll()
            if not _total(self.last, "voxrelay_active_streams"):
                break
            await asyncio.sleep(1.0)
        with contextlib.suppress(Exception):
            await self.poll()
        return self.sample()
