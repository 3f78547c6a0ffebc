"""Run the whole benchmark and write its report (``python -m bench [--quick]``).

The plan, all in one run with one fake upstream and one voxrelay:

1. one stream, one request at a time: the limit (voxrelay's upstream calls made
   straight from the SDK), the naive pipeline, voxrelay over gRPC and over WebSocket,
   and the OpenAI-compatible door (speak mode) beside its own limit (the speech calls alone);
   probes (time to first audio) taking the four clients in turn, with each door's bare
   hop (:mod:`bench.floor`) probed in the same rounds, then a few whole replies from each;
2. one stream over gRPC in the other formats: what each encoder adds;
3. for each higher level N: N voxrelay streams (gRPC, then WebSocket, then the OpenAI
   door) with limit and naive probes (the speech limit's, for the OpenAI door) running
   beside them, so that they see the upstream at the same load;
4. a fresh voxrelay: 1,000 idle WebSocket connections, then some of them streaming;
5. in process: each encoder's CPU, espeak's real-time factor.

The limit is measured beside the load rather than by N SDK clients of its own: N SDK
pipelines cost this process more CPU than the fake and voxrelay together, and a
saturated generator measures itself, not the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from fakes.openai_upstream import DEFAULT_REPLY, tokenize
from voxrelay.service.chunker import SentenceChunker

from . import children, report, variants
from .cached import cached_reply
from .clients import (
    GrpcClient,
    HttpClient,
    LimitClient,
    NaiveClient,
    Sample,
    SpeechLimitClient,
    StreamInClient,
    WsClient,
    whole_sentence_chunker,
)
from .floor import GrpcFloorClient, HttpFloorClient, WsFloorClient
from .idle import idle_connections
from .load import (
    Client,
    Group,
    Meter,
    PhaseResult,
    percentiles,
    run_interleaved,
    run_sequence,
    run_window,
)
from .micro import encoder_costs, espeak_rtf
from .procs import (
    ChildProcess,
    Pinning,
    cores_busy,
    fake_process,
    floor_process,
    pin_self,
    voxrelay_process,
)
from .profile import Profiler, summarise

__all__ = ["Config", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
#: A reply whose first sentence is long: the chunker releases its first clause early.
LONG_FIRST_SENTENCE = (
    "Sure thing, let me look that up for you, and while the timetable loads I can tell you"
    " that the trains on this line are nearly always on time in the mornings. "
    "A single ticket costs $3.50 for adults. Have a pleasant trip."
)


@dataclass(slots=True)
class Config:
    """What to run; ``--quick`` shrinks every count and duration."""

    quick: bool = False
    levels: list[int] = field(default_factory=lambda: [1, 100, 150, 200, 300, 400, 500])
    #: compressed formats measured at load over gRPC, at the levels of ``format_levels``
    #: (with the relay beside them they fill one core at 200–300 streams: the README)
    load_formats: list[str] = field(default_factory=lambda: ["opus", "mp3"])
    format_levels: list[int] = field(default_factory=lambda: [100, 150, 200, 300])
    #: seconds over which a level's streams start; None: one request cycle (reply + playback)
    ramp_s: float | None = None
    #: 30 s: about 450 replies at 200 streams, so that one slow reply does not set the p99
    window_s: float = 30.0
    #: 100 per client: below that a p99 is the slowest probe, one VM hiccup (5 min here)
    probes: int = 100
    full: int = 4
    format_probes: int = 15
    formats: list[str] = field(default_factory=lambda: ["mp3", "opus", "aac", "flac", "wav"])
    limit_probers: int = 4
    naive_probers: int = 2
    idle_connections: int = 1000
    idle_streaming: int = 200
    profile_streams: int = 200
    #: the side-by-side scenarios (bench.variants): probes at one stream, streams at load
    variant_probes: int = 50
    variant_streams: int = 200
    #: alternating off/on windows of the words scenario
    words_rounds: int = 2
    worker_levels: list[int] = field(default_factory=lambda: [300, 500])
    variants: bool = True
    out: Path = RESULTS
    pin: bool = True
    ttft_ms: float = 200.0
    token_ms: float = 20.0
    tts_first_byte_ms: float = 150.0
    tts_rtf: float = 0.2
    #: silence in front of each of the fake's speech responses (docs/performance.md): 0,
    #: so that first-byte figures compare like with like; ``--leading-silence-ms 150``
    #: models an OpenAI-compatible engine and shows the audible gain of trimming it
    leading_silence_ms: int = 0

    @classmethod
    def quick_config(cls, **overrides: Any) -> Config:
        values: dict[str, Any] = dict(
            quick=True,
            levels=[1, 5],
            ramp_s=0.0,  # every stream starts at once: one request each
            window_s=2.0,
            probes=3,
            full=1,
            format_probes=2,
            formats=["mp3"],
            limit_probers=1,
            naive_probers=1,
            idle_connections=0,
            profile_streams=0,
            format_levels=[5],
            variant_probes=3,
            variant_streams=5,
            words_rounds=1,
            worker_levels=[5],
        )
        values.update(overrides)
        return cls(**values)


def parse(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny run (1 and 5 streams, seconds)")
    p.add_argument("--levels", help="comma-separated stream counts, e.g. 1,50,100,200,300")
    p.add_argument("--window", type=float, help="seconds measured at each level")
    p.add_argument("--ramp", type=float, help="seconds over which a level's streams start")
    p.add_argument("--probes", type=int, help="1-stream TTFA probes per client")
    p.add_argument("--full", type=int, help="1-stream whole replies per client")
    p.add_argument("--formats", help="formats whose encoder delay to measure (comma list)")
    p.add_argument("--idle", type=int, help="idle WebSocket connections (0 skips the test)")
    p.add_argument("--idle-streaming", type=int, help="of which this many stream")
    p.add_argument(
        "--profile",
        type=int,
        metavar="STREAMS",
        help="py-spy voxrelay during the gRPC level of STREAMS (0: off)",
    )
    p.add_argument(
        "--load-formats", help="compressed formats measured at load (comma list; '' for none)"
    )
    p.add_argument("--format-levels", help="the levels at which --load-formats are measured")
    p.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the side-by-side settings (words, Redis limits, workers)",
    )
    p.add_argument("--out", type=Path, help=f"where to write the results (default {RESULTS})")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--ttft-ms", type=float)
    p.add_argument("--token-ms", type=float)
    p.add_argument("--tts-first-byte-ms", type=float)
    p.add_argument("--tts-rtf", type=float)
    p.add_argument("--leading-silence-ms", type=int)
    a = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    if a.levels:
        overrides["levels"] = sorted({int(x) for x in a.levels.split(",") if x.strip()} | {1})
    if a.formats is not None:
        overrides["formats"] = [x.strip() for x in a.formats.split(",") if x.strip()]
    if a.load_formats is not None:
        overrides["load_formats"] = [x.strip() for x in a.load_formats.split(",") if x.strip()]
    if a.format_levels:
        overrides["format_levels"] = [int(x) for x in a.format_levels.split(",") if x.strip()]
    if a.no_variants:
        overrides["variants"] = False
    for name, key in (
        ("window", "window_s"),
        ("ramp", "ramp_s"),
        ("probes", "probes"),
        ("full", "full"),
        ("idle", "idle_connections"),
        ("idle_streaming", "idle_streaming"),
        ("profile", "profile_streams"),
        ("out", "out"),
        ("ttft_ms", "ttft_ms"),
        ("token_ms", "token_ms"),
        ("tts_first_byte_ms", "tts_first_byte_ms"),
        ("tts_rtf", "tts_rtf"),
        ("leading_silence_ms", "leading_silence_ms"),
    ):
        if getattr(a, name) is not None:
            overrides[key] = getattr(a, name)
    if a.no_pin:
        overrides["pin"] = False
    return Config.quick_config(**overrides) if a.quick else Config(**overrides)


def latency_model(cfg: Config) -> dict[str, Any]:
    """Work out the limit the fake's latency model implies for its reply."""
    tokens = tokenize(DEFAULT_REPLY)
    chunker = SentenceChunker()
    released_at = len(tokens) - 1
    for i, token in enumerate(tokens):
        if chunker.feed(token):
            released_at = i
            break
    segments = SentenceChunker()
    count = len(segments.feed(DEFAULT_REPLY) + segments.flush())
    first_segment_tokens = released_at  # the token that released it comes after a stop
    return {
        "ttft_ms": cfg.ttft_ms,
        "token_ms": cfg.token_ms,
        "tts_first_byte_ms": cfg.tts_first_byte_ms,
        "tts_rtf": cfg.tts_rtf,
        "leading_silence_ms": cfg.leading_silence_ms,
        "reply_tokens": len(tokens),
        "reply_segments": count,
        "first_segment_tokens": first_segment_tokens,
        # The first token after ttft, then one per token_ms up to the releasing one.
        "model_limit_ms": cfg.ttft_ms + released_at * cfg.token_ms + cfg.tts_first_byte_ms,
        # The fake answers a whole (non-streamed) reply after ttft + token_ms per token.
        "model_naive_ms": cfg.ttft_ms + len(tokens) * cfg.token_ms + cfg.tts_first_byte_ms,
    }


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def machine_busy_pct(seconds: float = 2.0) -> float:
    """Return how busy the machine is before we start, in % of one core."""
    before = cores_busy()
    await asyncio.sleep(seconds)
    after = cores_busy()
    return round(100 * sum(after[k] - before[k] for k in after) / seconds, 1)


async def _close(clients: list[Client], child: ChildProcess) -> None:
    """Close *clients*, then stop *child*; again is a no-op."""
    for client in clients:
        await client.aclose()
    await child.stop()


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    """One run: owns the processes and collects the rows of the report."""

    def __init__(self, cfg: Config, pinning: Pinning) -> None:
        self.cfg = cfg
        self.pinning = pinning
        self.runs: list[dict[str, Any]] = []
        self.comparisons: list[dict[str, Any]] = []
        self.formats: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.profile: dict[str, Any] | None = None
        self.streamed_input: dict[str, Any] | None = None
        self.cycle_s = 1.0

    @property
    def _gen_core(self) -> str | None:
        return f"cpu{self.pinning.generator[0]}" if self.pinning.enabled else None

    def _row(
        self,
        kind: str,
        phase: PhaseResult,
        load: str,
        fmt: str = "pcm",
        *,
        keep: bool = True,
        with_samples: bool = True,
    ) -> dict[str, Any]:
        row = report.run_row(
            kind,
            phase,
            load=load,
            fmt=fmt,
            with_samples=with_samples,
            generator_core=self._gen_core,
        )
        if keep:
            self.runs.append(row)
        return row

    @property
    def ramp_s(self) -> float:
        """The configured ramp, else one request cycle: its reply, then its playback."""
        return self.cfg.ramp_s if self.cfg.ramp_s is not None else self.cycle_s

    async def single_stream(self, fake: ChildProcess, vox: ChildProcess) -> None:
        cfg = self.cfg
        base = str(fake.info["base_url"])
        # Each door's hop alone, in the same rounds: the floor under voxrelay's overhead.
        # Started before any channel here: grpc complains of a fork while it is busy.
        floor = await floor_process(self.pinning)
        clients: list[Client] = [
            LimitClient(base, 1),
            NaiveClient(base, 1),
            GrpcClient(str(vox.info["grpc"]), 1),
            WsClient(str(vox.info["websocket"]), 1),
            SpeechLimitClient(base, 1),
            HttpClient(str(vox.info["http"]), 1),
            StreamInClient(base, str(vox.info["grpc"]), 1),
        ]
        floors: list[Client] = [
            GrpcFloorClient(str(floor.info["grpc"]), 1),
            WsFloorClient(str(floor.info["websocket"]), 1),
            HttpFloorClient(str(floor.info["http"]), 1),
        ]
        rows: dict[str, dict[str, Any]] = {}
        grpc_phase = PhaseResult(1)
        try:
            async with Meter(vox, fake) as meter:
                for client in clients + floors:
                    for _ in range(2):  # warm connections and caches; not counted
                        await client.request(Sample(probe=True))
                _say(
                    "1 stream: limit, naive, grpc, ws, speech limit, http, streamed input"
                    " and the doors' floor probes, in turn"
                )
                probes = await run_interleaved(clients + floors, probes=cfg.probes)
                await _close(floors, floor)
                for client in clients:
                    _say(f"1 stream: {client.kind}, whole replies")
                    phase = await run_sequence(
                        client,
                        probes=0,
                        full=cfg.full,
                        meter=meter,
                        earlier=probes[client.kind],
                    )
                    rows[client.kind] = self._row(client.kind, phase, "alone")
                    if client.kind == "grpc":
                        grpc_phase = phase
                pcm = rows["grpc"]
                grpc = clients[2]
                for fmt in cfg.formats:
                    _say(f"1 stream: grpc {fmt}")
                    await grpc.request(Sample(probe=True), fmt=fmt)
                    phase = await run_sequence(
                        grpc, probes=cfg.format_probes, full=0, meter=meter, fmt=fmt
                    )
                    row = self._row("grpc", phase, "alone", fmt, keep=False, with_samples=False)
                    self.formats.append(self._format_row(fmt, row, pcm))
        finally:
            await _close(clients + floors, floor)
        self.streamed_input = report.streamed_input(
            rows["stream_in"], rows["grpc"], rows["limit"], latency_model(cfg)
        )
        for protocol in ("grpc", "ws", "http"):
            hop = [s.ttfa for s in probes[f"{protocol}_floor"] if s.ttfa is not None]
            speaks = protocol == "http"  # text spoken as written: the speech calls' limit
            limit = rows["speech_limit"] if speaks else rows["limit"]
            naive = None if speaks else rows["naive"]
            self.comparisons.append(report.compare(rows[protocol], limit, naive, percentiles(hop)))
        cycles = sorted(
            (s.ttfa or 0) + s.audio_s
            for s in grpc_phase.samples["grpc"]
            if not s.probe and s.error is None
        )
        if cycles:
            self.cycle_s = round(cycles[len(cycles) // 2], 1)

    async def _fake(self, reply: str | None = None) -> ChildProcess:
        """Start the fake upstream with the run's latency model (and *reply*, if given)."""
        cfg = self.cfg
        return await fake_process(
            self.pinning,
            ttft_ms=cfg.ttft_ms,
            token_ms=cfg.token_ms,
            tts_first_byte_ms=cfg.tts_first_byte_ms,
            tts_rtf=cfg.tts_rtf,
            reply=reply,
            leading_silence_ms=cfg.leading_silence_ms,
        )

    async def early_release(self) -> dict[str, Any]:
        """One stream, a reply with a long first sentence: its first clause vs the sentence.

        A fake of its own answers with :data:`LONG_FIRST_SENTENCE`. The limit is measured
        twice, cutting the first segment as voxrelay does (its first clause) and as a
        splitter that waits for the whole first sentence would; voxrelay is measured
        beside them.
        """
        cfg = self.cfg
        fake = await self._fake(LONG_FIRST_SENTENCE)
        try:
            vox = await voxrelay_process(self.pinning, str(fake.info["base_url"]))
            base = str(fake.info["base_url"])
            clients: list[Client] = [
                LimitClient(base, 1),
                LimitClient(base, 1, chunker=whole_sentence_chunker, kind="limit_sentence"),
                GrpcClient(str(vox.info["grpc"]), 1),
            ]
            result: dict[str, Any] = {"reply": LONG_FIRST_SENTENCE}
            try:
                async with Meter(vox, fake) as meter:
                    for client in clients:
                        await client.request(Sample(probe=True))  # warm up
                        phase = await run_sequence(client, probes=cfg.probes, full=0, meter=meter)
                        samples = [s.ttfa for s in phase.samples[client.kind] if s.ttfa]
                        result[client.kind] = percentiles(samples)
            finally:
                for client in clients:
                    await client.aclose()
                await vox.stop()
        finally:
            await fake.stop()
        early, whole, vox_ms = (result[k]["p50"] for k in ("limit", "limit_sentence", "grpc"))
        result["gain_ms"] = (
            round(whole - vox_ms, 1) if whole is not None and vox_ms is not None else None
        )
        result["beats_whole_sentence"] = (
            vox_ms < whole if vox_ms is not None and whole is not None else None
        )
        result["overhead_over_early_limit_ms"] = (
            round(vox_ms - early, 1) if vox_ms is not None and early is not None else None
        )
        return result

    async def cached_reply(self) -> dict[str, Any]:
        """The reply spoken once, then replayed from the phrase cache on both doors."""
        fake = await self._fake()
        try:
            return await cached_reply(
                self.pinning, str(fake.info["base_url"]), rounds=self.cfg.probes
            )
        finally:
            await fake.stop()

    async def variants(self) -> dict[str, Any]:
        """The side-by-side settings (:mod:`bench.variants`), each against a fresh fake."""
        cfg = self.cfg
        out: dict[str, Any] = {}
        fake = await self._fake()
        try:
            windows = variants.Windows(
                fake, ramp_s=self.ramp_s, window_s=cfg.window_s, say=_say, row=self._row
            )
            out["words"] = await variants.words_cost(
                self.pinning,
                windows,
                probes=cfg.variant_probes,
                streams=cfg.variant_streams,
                rounds=cfg.words_rounds,
            )
            out["limits"] = await variants.limits_cost(
                self.pinning,
                windows,
                probes=cfg.variant_probes,
                streams=cfg.variant_streams,
                limit_probers=cfg.limit_probers,
            )
            if out["limits"] is None:
                self.notes.append("redis-server is not installed: no Redis limits figures")
            out["workers"] = await variants.workers_capacity(
                windows, levels=cfg.worker_levels, limit_probers=cfg.limit_probers
            )
        finally:
            await fake.stop()
        return out

    @staticmethod
    def _format_row(fmt: str, row: dict[str, Any], pcm: dict[str, Any]) -> dict[str, Any]:
        t, base = row["ttfa_ms"], pcm["ttfa_ms"]
        added = {
            k: (None if t[k] is None or base[k] is None else round(t[k] - base[k], 2))
            for k in ("p50", "p95", "p99")
        }
        return {
            "format": fmt,
            "probes": row["requests"],
            "errors": row["errors"],
            "ttfa_ms": t,
            "added_ms": added,
            "first_output_after_audio_ms": None,
        }

    async def level(self, streams: int, fake: ChildProcess, vox: ChildProcess) -> None:
        cfg = self.cfg
        base = str(fake.info["base_url"])
        limit = LimitClient(base, cfg.limit_probers)
        naive = NaiveClient(base, cfg.naive_probers)
        speech_limit = SpeechLimitClient(base, cfg.limit_probers)
        beside: dict[str, list[PhaseResult]] = {"limit": [], "naive": []}
        # The profile gets a pass of its own after the measured ones: py-spy reading
        # voxrelay's memory (and running on the generator's core) must not tilt them.
        passes = [("grpc", "pcm", False), ("ws", "pcm", False), ("http", "pcm", False)]
        if streams in cfg.format_levels:
            passes += [("grpc", fmt, False) for fmt in cfg.load_formats]
        if streams == cfg.profile_streams:
            if Profiler.available():
                passes.append(("grpc", "pcm", True))
            else:
                self.notes.append("py-spy is not installed: no profile taken")
        try:
            for protocol, fmt, profiled in passes:
                what = "py-spy, not measured" if profiled else "+ limit and naive probes"
                _say(f"{streams} streams: {protocol} {fmt} ({what})")
                client: GrpcClient | WsClient | HttpClient
                if protocol == "grpc":
                    client = GrpcClient(str(vox.info["grpc"]), streams)
                elif protocol == "ws":
                    client = WsClient(str(vox.info["websocket"]), streams)
                    await client.open()
                else:
                    client = HttpClient(str(vox.info["http"]), streams)
                speaks = protocol == "http"
                prober: Client = speech_limit if speaks else limit
                groups = [
                    Group(client, streams, fmt=fmt),
                    Group(prober, cfg.limit_probers, probe=True),
                ]
                if cfg.naive_probers and not speaks:
                    groups.append(Group(naive, cfg.naive_probers, probe=True))
                profiler = None
                if profiled:
                    profiler = Profiler(
                        vox.pid,
                        cfg.out / f"profile-grpc-{streams}.txt",
                        cfg.window_s,
                        prefix=self.pinning.prefix(self.pinning.generator),
                    )
                try:
                    async with Meter(vox, fake) as meter:
                        if profiler is not None:
                            await profiler.start()
                        phase = await run_window(
                            groups, ramp_s=self.ramp_s, window_s=cfg.window_s, meter=meter
                        )
                finally:
                    await client.aclose()
                if profiler is not None and await profiler.wait():
                    self.profile = {
                        "protocol": protocol,
                        "streams": streams,
                        "file": profiler.path.name,
                        **summarise(profiler.path),
                    }
                vox_row = self._row(protocol, phase, "listeners", fmt, keep=not profiled)
                if profiled:
                    if self.profile is not None:
                        per_s = (vox_row["voxrelay"] or {}).get("cpu_ms_per_audio_s")
                        self.profile["cpu_ms_per_audio_s"] = per_s
                        for stage in self.profile["stages"]:
                            share = stage["pct"] / 100
                            stage["cpu_ms_per_audio_s"] = round(share * per_s, 2) if per_s else None
                    continue
                beside_what = f"beside_{protocol}" + ("" if fmt == "pcm" else f"_{fmt}")
                lim_row = self._row(prober.kind, phase, beside_what, keep=speaks)
                naive_row = (
                    self._row("naive", phase, beside_what, keep=False)
                    if cfg.naive_probers and not speaks
                    else None
                )
                self.comparisons.append(report.compare(vox_row, lim_row, naive_row))
                if not speaks:
                    beside["limit"].append(phase)
                    beside["naive"].append(phase)
                if phase.extra:
                    self.notes.append(f"{protocol} {fmt} at {streams} streams: {phase.extra}")
                await asyncio.sleep(1.0)
        finally:
            await limit.aclose()
            await naive.aclose()
            await speech_limit.aclose()
        # One row each for the limit and the naive pipeline at this load: both phases' probes.
        for kind in ("limit", "naive"):
            if kind == "naive" and not cfg.naive_probers:
                continue
            pooled = PhaseResult(streams)
            pooled.samples[kind] = [s for p in beside[kind] for s in p.samples.get(kind, [])]
            pooled.window_s = sum(p.window_s for p in beside[kind])
            first = beside[kind][0]
            pooled.cpu_pct, pooled.loop_lag = first.cpu_pct, first.loop_lag
            self._row(kind, pooled, "beside_voxrelay")

    async def idle(self, fake: ChildProcess) -> dict[str, Any] | None:
        cfg = self.cfg
        if not cfg.idle_connections:
            return None
        _say(f"idle: {cfg.idle_connections} WebSocket connections, {cfg.idle_streaming} streaming")
        vox = await voxrelay_process(self.pinning, str(fake.info["base_url"]))
        try:
            result = await idle_connections(
                vox,
                fake,
                connections=cfg.idle_connections,
                streaming=min(cfg.idle_streaming, cfg.idle_connections),
                ramp_s=self.ramp_s,
                window_s=cfg.window_s,
            )
        finally:
            await vox.stop()
        phase: PhaseResult = result["streaming"].pop("phase")
        row = self._row("ws", phase, f"{cfg.idle_connections}_open", keep=False, with_samples=False)
        result["streaming"].update(
            ttfa_ms=row["ttfa_ms"],
            total_ms=row["total_ms"],
            requests=row["requests"],
            errors=row["errors"],
            error_kinds=row["error_kinds"],
            stalled_streams=row["stalled_streams"],
            voxrelay=row["voxrelay"],
        )
        return result

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        cfg.out.mkdir(parents=True, exist_ok=True)
        model = latency_model(cfg)
        busy = await machine_busy_pct()
        if busy > 15:
            message = (
                f"the machine was {busy:g}% busy (of one core) before the run: other "
                "processes share these cores, so timings and capacity are pessimistic"
            )
            _say(message)
            self.notes.append(message)
        _say(f"starting the fake upstream and voxrelay ({self.pinning.note or 'pinned'})")
        fake = await self._fake()
        idle: dict[str, Any] | None = None
        try:
            vox = await voxrelay_process(self.pinning, str(fake.info["base_url"]))
            try:
                await self.single_stream(fake, vox)
                for streams in cfg.levels:
                    if streams > 1:
                        await self.level(streams, fake, vox)
            finally:
                await vox.stop()
                problems = vox.problems()
                if problems:
                    self.notes.append(
                        f"voxrelay logged {len(problems)} warnings; first: {problems[0][:300]}"
                    )
            idle = await self.idle(fake)
        finally:
            await fake.stop()
        _say("1 stream: a long first sentence (early release vs the whole sentence)")
        early = await self.early_release()
        _say("1 stream: a reply all in the phrase cache, on both doors")
        cache = await self.cached_reply()
        variants = await self.variants() if cfg.variants else {}
        _say("encoders and espeak, in process")
        encoders = encoder_costs(seconds=3.0 if cfg.quick else 10.0, repeats=1 if cfg.quick else 3)
        swallowed = {e["format"]: e["first_output_after_audio_ms"] for e in encoders}
        for f in self.formats:
            f["first_output_after_audio_ms"] = swallowed.get(f["format"])
        espeak = await espeak_rtf()
        doc: dict[str, Any] = {
            "schema": report.SCHEMA,
            "quick": cfg.quick,
            "started_at": started_at,
            "elapsed_s": 0.0,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "busy_before_run_pct": busy,
                "pinning": self.pinning.note
                or (
                    f"voxrelay on core {list(self.pinning.voxrelay)}, fake and load generator "
                    f"on core {list(self.pinning.generator)}"
                ),
            },
            "latency_model": model,
            "levels": cfg.levels,
            "config": {
                "levels": cfg.levels,
                "ramp_s": self.ramp_s,
                "window_s": cfg.window_s,
                "cycle_s": self.cycle_s,
                "pacing": "each stream's next request once its audio has played in real time",
                "probes_1_stream": cfg.probes,
                "full_1_stream": cfg.full,
                "limit_probers_beside_load": cfg.limit_probers,
                "naive_probers_beside_load": cfg.naive_probers,
                "stall_limit_ms": report.STALL_LIMIT_MS,
            },
            "runs": self.runs,
            "comparisons": self.comparisons,
            "capacity": report.capacity(self.comparisons),
            "formats": self.formats,
            "encoders": encoders,
            "espeak": espeak,
            "idle": idle,
            "early_release": early,
            "cache": cache,
            "streamed_input": self.streamed_input,
            "words": variants.get("words"),
            "limits": variants.get("limits"),
            "workers": variants.get("workers"),
            "profile": self.profile,
            "targets": [],
            "notes": self.notes,
        }
        doc["targets"] = report.targets(doc)
        doc["elapsed_s"] = round(time.perf_counter() - started, 1)
        return doc


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    _raise_fd_limit()
    pinning = Pinning.detect() if cfg.pin else Pinning.none("--no-pin")
    pin_self(pinning)
    # The generator stamps every chunk's arrival: a collection pausing it (its gen-1 ones
    # took 30-45 ms at 200 streams) reads as a stall of every stream at once. So the
    # collector is off while it runs; each phase collects before it starts timing.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        # uvloop, as voxrelay runs: the generator shares its core with the fake upstream.
        with (
            children.stopping_children(),
            asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        ):
            doc = runner.run(Bench(cfg, pinning).run())
    finally:
        gc.enable()
        gc.unfreeze()
    paths = report.write(doc, cfg.out)
    text = paths["markdown"].read_text()
    print(text)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
