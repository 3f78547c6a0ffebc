"""Turn measured phases into the report: stable JSON, a Markdown table, a PNG plot.

The JSON's keys are a contract for whoever reads the results by machine
(``schema`` names its version); the Markdown repeats the same figures for people.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .clients import VOXRELAY_KINDS, Sample
from .load import PhaseResult, percentiles

__all__ = [
    "JSON_KEYS",
    "SCHEMA",
    "STALL_LIMIT_MS",
    "TARGETS",
    "compare",
    "markdown",
    "plot",
    "run_row",
    "targets",
    "write",
]

SCHEMA = "voxrelay-bench/2"
#: The top-level keys of the JSON report, always present (null when not measured).
JSON_KEYS = (
    "schema", "quick", "started_at", "elapsed_s", "machine", "config", "latency_model", "levels",
    "runs", "comparisons", "capacity", "formats", "encoders", "espeak", "idle",
    "early_release", "cache", "streamed_input", "words", "limits", "workers", "profile",
    "targets", "notes",
)  # fmt: skip
#: A stream whose player waited longer than this, in all, did not keep up with real time.
STALL_LIMIT_MS = 50.0
#: The generator is saturated when its loop lags this much at p99 (its clock is then
#: late for every stream it measures), or when its core is busier than this.
GENERATOR_LAG_LIMIT_MS = 20.0
CORE_BUSY_LIMIT_PCT = 95.0

TARGETS = {
    "overhead_p50_ms_1_stream": 2.0,
    "overhead_p99_ms_1_stream": 10.0,
    "capacity_margin_p99_ms": 25.0,
    #: per format: pcm, and the compressed formats browsers and apps ask for
    "capacity_streams_per_core": {"pcm": 500, "opus": 300, "mp3": 300},
    "pipelining_factor": 1.05,
    "idle_kib_per_connection": 64.0,
    "espeak_rtf": 0.1,
    "cached_first_audio_ms": 5.0,
    "streamed_input_p50_ms": 5.0,
    #: normalization and word timestamps, in % of voxrelay's CPU per audio second without
    "words_cpu_pct": 5.0,
}
MIB = 1024 * 1024
_TICKS_MS = (300, 400, 500, 600, 800, 1000, 1200, 1500, 2000, 3000, 5000, 10000, 20000)


def _errors(samples: list[Sample]) -> Counter[str]:
    return Counter(s.error for s in samples if s.error is not None)


def run_row(
    kind: str,
    phase: PhaseResult,
    *,
    load: str,
    fmt: str = "pcm",
    with_samples: bool = True,
    generator_core: str | None = None,
) -> dict[str, Any]:
    """Summarise one client's samples from *phase*; *load* says what ran beside it.

    *generator_core* (``"cpu1"``) is the core the generator shares with the fake, whose
    busy time says whether the generator could keep up.
    """
    samples = phase.samples.get(kind, [])
    ok = [s for s in samples if s.error is None]
    full = [s for s in ok if not s.probe]
    ttfa = [s.ttfa for s in ok if s.ttfa is not None]
    stalls = [s.stall_s for s in full]
    voxrelay_side = kind in VOXRELAY_KINDS
    row: dict[str, Any] = {
        "kind": kind,
        "streams": phase.streams,
        "format": fmt,
        "load": load,
        "requests": len(samples),
        "probes": sum(1 for s in samples if s.probe),
        "errors": len(samples) - len(ok),
        "error_kinds": dict(_errors(samples)),
        "ttfa_ms": percentiles(ttfa),
        # whole replies in pcm only: when a listener playing from the first byte hears sound
        "audible_ms": percentiles([s.audible for s in full if s.audible is not None]),
        "total_ms": percentiles([s.total for s in full if s.total is not None]),
        "audio_s": round(sum(s.audio_s for s in full), 2),
        "stall_ms": percentiles(stalls) if voxrelay_side else None,
        "stalled_streams": (
            sum(1 for x in stalls if x * 1000 > STALL_LIMIT_MS) if voxrelay_side else None
        ),
        "voxrelay": None,
        "fake_cpu_pct": phase.cpu_pct.get("fake"),
        "generator_cpu_pct": phase.cpu_pct.get("generator"),
        "generator_loop_lag_p99_ms": phase.loop_lag.get("p99"),
        "window_s": round(phase.window_s, 2),
    }
    if voxrelay_side:
        cpu_ms = phase.voxrelay_cpu_s * 1000
        row["voxrelay"] = {
            "cpu_pct": phase.cpu_pct.get("voxrelay"),
            "cpu_ms_per_audio_s": (
                round(cpu_ms / phase.relayed_audio_s, 2) if phase.relayed_audio_s else None
            ),
            "rss_mib_max": round(phase.rss_max / MIB, 1) if phase.rss_max else None,
        }
    busy = (row["fake_cpu_pct"] or 0) + (row["generator_cpu_pct"] or 0)
    if generator_core is not None and generator_core in phase.cpu_pct:
        busy = max(busy, phase.cpu_pct[generator_core])
    lag = row["generator_loop_lag_p99_ms"] or 0
    row["generator_core_busy_pct"] = round(busy, 1)
    row["generator_saturated"] = busy > CORE_BUSY_LIMIT_PCT or lag > GENERATOR_LAG_LIMIT_MS
    row["other_cpu_pct"] = phase.cpu_pct.get("other")
    if with_samples:
        row["ttfa_samples_ms"] = [round(x * 1000, 2) for x in ttfa]
    return row


def _sub(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    return round(float(a[key]) - float(b[key]), 2)


def compare(
    vox: dict[str, Any],
    limit: dict[str, Any],
    naive: dict[str, Any] | None,
    floor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Set voxrelay's figures against the limit and the naive pipeline at the same load.

    *floor* is the time to first audio of the door's bare hop (:mod:`bench.floor`),
    measured beside the 1-stream probes; ``None`` under load.
    """
    v, lim = vox["ttfa_ms"], limit["ttfa_ms"]
    overhead = {k: _sub(v, lim, k) for k in ("p50", "p95", "p99")}
    beyond = None
    if floor is not None:
        beyond = {k: _sub(overhead, floor, k) for k in ("p50", "p95", "p99")}
    ratio = limit_ratio = None
    pipelining_ok = None
    if naive is not None and naive["ttfa_ms"]["p50"] and v["p50"] and lim["p50"]:
        ratio = round(v["p50"] / naive["ttfa_ms"]["p50"], 4)
        limit_ratio = round(lim["p50"] / naive["ttfa_ms"]["p50"], 4)
        pipelining_ok = ratio <= TARGETS["pipelining_factor"] * limit_ratio
    margin = overhead["p99"]
    capacity_ok = (
        margin is not None
        and margin <= TARGETS["capacity_margin_p99_ms"]
        and vox["errors"] == 0
        and not vox["stalled_streams"]
    )
    return {
        "streams": vox["streams"],
        "protocol": vox["kind"],
        "format": vox["format"],
        "ttfa_ms": v,
        "limit_ttfa_ms": lim,
        "naive_ttfa_ms": naive["ttfa_ms"] if naive is not None else None,
        "overhead_ms": overhead,
        "floor_ttfa_ms": floor,
        "overhead_beyond_floor_ms": beyond,
        "ratio_vs_naive": ratio,
        "limit_ratio_vs_naive": limit_ratio,
        "pipelining_ok": pipelining_ok,
        "capacity_ok": capacity_ok,
        "valid": not (vox["generator_saturated"] or limit["generator_saturated"]),
        "errors": vox["errors"],
        "stalled_streams": vox["stalled_streams"],
        "cpu_ms_per_audio_s": (vox["voxrelay"] or {}).get("cpu_ms_per_audio_s"),
    }


def capacity(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Return, per protocol, the most streams at which every level up to it passed."""
    out: dict[str, Any] = {}
    measured = sorted(
        {(c["protocol"], c["format"]) for c in comparisons if c["streams"] > 1},
        key=lambda pf: (VOXRELAY_KINDS.index(pf[0]), pf[1] != "pcm", pf[1]),
    )
    for protocol, fmt in measured:
        rows = sorted(
            (c for c in comparisons if c["protocol"] == protocol and c["format"] == fmt),
            key=lambda c: c["streams"],
        )
        best = 0
        first_failure = None
        invalid = []
        for c in rows:
            if not c["valid"]:
                invalid.append(c["streams"])
            if c["capacity_ok"]:
                best = c["streams"]
            else:
                first_failure = c["streams"]
                break
        out[protocol if fmt == "pcm" else f"{protocol} {fmt}"] = {
            "protocol": protocol,
            "format": fmt,
            "lowest_level": rows[0]["streams"] if rows else None,
            "streams_per_core": best,
            "first_failing_level": first_failure,
            "levels_with_saturated_generator": invalid,
        }
    return out


def streamed_input(
    stream_in: dict[str, Any], chat: dict[str, Any], limit: dict[str, Any], model: dict[str, Any]
) -> dict[str, Any]:
    """Compare streamed input's time to first audio with the chat path and the limit.

    The caller reads the LLM itself and streams its deltas in; the same reply through
    voxrelay's own chat path, and the limit (the same calls with no gateway), bound it.
    """
    ours, theirs, best = stream_in["ttfa_ms"], chat["ttfa_ms"], limit["ttfa_ms"]
    vs_chat = _sub(ours, theirs, "p50")
    vs_limit = _sub(ours, best, "p50")
    target = TARGETS["streamed_input_p50_ms"]
    return {
        "ttfa_ms": ours,
        "chat_ttfa_ms": theirs,
        "limit_ttfa_ms": best,
        "model_limit_ms": model["model_limit_ms"],
        "p50_vs_chat_ms": vs_chat,
        "p50_vs_limit_ms": vs_limit,
        "p50_vs_model_limit_ms": (
            None if ours.get("p50") is None else round(ours["p50"] - model["model_limit_ms"], 2)
        ),
        "within_target": None
        if vs_chat is None or vs_limit is None
        else vs_chat <= target and vs_limit <= target,  # no more than that slower than either
        "errors": stream_in["errors"],
    }


def _floor_note(c: dict[str, Any]) -> str:
    """Say what the door's bare hop costs, and what voxrelay adds beyond it, at p50."""
    floor, beyond = c.get("floor_ttfa_ms"), c.get("overhead_beyond_floor_ms")
    if not floor or floor.get("p50") is None or not beyond or beyond.get("p50") is None:
        return ""
    note = f"the door's floor {floor['p50']:g} ms; voxrelay adds {beyond['p50']:g} ms beyond it"
    if floor["p50"] > TARGETS["overhead_p50_ms_1_stream"]:
        note += "; the floor alone is over the target"
    return note


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the issue's targets against the measured figures."""
    rows: list[dict[str, Any]] = []

    def add(name: str, target: str, value: Any, ok: bool | None, note: str = "") -> None:
        rows.append({"name": name, "target": target, "value": value, "ok": ok, "note": note})

    single = {c["protocol"]: c for c in doc["comparisons"] if c["streams"] == 1}
    for protocol in VOXRELAY_KINDS:
        c = single.get(protocol)
        if c is None:
            continue
        p50, p99 = c["overhead_ms"]["p50"], c["overhead_ms"]["p99"]
        add(
            f"TTFA overhead p50, 1 stream, pcm ({protocol})",
            f"<= {TARGETS['overhead_p50_ms_1_stream']:g} ms",
            p50,
            None if p50 is None else p50 <= TARGETS["overhead_p50_ms_1_stream"],
            _floor_note(c),
        )
        add(
            f"TTFA overhead p99, 1 stream, pcm ({protocol})",
            f"<= {TARGETS['overhead_p99_ms_1_stream']:g} ms",
            p99,
            None if p99 is None else p99 <= TARGETS["overhead_p99_ms_1_stream"],
        )
        if c["pipelining_ok"] is None:
            continue  # no naive pipeline to compare with (the OpenAI door speaks text)
        add(
            f"pipelining: voxrelay/naive vs 1.05 x limit/naive, 1 stream ({protocol})",
            "<= 1.05 x",
            f"{c['ratio_vs_naive']} vs {c['limit_ratio_vs_naive']}",
            c["pipelining_ok"],
        )
        b50 = (c.get("overhead_beyond_floor_ms") or {}).get("p50")
        if b50 is not None:
            add(
                f"TTFA overhead beyond the door's floor p50, 1 stream, pcm ({protocol})",
                f"<= {TARGETS['overhead_p50_ms_1_stream']:g} ms",
                b50,
                b50 <= TARGETS["overhead_p50_ms_1_stream"],
            )
    for name, cap in (doc.get("capacity") or {}).items():
        goal = TARGETS["capacity_streams_per_core"].get(cap.get("format", "pcm"))
        if goal is None:
            continue
        notes = []
        if cap["levels_with_saturated_generator"]:
            notes.append(f"generator saturated at {cap['levels_with_saturated_generator']}")
        if cap["first_failing_level"] is None:
            notes.append("the highest level measured")
        add(
            f"capacity, streams per core within 25 ms of the limit ({name})",
            f">= {goal}",
            cap["streams_per_core"],
            cap["streams_per_core"] >= goal,
            "; ".join(notes),
        )
    words = doc.get("words")
    if words and words.get("cost_pct") is not None:
        add(
            f"normalization + word timestamps: CPU per audio second at {words['streams']}"
            " streams, added",
            f"< {TARGETS['words_cpu_pct']:g} %",
            words["cost_pct"],
            words["cost_pct"] < TARGETS["words_cpu_pct"],
            f"{words['cpu_ms_per_audio_s_off']} → {words['cpu_ms_per_audio_s_on']} ms",
        )
    idle = doc.get("idle")
    if idle:
        kib = idle["kib_per_connection"]
        add(
            "RSS per idle WebSocket connection",
            f"<= {TARGETS['idle_kib_per_connection']:g} KiB",
            kib,
            kib <= TARGETS["idle_kib_per_connection"],
        )
    early = doc.get("early_release")
    if early and early.get("beats_whole_sentence") is not None:
        add(
            "first segment released early beats waiting for the whole first sentence",
            "voxrelay TTFA < limit with a whole-sentence splitter",
            f"{early['grpc']['p50']} vs {early['limit_sentence']['p50']} ms",
            early["beats_whole_sentence"],
        )
    cache = doc.get("cache")
    if cache and cache["grpc"]["p99"] is not None and cache["ws"]["p99"] is not None:
        add(
            "a reply all in the phrase cache: first audio p99 on both doors",
            f"<= {TARGETS['cached_first_audio_ms']:g} ms",
            f"{cache['grpc']['p99']} (grpc), {cache['ws']['p99']} (ws) ms",
            cache["within_goal"],
        )
        add(
            "a reply all in the phrase cache: upstream calls",
            "0",
            cache["upstream_calls_during"],
            cache["upstream_calls_during"] == 0,
        )
    streamed = doc.get("streamed_input")
    if streamed and streamed.get("within_target") is not None:
        add(
            "streamed input (caller's own LLM deltas → SynthesizeStream) TTFA p50, 1 stream",
            f"within {TARGETS['streamed_input_p50_ms']:g} ms of the chat path and the limit",
            f"{streamed['ttfa_ms']['p50']} vs chat {streamed['chat_ttfa_ms']['p50']},"
            f" limit {streamed['limit_ttfa_ms']['p50']} ms",
            streamed["within_target"],
            f"model limit {streamed['model_limit_ms']:g} ms",
        )
    espeak = doc.get("espeak")
    if espeak and espeak.get("rtf") is not None:
        add(
            "embedded espeak real-time factor",
            f"<= {TARGETS['espeak_rtf']:g}",
            espeak["rtf"],
            espeak["rtf"] <= TARGETS["espeak_rtf"],
        )
    return rows


# Markdown


def _ms(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}"


def _num(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _ok(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def markdown(doc: dict[str, Any]) -> str:
    """Render the report for people: the run table, the comparisons, the targets."""
    lm = doc["latency_model"]
    lines = [
        "# voxrelay benchmark",
        "",
        f"{doc['started_at']}, {doc['elapsed_s']:.0f} s{' (quick)' if doc['quick'] else ''}. "
        f"Machine: {doc['machine']['cpus']} cores, Python {doc['machine']['python']}; "
        f"{doc['machine']['pinning']}.",
        "",
        f"Fake upstream: first token {lm['ttft_ms']:g} ms, {lm['token_ms']:g} ms per token, "
        f"TTS first byte {lm['tts_first_byte_ms']:g} ms, speech {1 / lm['tts_rtf']:g}x real "
        f"time, each response starting with {lm.get('leading_silence_ms', 0):g} ms of "
        f"silence; a {lm['reply_segments']}-segment reply of {lm['reply_tokens']} tokens. "
        f"First segment: {lm['first_segment_tokens']} tokens + 1 look-ahead token → "
        f"model limit {lm['model_limit_ms']:g} ms, naive {lm['model_naive_ms']:g} ms.",
        "",
        "## Runs (time to first audio and total time, client side, ms)",
        "",
        "*audible*: when a listener playing the pcm from its first byte hears the first "
        "10 ms window above -45 dBFS (whole replies; the limit plays the engine's bytes).",
        "",
        "| config | streams | beside | req | err | TTFA p50 | p95 | p99 | audible p50 "
        "| total p50 | p99 | stalled | vox CPU % | vox CPU ms/audio s | vox RSS MiB | gen CPU % "
        "| fake CPU % | gen lag p99 | other CPU % |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in doc["runs"]:
        vox = r["voxrelay"] or {}
        sat = " ⚠" if r["generator_saturated"] else ""
        lines.append(
            f"| {r['kind']}{'' if r['format'] == 'pcm' else ' ' + r['format']} | {r['streams']} "
            f"| {r['load']} | {r['requests']} | {r['errors']} | {_ms(r['ttfa_ms']['p50'])} "
            f"| {_ms(r['ttfa_ms']['p95'])} | {_ms(r['ttfa_ms']['p99'])} "
            f"| {_ms(r.get('audible_ms', {}).get('p50'))} "
            f"| {_ms(r['total_ms']['p50'])} | {_ms(r['total_ms']['p99'])} "
            f"| {_num(r['stalled_streams'])} | {_num(vox.get('cpu_pct'))} "
            f"| {_num(vox.get('cpu_ms_per_audio_s'))} | {_num(vox.get('rss_mib_max'))} "
            f"| {_num(r['generator_cpu_pct'])} | {_num(r['fake_cpu_pct'])} "
            f"| {_ms(r['generator_loop_lag_p99_ms'])}{sat} | {_num(r['other_cpu_pct'])} |"
        )
    lines += [
        "",
        "## voxrelay against the limit and the naive pipeline (same load)",
        "",
        "| protocol | format | streams | overhead p50 | p95 | p99 | the door's floor p50 | p99 "
        "| voxrelay/naive | limit/naive | pipelining ok | within 25 ms, no errors, no stalls "
        "| valid |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|---|",
    ]
    for c in doc["comparisons"]:
        o, f = c["overhead_ms"], c["floor_ttfa_ms"] or {}
        lines.append(
            f"| {c['protocol']} | {c['format']} | {c['streams']} | {_ms(o['p50'])} "
            f"| {_ms(o['p95'])} "
            f"| {_ms(o['p99'])} | {_ms(f.get('p50'))} | {_ms(f.get('p99'))} "
            f"| {_num(c['ratio_vs_naive'])} | {_num(c['limit_ratio_vs_naive'])} "
            f"| {_ok(c['pipelining_ok'])} | {_ok(c['capacity_ok'])} | {_ok(c['valid'])} |"
        )
    if any(c["protocol"] == "http" for c in doc["comparisons"]):
        lines += [
            "",
            "The OpenAI-compatible door (`http`) speaks a text as written, with no LLM: its "
            "limit is the same speech calls made straight from the SDK (`speech_limit`), and "
            "it has no naive pipeline to compare with.",
        ]
    if any(c["floor_ttfa_ms"] for c in doc["comparisons"]):
        lines += [
            "",
            "The door's floor: the same client's time to first audio from a server that "
            "answers at once with no upstream (`bench/floor.py`), pinned like voxrelay, in "
            "the same rounds as the 1-stream probes. It is what one hop over that door's "
            "library costs here; voxrelay's overhead less it is what voxrelay itself adds.",
        ]
    if doc["formats"]:
        lines += [
            "",
            "## Formats (gRPC, 1 stream): the encoder's added delay",
            "",
            "| format | probes | TTFA p50 | p99 | added p50 over pcm | added p99 "
            "| encoder swallows (audio ms) |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for f in doc["formats"]:
            lines.append(
                f"| {f['format']} | {f['probes']} | {_ms(f['ttfa_ms']['p50'])} "
                f"| {_ms(f['ttfa_ms']['p99'])} | {_ms(f['added_ms']['p50'])} "
                f"| {_ms(f['added_ms']['p99'])} | {_num(f['first_output_after_audio_ms'])} |"
            )
    if doc["encoders"]:
        lines += [
            "",
            "## Encoders (in process, 20 ms chunks of 24 kHz PCM)",
            "",
            "| format | CPU ms per audio s | % of a core per real-time stream "
            "| real-time streams per core | kbit/s |",
            "|---|--:|--:|--:|--:|",
        ]
        for e in doc["encoders"]:
            lines.append(
                f"| {e['format']} | {e['cpu_ms_per_audio_s']:.3f} "
                f"| {e['cpu_pct_per_realtime_stream']:.3f} "
                f"| {_num(e['realtime_streams_per_core'])} | {e['kbit_per_s']:g} |"
            )
    if doc["espeak"]:
        e = doc["espeak"]
        lines += [
            "",
            f"Embedded espeak: {e['audio_s']} s of speech in {e['synth_s']} s, "
            f"real-time factor {e['rtf']} (first chunk ≤ {e['first_chunk_ms_max']} ms).",
        ]
    if doc["idle"]:
        i = doc["idle"]
        s = i["streaming"]
        lines += [
            "",
            f"Idle WebSockets: {i['connections']} connections took voxrelay from "
            f"{i['rss_before_mib']} MiB to {i['rss_idle_mib']} MiB: "
            f"**{i['kib_per_connection']} KiB per connection**. With {s['streams']} of them "
            f"streaming: TTFA p50 {_ms(s['ttfa_ms']['p50'])} / p99 {_ms(s['ttfa_ms']['p99'])} ms, "
            f"{s['errors']} errors, {_num(s['stalled_streams'])} stalled, "
            f"peak RSS {i['rss_streaming_max_mib']} MiB.",
        ]
    early = doc.get("early_release")
    if early:
        lines += [
            "",
            "## A long first sentence: its first clause early, or the whole sentence",
            "",
            "| client | TTFA p50 | p95 | p99 |",
            "|---|--:|--:|--:|",
        ]
        for key, name in (
            ("limit", "limit, first clause released early (as voxrelay cuts)"),
            ("limit_sentence", "limit, waiting for the whole first sentence"),
            ("grpc", "voxrelay over gRPC"),
        ):
            t = early[key]
            lines.append(f"| {name} | {_ms(t['p50'])} | {_ms(t['p95'])} | {_ms(t['p99'])} |")
        lines += [
            "",
            f"Early release gains {_num(early['gain_ms'])} ms at p50; voxrelay is "
            f"{_num(early['overhead_over_early_limit_ms'])} ms over its own limit.",
        ]
    cache = doc.get("cache")
    if cache:
        lines += [
            "",
            "## A reply all in the phrase cache",
            "",
            f"The reply spoken once (TTFA {_ms(cache['first_request_ttfa_ms'])} ms, "
            f"{_num(cache['first_request_upstream_calls'])} upstream calls), then "
            f"{cache['rounds']} times on each door from the cache:",
            "",
            "| door | TTFA p50 | p95 | p99 |",
            "|---|--:|--:|--:|",
        ]
        for kind in ("grpc", "ws"):
            t = cache[kind]
            lines.append(f"| {kind} | {_ms(t['p50'])} | {_ms(t['p95'])} | {_ms(t['p99'])} |")
        lines += [
            "",
            f"Upstream calls during the repeats: {_num(cache['upstream_calls_during'])}; "
            f"cache hits {_num(cache['cache_hits_during'])}, "
            f"misses {_num(cache['cache_misses_during'])}; errors {cache['errors']}.",
        ]
    lines += _variants_markdown(doc)
    if doc["profile"]:
        p = doc["profile"]
        lines += ["", f"## Profile: voxrelay, {p['protocol']} at {p['streams']} streams", ""]
        lines += ["py-spy sampled a pass of its own at that load, after the measured ones.", ""]
        lines += ["| stage | share of samples | CPU ms per audio s |", "|---|--:|--:|"]
        lines += [
            f"| {row['stage']} | {row['pct']:.1f}% | {_num(row.get('cpu_ms_per_audio_s'))} |"
            for row in p.get("stages", [])
        ]
        lines += ["", "| share of samples | where (inclusive) |", "|--:|---|"]
        lines += [f"| {row['pct']:.1f}% | {row['frame']} |" for row in p["inclusive"][:25]]
    lines += [
        "",
        "## Targets",
        "",
        "| target | goal | measured | met | note |",
        "|---|---|---|---|---|",
    ]
    for t in doc["targets"]:
        lines.append(
            f"| {t['name']} | {t['target']} | {_num(t['value'])} | {_ok(t['ok'])} | {t['note']} |"
        )
    cap = doc.get("capacity") or {}
    if cap:
        lines += [
            "",
            "Capacity (streams per core, every level up to it passing): "
            + ", ".join(f"{k} {v['streams_per_core']}" for k, v in cap.items()),
        ]
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


# Plot


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Draw each level's TTFA distributions (ECDF) side by side; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    levels = sorted({r["streams"] for r in doc["runs"]})
    cols = min(3, len(levels))
    rows = -(-len(levels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    colours = {
        "limit": "black",
        "naive": "tab:gray",
        "grpc": "tab:blue",
        "ws": "tab:orange",
        "http": "tab:green",
        "speech_limit": "tab:olive",
        "stream_in": "tab:cyan",
    }
    for ax, level in zip(axes.flat, levels, strict=False):
        for r in doc["runs"]:
            if r["streams"] != level or r["format"] != "pcm" or not r.get("ttfa_samples_ms"):
                continue
            xs = sorted(r["ttfa_samples_ms"])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            label = f"{r['kind']} ({r['load']}, n={len(xs)})"
            style = "--" if r["kind"] in ("limit", "naive") and r["load"] != "alone" else "-"
            ax.step(
                xs, ys, where="post", label=label, color=colours.get(r["kind"]), linestyle=style
            )
        ax.set_title(f"{level} stream{'s' if level > 1 else ''}")
        ax.set_xlabel("time to first audio (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        low, high = ax.get_xlim()
        ticks = [t for t in _TICKS_MS if low <= t <= high]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(levels) :]:
        ax.axis("off")
    fig.suptitle("voxrelay: time to first audio by configuration (client side)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write bench.json, bench.md and ttfa.png into *out*; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "ttfa.png"}
    missing = [k for k in JSON_KEYS if k not in doc]
    if missing:
        raise ValueError(f"report lacks keys {missing}")
    paths["json"].write_text(json.dumps({k: doc[k] for k in JSON_KEYS}, indent=1) + "\n")
    paths["markdown"].write_text(markdown(doc))
    if not plot(doc, paths["plot"]):
        del paths["plot"]
    return paths


def _variants_markdown(doc: dict[str, Any]) -> list[str]:
    """The side-by-side settings (bench.variants): words, Redis limits, workers."""
    lines: list[str] = []
    words = doc.get("words")
    if words:
        off, on = words["ttfa_1_stream_off_ms"], words["ttfa_1_stream_on_ms"]
        lines += [
            "",
            "## Normalization and word timestamps, off against on",
            "",
            "| | TTFA p50, 1 stream | p99 | CPU ms per audio s at "
            f"{words['streams']} streams (each round) |",
            "|---|--:|--:|---|",
            f"| off | {_ms(off['p50'])} | {_ms(off['p99'])} "
            f"| {', '.join(_num(x) for x in words['cpu_ms_per_audio_s_off'])} |",
            f"| on | {_ms(on['p50'])} | {_ms(on['p99'])} "
            f"| {', '.join(_num(x) for x in words['cpu_ms_per_audio_s_on'])} |",
            "",
            f"Added: {_num(words['ttfa_added_p50_ms'])} ms of first audio at p50, "
            f"{_num(words['cost_pct'])} % of CPU per audio second (mean of the rounds; the "
            "two settings' windows alternate).",
        ]
    limits = doc.get("limits")
    if limits:
        lines += [
            "",
            "## Per-key limits in memory against limits in Redis",
            "",
            f"| limits | TTFA p50, 1 stream | p99 | TTFA p50 at {limits['streams']} streams "
            "| p99 | limit beside it p50 / p99 | errors |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for name in ("memory", "redis"):
            one, load = limits[f"ttfa_1_stream_{name}_ms"], limits[f"load_{name}"]
            lines.append(
                f"| {name} | {_ms(one['p50'])} | {_ms(one['p99'])} "
                f"| {_ms(load['ttfa_ms']['p50'])} | {_ms(load['ttfa_ms']['p99'])} "
                f"| {_ms(load['limit_ttfa_ms']['p50'])} / {_ms(load['limit_ttfa_ms']['p99'])} "
                f"| {load['errors']} |"
            )
        lines += [
            "",
            f"Redis added {_num(limits['added_1_stream_p50_ms'])} ms at p50 at one stream and "
            f"{_num(limits['added_at_load_p50_ms'])} ms at {limits['streams']} streams: one "
            "script round trip before the first audio, one release after the stream.",
        ]
    workers = doc.get("workers")
    if workers:
        lines += [
            "",
            "## One worker against two (gRPC, pcm, not pinned)",
            "",
            f"{workers['note']}.",
            "",
            "| workers | streams | TTFA p50 | p99 | overhead p99 | within 25 ms, no errors, "
            "no stalls | voxrelay CPU % | generator core busy % |",
            "|--:|--:|--:|--:|--:|---|--:|--:|",
        ]
        for n in (1, 2):
            for r in workers[f"workers_{n}"]["rows"]:
                lines.append(
                    f"| {n} | {r['streams']} | {_ms(r['ttfa_ms']['p50'])} "
                    f"| {_ms(r['ttfa_ms']['p99'])} | {_ms(r['overhead_ms']['p99'])} "
                    f"| {_ok(r['capacity_ok'])} | {_num(r['voxrelay_cpu_pct'])} "
                    f"| {_num(r['generator_core_busy_pct'])} |"
                )
    return lines
