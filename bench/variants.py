"""Settings side by side: what words cost, what shared limits add, what a second worker buys.

Each scenario runs its own voxrelay (or two) against the run's fake upstream and puts one
setting against another in the same minutes:

- :func:`words_cost`: the same chat reply with normalization and word timestamps off (as
  before they existed) and on, from one server (both are per request): time to first audio
  at one stream, probes taken in turn, and voxrelay's CPU per audio second at load, the two
  settings' windows alternating so that a slower minute falls on both.
- :func:`limits_cost`: a server whose per-key limits live in its memory against one whose
  limits live in Redis (Debian's ``redis-server``, started here on a free port), both with an
  API key and budgets no request reaches: time to first audio at one stream (in turn) and at
  load, each beside the limit's probes.
- :func:`workers_capacity`: ``voxrelay serve --workers 1`` against ``--workers 2`` at a few
  levels. Neither is pinned: the two workers need both cores, so the load generator and the
  fake share them, and the figure says what a second process buys on this machine, not
  what two cores would serve with a generator elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from . import children, report
from .clients import GrpcClient, LimitClient, Sample
from .load import Group, Meter, percentiles, run_interleaved, run_window
from .procs import ChildProcess, Pinning, free_port, voxrelay_process

__all__ = ["Windows", "limits_cost", "words_cost", "workers_capacity"]

#: The key the limit scenarios' clients send, and budgets far above what the run spends:
#: every admit runs the limit's whole check, and none refuses.
API_KEY = "bench-key"
KEYED_LIMITS = {
    "VOXRELAY_API_KEYS": API_KEY,
    "VOXRELAY_RATE_LIMIT_PER_MIN": "1000000",
    "VOXRELAY_CHARS_PER_MIN": "1000000000",
    "VOXRELAY_MAX_STREAMS_PER_KEY": "100000",
}


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 3) if known else None


@dataclasses.dataclass(frozen=True)
class Windows:
    """What every scenario measures with: the run's fake, its window timing, its rows."""

    fake: ChildProcess
    ramp_s: float
    window_s: float
    say: Callable[[str], None]
    row: Callable[..., dict[str, Any]]

    @property
    def base_url(self) -> str:
        return str(self.fake.info["base_url"])

    async def measure(
        self,
        vox: ChildProcess,
        client: GrpcClient,
        streams: int,
        *,
        label: str,
        limit: LimitClient | None = None,
        limit_probers: int = 0,
    ) -> dict[str, Any]:
        """Run *streams* of *client* through one window (the limit's probes beside them, if
        given), close *client*, and return voxrelay's figures (and the comparison)."""
        groups = [Group(client, streams)]
        if limit is not None and limit_probers:
            groups.append(Group(limit, limit_probers, probe=True))
        try:
            async with Meter(vox, self.fake) as meter:
                phase = await run_window(
                    groups, ramp_s=self.ramp_s, window_s=self.window_s, meter=meter
                )
        finally:
            await client.aclose()
        vox_row = self.row("grpc", phase, label, keep=False, with_samples=False)
        out: dict[str, Any] = {
            "streams": streams,
            "ttfa_ms": vox_row["ttfa_ms"],
            "errors": vox_row["errors"],
            "error_kinds": vox_row["error_kinds"],
            "stalled_streams": vox_row["stalled_streams"],
            "voxrelay_cpu_pct": (vox_row["voxrelay"] or {}).get("cpu_pct"),
            "cpu_ms_per_audio_s": (vox_row["voxrelay"] or {}).get("cpu_ms_per_audio_s"),
            "generator_core_busy_pct": vox_row["generator_core_busy_pct"],
        }
        if limit is not None and limit_probers:
            lim_row = self.row("limit", phase, f"beside_{label}", keep=False)
            compared = report.compare(vox_row, lim_row, None)
            out.update(
                limit_ttfa_ms=lim_row["ttfa_ms"],
                overhead_ms=compared["overhead_ms"],
                capacity_ok=compared["capacity_ok"],
                valid=compared["valid"],
            )
        return out


def _probed(samples: dict[str, list[Sample]], kind: str) -> tuple[dict[str, Any], int]:
    """The time to first audio of *kind*'s probes, and how many of them failed."""
    taken = samples[kind]
    ttfa = [s.ttfa for s in taken if s.error is None and s.ttfa]
    return percentiles(ttfa), sum(1 for s in taken if s.error is not None)


async def words_cost(
    pinning: Pinning, windows: Windows, *, probes: int, streams: int, rounds: int
) -> dict[str, Any]:
    """Normalization and word timestamps off against on: first audio and CPU per audio s."""
    say = windows.say
    vox = await voxrelay_process(pinning, windows.base_url)
    target = str(vox.info["grpc"])
    off = GrpcClient(target, 1, words=False, kind="grpc_words_off")
    on = GrpcClient(target, 1, words=True, kind="grpc_words_on")
    result: dict[str, Any] = {"streams": streams, "rounds": rounds}
    try:
        for client in (off, on):
            await client.request(Sample(probe=True))
        say(f"words: 1 stream, {probes} probes with normalization and timestamps off / on")
        samples = await run_interleaved([off, on], probes=probes)
        for name, client in (("off", off), ("on", on)):
            result[f"ttfa_1_stream_{name}_ms"], _ = _probed(samples, client.kind)
        cpu: dict[str, list[float | None]] = {"off": [], "on": []}
        ttfa_load: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for n in range(rounds):
            for name, words in (("off", False), ("on", True)):
                say(f"words: {streams} streams, {name} (round {n + 1} of {rounds})")
                taken = await windows.measure(
                    vox, GrpcClient(target, streams, words=words), streams, label=f"words_{name}"
                )
                cpu[name].append(taken["cpu_ms_per_audio_s"])
                ttfa_load[name].append(
                    {k: taken[k] for k in ("ttfa_ms", "errors", "stalled_streams")}
                )
                await asyncio.sleep(1.0)
    finally:
        await off.aclose()
        await on.aclose()
        await vox.stop()
    before, after = _mean(cpu["off"]), _mean(cpu["on"])
    result.update(
        cpu_ms_per_audio_s_off=cpu["off"],
        cpu_ms_per_audio_s_on=cpu["on"],
        load_off=ttfa_load["off"],
        load_on=ttfa_load["on"],
        cost_pct=(
            round(100 * (after - before) / before, 1)
            if before is not None and after is not None and before
            else None
        ),
    )
    p50_off = result["ttfa_1_stream_off_ms"]["p50"]
    p50_on = result["ttfa_1_stream_on_ms"]["p50"]
    result["ttfa_added_p50_ms"] = (
        round(p50_on - p50_off, 2) if p50_on is not None and p50_off is not None else None
    )
    return result


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[str | None]:
    """Run Debian's ``redis-server`` on a free port for the scenario; None if not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        proc = await children.spawn(
            "redis",
            binary,
            "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", workdir, "--loglevel", "warning",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), 1.0
                    )
                    writer.close()
                    break
                await asyncio.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            children.forget(proc.pid)


async def limits_cost(
    pinning: Pinning, windows: Windows, *, probes: int, streams: int, limit_probers: int
) -> dict[str, Any] | None:
    """Per-key limits in voxrelay's memory against limits in Redis; None without Redis."""
    say, base = windows.say, windows.base_url
    async with redis_server() as url:
        if url is None:
            return None
        memory = await voxrelay_process(pinning, base, extra_env=KEYED_LIMITS)
        shared = await voxrelay_process(
            pinning, base, extra_env={**KEYED_LIMITS, "VOXRELAY_REDIS_URL": url}
        )
        servers = {"memory": memory, "redis": shared}
        probers = {
            name: GrpcClient(str(vox.info["grpc"]), 1, api_key=API_KEY, kind=f"grpc_{name}")
            for name, vox in servers.items()
        }
        limit = LimitClient(base, limit_probers)
        result: dict[str, Any] = {"streams": streams, "redis_round_trips_per_request": None}
        try:
            for client in probers.values():
                await client.request(Sample(probe=True))
            say(f"limits: 1 stream, {probes} probes with limits in memory / in Redis")
            samples = await run_interleaved(list(probers.values()), probes=probes)
            for name, client in probers.items():
                ttfa, errors = _probed(samples, client.kind)
                result[f"ttfa_1_stream_{name}_ms"] = ttfa
                result[f"errors_1_stream_{name}"] = errors
            for name, vox in servers.items():
                say(f"limits: {streams} streams, limits in {name} (+ limit probes)")
                result[f"load_{name}"] = await windows.measure(
                    vox,
                    GrpcClient(str(vox.info["grpc"]), streams, api_key=API_KEY),
                    streams,
                    label=f"limits_{name}",
                    limit=limit,
                    limit_probers=limit_probers,
                )
                await asyncio.sleep(1.0)
        finally:
            for client in probers.values():
                await client.aclose()
            await limit.aclose()
            for vox in servers.values():
                await vox.stop()
    # One admit (a script: both budgets and the stream slot) and one release per request;
    # the heartbeat that keeps a long stream's slot alive runs beside the stream.
    result["redis_round_trips_per_request"] = {"before_first_audio": 1, "after": 1}
    a, b = result["ttfa_1_stream_memory_ms"], result["ttfa_1_stream_redis_ms"]
    result["added_1_stream_p50_ms"] = (
        round(b["p50"] - a["p50"], 2) if a["p50"] is not None and b["p50"] is not None else None
    )
    la, lb = result["load_memory"]["ttfa_ms"], result["load_redis"]["ttfa_ms"]
    result["added_at_load_p50_ms"] = (
        round(lb["p50"] - la["p50"], 2) if la["p50"] is not None and lb["p50"] is not None else None
    )
    return result


async def workers_capacity(
    windows: Windows, *, levels: Sequence[int], limit_probers: int
) -> dict[str, Any]:
    """``--workers 1`` against ``--workers 2``, unpinned, at *levels* (gRPC, pcm)."""
    base = windows.base_url
    unpinned = Pinning.none("workers share both cores with the load generator")
    result: dict[str, Any] = {"levels": list(levels), "note": unpinned.note}
    limit = LimitClient(base, limit_probers)
    try:
        for workers in (1, 2):
            vox = await voxrelay_process(
                unpinned, base, extra_env={"VOXRELAY_WORKERS": str(workers)}, tree=True
            )
            rows: list[dict[str, Any]] = []
            try:
                for streams in levels:
                    windows.say(f"workers: {workers}, {streams} streams (unpinned, + limit probes)")
                    rows.append(
                        await windows.measure(
                            vox,
                            GrpcClient(str(vox.info["grpc"]), streams),
                            streams,
                            label=f"workers_{workers}",
                            limit=limit,
                            limit_probers=limit_probers,
                        )
                    )
                    await asyncio.sleep(1.0)
            finally:
                await vox.stop()
            best = 0
            for r in rows:
                if not r["capacity_ok"]:
                    break
                best = r["streams"]
            result[f"workers_{workers}"] = {"rows": rows, "streams": best}
    finally:
        await limit.aclose()
    return result
