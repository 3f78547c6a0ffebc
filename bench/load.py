"""Drive clients at a fixed concurrency and measure them and the processes under test.

A *phase* keeps each group's ``streams`` requests in flight: a worker sends its next
request as soon as the previous one ended. Workers start spread over a ramp, so that
the upstream is not hit by one burst; only requests started inside the measurement
window that follows count, and the processes' CPU is read over that window.

Probe groups (limit and naive probes beside voxrelay's streams) start with the window,
so they see the upstream at exactly the load voxrelay puts on it.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .clients import VOXRELAY_KINDS, Sample
from .procs import ChildProcess, CpuClock, cores_busy

__all__ = [
    "Client",
    "Group",
    "Meter",
    "PhaseResult",
    "percentiles",
    "run_interleaved",
    "run_sequence",
    "run_window",
]


class Client(Protocol):
    kind: str

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None: ...

    async def aclose(self) -> None: ...


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """Return p50/p95/p99, mean, min and max of *values* (times *scale*, e.g. s → ms)."""
    keys = ("p50", "p95", "p99", "mean", "min", "max")
    if not values:
        return dict.fromkeys(keys)
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = (len(ordered) - 1) * q
        low, high = math.floor(pos), math.ceil(pos)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    raw = (at(0.50), at(0.95), at(0.99), sum(ordered) / len(ordered), ordered[0], ordered[-1])
    return {k: round(v * scale, 2) for k, v in zip(keys, raw, strict=True)}


class Meter:
    """Watch the processes during a phase: CPU between marks, peak RSS, loop lag here."""

    def __init__(self, voxrelay: ChildProcess | None, fake: ChildProcess | None) -> None:
        self.voxrelay = voxrelay
        self.clocks = {"generator": CpuClock()}
        if voxrelay is not None:
            self.clocks["voxrelay"] = voxrelay.cpu
        if fake is not None:
            self.clocks["fake"] = fake.cpu
        self.rss_max = 0
        self.lags: list[float] = []
        self._marks: dict[str, dict[str, float]] = {}
        self._task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        self.lags.clear()
        self.rss_max = 0
        self._marks.clear()

    def mark(self, name: str) -> None:
        """Note every process's CPU time, each core's busy time and the wall time."""
        snap = {k: c.seconds() for k, c in self.clocks.items()}
        snap.update(cores_busy())
        snap["wall"] = time.perf_counter()
        self._marks[name] = snap

    def elapsed(self, start: str, end: str) -> float:
        return self._marks[end]["wall"] - self._marks[start]["wall"]

    def cpu_pct(self, start: str, end: str) -> dict[str, float]:
        """Return CPU between two marks in % of one core: each process, each core, and
        ``other``: what the rest of the machine used (a busy neighbour skews a run)."""
        a, b = self._marks[start], self._marks[end]
        wall = max(b["wall"] - a["wall"], 1e-9)
        out = {k: round(100 * (b[k] - a[k]) / wall, 1) for k in a if k != "wall"}
        ours = sum(out[k] for k in self.clocks)
        cores = sum(v for k, v in out.items() if k.startswith("cpu"))
        out["other"] = round(max(0.0, cores - ours), 1)
        return out

    def cpu_seconds(self, start: str, end: str, who: str) -> float:
        if who not in self.clocks:
            return 0.0
        return self._marks[end][who] - self._marks[start][who]

    async def __aenter__(self) -> Meter:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        tick = 0.01
        next_rss = 0.0
        while True:
            before = time.perf_counter()
            await asyncio.sleep(tick)
            after = time.perf_counter()
            self.lags.append(after - before - tick)
            if self.voxrelay is not None and after >= next_rss:
                self.rss_max = max(self.rss_max, self.voxrelay.rss())
                next_rss = after + 0.25


@dataclass(frozen=True, slots=True)
class Group:
    """*streams* workers of one client; probes stop at the first audio byte.

    A *paced* worker is a listener: it sends its next request once the audio of the
    last one has played out in real time, so N paced workers are N concurrent streams
    of speech, not N clients fetching audio as fast as the upstream makes it.
    """

    client: Client
    streams: int
    probe: bool = False
    fmt: str = "pcm"
    paced: bool = True

    @property
    def kind(self) -> str:
        return self.client.kind


@dataclass(slots=True)
class PhaseResult:
    """What one phase measured: samples per client kind, and the processes' costs."""

    streams: int
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    #: voxrelay's CPU over the whole phase, and the audio it relayed meanwhile.
    voxrelay_cpu_s: float = 0.0
    relayed_audio_s: float = 0.0
    rss_max: int = 0
    loop_lag: dict[str, float | None] = field(default_factory=dict)
    window_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


async def run_window(
    groups: Sequence[Group],
    *,
    ramp_s: float,
    window_s: float,
    meter: Meter,
    drain_s: float = 30.0,
) -> PhaseResult:
    """Keep every group's streams in flight through a window that follows a ramp.

    Requests still running *drain_s* after the window are cancelled and count as
    ``unfinished`` errors.
    """
    gc.collect()  # what the last phase left, before anything is timed (see bench.run)
    main = max(g.streams for g in groups if not g.probe)
    result = PhaseResult(main, window_s=window_s)
    everything: dict[int, list[Sample]] = {id(g): [] for g in groups}
    meter.reset()
    meter.mark("phase_start")
    t0 = time.perf_counter()
    window_start = t0 + ramp_s
    window_end = window_start + window_s
    window_open = asyncio.Event()

    async def mark_window() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        meter.mark("window_start")
        window_open.set()
        lag_from = len(meter.lags)
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        meter.mark("window_end")
        result.loop_lag = percentiles(meter.lags[lag_from:])

    async def worker(group: Group, i: int) -> None:
        if group.probe:
            await window_open.wait()
            await asyncio.sleep(0.5 * i / group.streams)  # probes do not move in lockstep
        else:
            await asyncio.sleep(ramp_s * i / group.streams)
        sink = everything[id(group)]
        while time.perf_counter() < window_end:
            sample = Sample(probe=group.probe)
            sink.append(sample)
            try:
                await group.client.request(sample, fmt=group.fmt)
            except asyncio.CancelledError:
                if sample.total is None and sample.error is None and not sample.probe:
                    sample.error = "unfinished"
                raise
            if sample.error is not None:
                await asyncio.sleep(0.05)  # no hot loop on a refusing server
            elif group.paced and not group.probe and sample.ttfa is not None:
                played = sample.started + sample.ttfa + sample.audio_s + sample.stall_s
                if played >= window_end:
                    # Still listening when the window closes: no next request. Sleeping
                    # until the window's end instead let uvloop's millisecond timers wake
                    # every such listener at once just before it, and their burst of
                    # requests, all counted, decided the p99 (+20 to +60 ms on a few).
                    break
                await asyncio.sleep(max(0.0, played - time.perf_counter()))

    marker = asyncio.create_task(mark_window())
    workers = [asyncio.create_task(worker(g, i)) for g in groups for i in range(g.streams)]
    await marker
    _, pending = await asyncio.wait(workers, timeout=drain_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    meter.mark("phase_end")
    for g in groups:
        # Requests started in the window, and any that never finished (an overload).
        kept = [
            s
            for s in everything[id(g)]
            if window_start <= s.started < window_end or s.error == "unfinished"
        ]
        result.samples.setdefault(g.kind, []).extend(kept)
    if pending:
        result.extra["unfinished_workers"] = len(pending)
    result.cpu_pct = meter.cpu_pct("window_start", "window_end")
    result.voxrelay_cpu_s = meter.cpu_seconds("phase_start", "phase_end", "voxrelay")
    result.relayed_audio_s = sum(
        s.audio_s for g in groups if g.kind in VOXRELAY_KINDS for s in everything[id(g)]
    )
    result.rss_max = meter.rss_max
    return result


async def run_interleaved(
    clients: Sequence[Client], *, probes: int, gap_s: float = 0.05
) -> dict[str, list[Sample]]:
    """Send *probes* probes per client, one at a time, taking the clients in turn.

    Round after round (limit, then voxrelay, ...), so that a change in the machine's
    state during the pass — a neighbour's burst, a slower minute — falls on every client
    alike, and differences of a few milliseconds between them mean something.
    """
    gc.collect()  # see run_window
    samples: dict[str, list[Sample]] = {c.kind: [] for c in clients}
    for _ in range(probes):
        for client in clients:
            sample = Sample(probe=True)
            samples[client.kind].append(sample)
            await client.request(sample)
            await asyncio.sleep(gap_s)
    return samples


async def run_sequence(
    client: Client,
    *,
    probes: int,
    full: int,
    meter: Meter,
    fmt: str = "pcm",
    gap_s: float = 0.05,
    earlier: Sequence[Sample] = (),
) -> PhaseResult:
    """Send *probes* probes, then *full* whole requests, one after another (one stream).

    *earlier* samples (probes from :func:`run_interleaved`) join this phase's. CPU
    figures cover the whole requests only: probes stop early and would understate it.
    """
    gc.collect()  # see run_window
    result = PhaseResult(1)
    samples = result.samples.setdefault(client.kind, [])
    samples.extend(earlier)
    meter.reset()
    for _ in range(probes):
        sample = Sample(probe=True)
        samples.append(sample)
        await client.request(sample, fmt=fmt)
        await asyncio.sleep(gap_s)
    meter.mark("full_start")
    lag_from = len(meter.lags)
    for _ in range(full):
        sample = Sample()
        samples.append(sample)
        await client.request(sample, fmt=fmt)
        await asyncio.sleep(gap_s)
    meter.mark("full_end")
    result.window_s = meter.elapsed("full_start", "full_end")
    if full:
        result.cpu_pct = meter.cpu_pct("full_start", "full_end")
        result.voxrelay_cpu_s = meter.cpu_seconds("full_start", "full_end", "voxrelay")
    if client.kind in VOXRELAY_KINDS:
        result.relayed_audio_s = sum(s.audio_s for s in samples)
    result.loop_lag = percentiles(meter.lags[lag_from:])
    result.rss_max = meter.rss_max
    return result
