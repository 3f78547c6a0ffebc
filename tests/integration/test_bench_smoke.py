"""The benchmark's quick mode runs end to end and writes its report with the stable keys.

A smoke test only: it never looks at a timing (the benchmark measures, tests assert).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import JSON_KEYS, SCHEMA
from tests.servers import ROOT

RUN_KEYS = {
    "kind", "streams", "format", "load", "requests", "probes", "errors", "error_kinds",
    "ttfa_ms", "total_ms", "audio_s", "stall_ms", "stalled_streams", "voxrelay",
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
    assert {("grpc", 5), ("ws", 5), ("limit", 5)} <= kinds
    for run in doc["runs"]:
        assert set(run) >= RUN_KEYS, run["kind"]
        assert set(run["ttfa_ms"]) == PERCENTILES
        assert run["requests"] > 0
        assert run["errors"] == 0, run["error_kinds"]
    voxrelay_runs = [run for run in doc["runs"] if run["kind"] in ("grpc", "ws", "http")]
    assert all(run["voxrelay"]["cpu_ms_per_audio_s"] is not None for run in voxrelay_runs)

    assert {(c["protocol"], c["streams"]) for c in doc["comparisons"]} == {
        ("grpc", 1),
        ("ws", 1),
        ("http", 1),
        ("grpc", 5),
        ("ws", 5),
        ("http", 5),
    }
    for comparison in doc["comparisons"]:
        assert set(comparison["overhead_ms"]) == {"p50", "p95", "p99"}
        # The door's bare hop is probed beside the 1-stream probes only.
        floor = comparison["floor_ttfa_ms"]
        if comparison["streams"] == 1:
            assert set(floor) == PERCENTILES and floor["p50"] is not None
            assert set(comparison["overhead_beyond_floor_ms"]) == {"p50", "p95", "p99"}
        else:
            assert floor is None and comparison["overhead_beyond_floor_ms"] is None
    assert set(doc["capacity"]) == {"grpc", "ws", "http"}
    assert [f["format"] for f in doc["formats"]] == ["mp3"]
    assert {e["format"] for e in doc["encoders"]} >= {"pcm", "mp3", "opus", "aac"}
    assert doc["espeak"]["rtf"] is not None
    assert doc["idle"] is None  # quick mode skips the 1,000-connection test
    early = doc["early_release"]
    assert {"limit", "limit_sentence", "grpc", "gain_ms", "beats_whole_sentence"} <= set(early)
    assert early["grpc"]["p50"] is not None and early["limit_sentence"]["p50"] is not None
    assert {t["name"] for t in doc["targets"]} >= {
        "TTFA overhead p50, 1 stream, pcm (grpc)",
        "TTFA overhead p50, 1 stream, pcm (http)",
        "first segment released early beats waiting for the whole first sentence",
        "embedded espeak real-time factor",
    }
