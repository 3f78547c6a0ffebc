"""The benchmark's quick mode runs end to end and writes its report with the stable keys,
and a benchmark stopped by a signal stops every process it started.

Smoke tests only: they never look at a timing (the benchmark measures, tests assert).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import JSON_KEYS, SCHEMA
from tests.servers import ROOT
from tests.waiting import eventually

RUN_KEYS = {
    "kind", "streams", "format", "load", "requests", "probes", "errors", "error_kinds",
    "ttfa_ms", "audible_ms", "total_ms", "audio_s", "stall_ms", "stalled_streams", "voxrelay",
    "fake_cpu_pct", "generator_cpu_pct", "generator_loop_lag_p99_ms", "generator_core_busy_pct",
    "generator_saturated", "other_cpu_pct", "window_s",
}  # fmt: skip
PERCENTILES = {"p50", "p95", "p99", "mean", "min", "max"}


@pytest.mark.timeout(300)
def test_quick_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Targets" in proc.stdout

    doc = json.loads((tmp_path / "bench.json").read_text())
    assert list(doc) == list(JSON_KEYS)
    assert doc["schema"] == SCHEMA and doc["quick"] is True
    assert (tmp_path / "bench.md").read_text().startswith("# voxrelay benchmark")

    kinds = {(run["kind"], run["streams"]) for run in doc["runs"]}
    assert {("limit", 1), ("naive", 1), ("grpc", 1), ("ws", 1)} <= kinds
    assert {("speech_limit", 1), ("http", 1), ("http", 5), ("speech_limit", 5)} <= kinds
    assert ("stream_in", 1) in kinds
    assert {("grpc", 5), ("ws", 5), ("limit", 5)} <= kinds
    for run in doc["runs"]:
        assert set(run) >= RUN_KEYS, run["kind"]
        assert set(run["ttfa_ms"]) == PERCENTILES
        assert run["requests"] > 0
        assert run["errors"] == 0, run["error_kinds"]
    voxrelay_runs = [run for run in doc["runs"] if run["kind"] in ("grpc", "ws", "http")]
    assert all(run["voxrelay"]["cpu_ms_per_audio_s"] is not None for run in voxrelay_runs)

    assert {(c["protocol"], c["format"], c["streams"]) for c in doc["comparisons"]} == {
        ("grpc", "pcm", 1),
        ("ws", "pcm", 1),
        ("http", "pcm", 1),
        ("grpc", "pcm", 5),
        ("ws", "pcm", 5),
        ("http", "pcm", 5),
        ("grpc", "opus", 5),
        ("grpc", "mp3", 5),
    }
    # The compressed formats' playback is timed too (Ogg granules, mp3's constant rate).
    compressed = [r for r in doc["runs"] if r["kind"] == "grpc" and r["format"] != "pcm"]
    assert {r["format"] for r in compressed} == {"opus", "mp3"}
    assert all(r["stall_ms"]["p50"] is not None for r in compressed)
    for comparison in doc["comparisons"]:
        assert set(comparison["overhead_ms"]) == {"p50", "p95", "p99"}
        # The door's bare hop is probed beside the 1-stream probes only.
        floor = comparison["floor_ttfa_ms"]
        if comparison["streams"] == 1:
            assert set(floor) == PERCENTILES and floor["p50"] is not None
            assert set(comparison["overhead_beyond_floor_ms"]) == {"p50", "p95", "p99"}
        else:
            assert floor is None and comparison["overhead_beyond_floor_ms"] is None
    assert set(doc["capacity"]) == {"grpc", "grpc opus", "grpc mp3", "ws", "http"}
    words = doc["words"]
    assert words["ttfa_1_stream_on_ms"]["p50"] is not None and words["cost_pct"] is not None
    assert all(r["errors"] == 0 for r in words["load_off"] + words["load_on"])
    workers = doc["workers"]
    assert [r["streams"] for r in workers["workers_2"]["rows"]] == [5]
    assert all(r["errors"] == 0 for n in (1, 2) for r in workers[f"workers_{n}"]["rows"])
    limits = doc["limits"]
    if limits is None:  # no redis-server: the run says so
        assert any("redis-server" in n for n in doc["notes"])
    else:
        assert limits["errors_1_stream_redis"] == 0 and limits["load_redis"]["errors"] == 0
        assert limits["ttfa_1_stream_redis_ms"]["p50"] is not None
    assert [f["format"] for f in doc["formats"]] == ["mp3"]
    assert {e["format"] for e in doc["encoders"]} >= {"pcm", "mp3", "opus", "aac"}
    assert doc["espeak"]["rtf"] is not None
    assert doc["idle"] is None  # quick mode skips the 1,000-connection test
    early = doc["early_release"]
    assert {"limit", "limit_sentence", "grpc", "gain_ms", "beats_whole_sentence"} <= set(early)
    assert early["grpc"]["p50"] is not None and early["limit_sentence"]["p50"] is not None
    cache = doc["cache"]
    assert cache["upstream_calls_during"] == 0 and cache["cache_misses_during"] == 0
    assert cache["cache_hits_during"] > 0 and cache["errors"] == 0
    assert cache["grpc"]["p50"] is not None and cache["ws"]["p50"] is not None
    streamed = doc["streamed_input"]
    assert {"ttfa_ms", "chat_ttfa_ms", "limit_ttfa_ms", "p50_vs_chat_ms", "within_target"} <= set(
        streamed
    )
    assert streamed["ttfa_ms"]["p50"] is not None and streamed["errors"] == 0
    assert {t["name"] for t in doc["targets"]} >= {
        "a reply all in the phrase cache: first audio p99 on both doors",
        "a reply all in the phrase cache: upstream calls",
        "TTFA overhead p50, 1 stream, pcm (grpc)",
        "TTFA overhead p50, 1 stream, pcm (http)",
        "first segment released early beats waiting for the whole first sentence",
        "embedded espeak real-time factor",
    }


# Whatever the benchmark starts, it stops


def _stat(pid: int) -> tuple[str, int] | None:
    """Return a process's state letter and parent pid, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    state, ppid = raw[raw.rindex(b")") + 2 :].split()[:2]
    return state.decode(), int(ppid)


def _alive(pid: int) -> bool:
    # A zombie has exited; only its parent (or init, which may never) can reap it.
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _descendants(root: int) -> dict[int, str]:
    """Return every live descendant of *root*: pid → command line."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            found[pid] = " ".join(a.decode(errors="replace") for a in argv)
        todo.extend(children.get(pid, []))
    return found


#: What the benchmark runs while it probes each door's floor: all three of its servers.
SERVERS = ("fakes.openai_upstream", "voxrelay.gateways.cli", "bench.floor")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    # SIGHUP takes SIGTERM's path; SIGINT also stands in for asyncio's own handler; SIGKILL
    # leaves it to the kernel (PDEATHSIG) and voxrelay's own drain.
    "sig",
    [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
    ids=lambda s: s.name,
)
async def test_a_stopped_benchmark_leaves_no_process_behind(
    tmp_path: Path, sig: signal.Signals
) -> None:
    log = tmp_path / "bench.log"
    with log.open("wb") as out:
        bench = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    tree: dict[int, str] = {}

    def all_servers_run() -> bool:
        assert bench.returncode is None, log.read_text()[-3000:]
        tree.update(_descendants(bench.pid))
        alive = [cmd for pid, cmd in tree.items() if _alive(pid)]
        return all(any(name in cmd for cmd in alive) for name in SERVERS)

    try:
        # /proc announces nothing: it is read ten times a second.
        await eventually(all_servers_run, within=120, every=0.1)
        bench.send_signal(sig)
        async with asyncio.timeout(30):
            assert await bench.wait() == -sig
        await eventually(lambda: not any(map(_alive, tree)), within=30, every=0.1)
    finally:
        if bench.returncode is None:
            bench.kill()
            await bench.wait()
        for pid in tree:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
