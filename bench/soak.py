"""``make soak``: does voxrelay hold while it is abused? Normal traffic and the attack at once.

``python -m bench.soak`` (``make soak``, about 13 minutes; ``--quick`` about 3½) starts the
soak's fake upstream (:mod:`bench.soak_upstream`) and voxrelay on free loopback ports, with the
embedded espeak engine for speech and the fake as its chat upstream, and SPEC's default limits.

1. *Idle*: one request at a time of each kind (gRPC and WebSocket, speak and chat): the time
   to first audio (TTFA) of an idle server.
2. *Soak*: normal clients of every kind, a bounded number, each asking again once its answer
   has played, and every attack of :mod:`bench.soak_attacks` at once (in a process of its
   own: see :class:`Attacker`). Every caller has a loopback address of its own. Every 10 s a
   :class:`~bench.soak_watch.Point`: voxrelay's RSS and open descriptors (its process and
   every process under it; descriptors also without the callers' connections), threads,
   event loop tasks, streams in flight, and the normal clients' TTFA p50/p99 over those 10 s.
3. *Settle*: the attack stops; voxrelay should return to no streams in flight. Then the idle
   pass once more: the lower of the two idle p99s is the bar (the machine is shared, and a
   neighbour's burst during one pass raises it).

It prints a table and one PASS/FAIL line per criterion — RSS and descriptors (other than
callers' connections, which come and go with the attack) flat after the warm-up (growth under
10 %), no normal request failed, normal TTFA p99 within 2× the idle
server's, the embedded engine's breaker never open — and writes ``bench/results/soak-*.json``
and ``.png``. The exit status is 0 only if every criterion passed.

Every process it starts is stopped on any exit: a normal end, an error, or SIGINT, SIGTERM,
SIGHUP, SIGQUIT (and, as a last resort, at interpreter exit). A memory guard ends the attack
early if voxrelay's RSS passes ``--rss-guard-mb``: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import children as child_processes
from .load import percentiles
from .procs import ChildProcess, Pinning, fake_process, voxrelay_process
from .soak_attacks import ATTACKING, TALLY, Targets
from .soak_clients import KINDS, NormalClient, Outcome, SourceHops, loopback
from .soak_watch import Point, Watch

__all__ = ["Plan", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
#: SPEC's defaults (the bench's own raise them all); chat through the fake, speech embedded.
SOAK_ENV = {
    "VOXRELAY_LLM": "openai",
    "VOXRELAY_TTS": "espeak",
    "VOXRELAY_VOICE": "en-us",
    "VOXRELAY_MAX_STREAMS": "256",
    "VOXRELAY_MAX_CONNECTIONS": "4096",
    "VOXRELAY_MAX_CONNECTIONS_PER_IP": "64",
    "VOXRELAY_RATE_LIMIT_PER_MIN": "60",
    "VOXRELAY_CHARS_PER_MIN": "20000",
    "VOXRELAY_MAX_STREAMS_PER_KEY": "4",
}
GROWTH_LIMIT = 0.10
TTFA_FACTOR = 2.0
ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_BREAKER = 'voxrelay_breaker_open{provider="espeak",stage="tts"}'


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how hard: ``--quick`` or the full run."""

    idle_rounds: int
    soak_s: float
    #: RSS and descriptors are judged from here on: one hold and more, since the memory
    #: held for the attack's replies grows until its first streams are given up or capped.
    warmup_s: float
    hold_s: float
    normal_per_kind: int
    attack_scale: float
    every_s: float = 10.0
    request_timeout_s: float = 60.0

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                idle_rounds=5,
                soak_s=150,
                warmup_s=60,
                hold_s=45,
                normal_per_kind=2,
                attack_scale=1.0,
            )
        return cls(
            idle_rounds=15,
            soak_s=660,
            warmup_s=150,
            hold_s=120,
            normal_per_kind=2,
            attack_scale=1.0,
        )


@dataclass(slots=True)
class Run:
    """Everything measured, for the report."""

    plan: Plan
    idle: list[Outcome] = field(default_factory=list)
    #: the same idle pass once the attack has settled.
    idle_again: list[Outcome] = field(default_factory=list)
    normal: list[Outcome] = field(default_factory=list)
    idle_point: Point | None = None
    after_point: Point | None = None
    #: attack name → what each of its attempts ended in.
    attacks: dict[str, Counter[str]] = field(default_factory=dict)
    guard_tripped: str | None = None
    log_problems: list[str] = field(default_factory=list)


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Children: stopped on every way out


class Children:
    """The processes this run started; stop them all, however it ends."""

    def __init__(self) -> None:
        self.started: list[ChildProcess] = []
        atexit.register(self.kill_now)

    def add(self, child: ChildProcess) -> ChildProcess:
        self.started.append(child)
        return child

    async def stop(self) -> None:
        for child in reversed(self.started):
            with contextlib.suppress(Exception):
                await child.stop(timeout=15)

    def kill_now(self) -> None:
        """Kill every child's process group (each was started in a session of its own)."""
        for child in self.started:
            if child.proc.returncode is None:
                with contextlib.suppress(OSError):
                    os.killpg(child.pid, signal.SIGKILL)


# The phases


async def normal_client(targets: Targets, plan: Plan, kind: str, address: str) -> NormalClient:
    """A normal client of *kind* that calls either door from *address*."""
    return NormalClient(
        kind,
        grpc_target=await targets.grpc_from(address),
        ws_url=targets.ws_url,
        address=address,
        timeout_s=plan.request_timeout_s,
    )


async def idle_phase(targets: Targets, plan: Plan, into: list[Outcome]) -> None:
    """One request at a time, each kind in turn; a warm-up round first is not counted."""
    clients = {
        kind: await normal_client(targets, plan, kind, loopback(1, 200 + k))
        for k, kind in enumerate(KINDS)
    }
    try:
        for kind in KINDS:
            await clients[kind].request()
        for _ in range(plan.idle_rounds):
            for kind in KINDS:
                into.append(await clients[kind].request())
                await asyncio.sleep(0.2)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients.values()))


def idle_reference(run: Run) -> tuple[float | None, str]:
    """Return the idle TTFA p99 the soak is judged against, and where it comes from.

    The machine is shared: a neighbour's burst during one idle pass raises its p99 (≈ its
    maximum) and with it the bar. Of the pass before the attack and the one after it, the
    lower p99 is the idle server's.
    """
    before = percentiles([o.ttfa for o in run.idle if o.ttfa is not None])["p99"]
    after = percentiles([o.ttfa for o in run.idle_again if o.ttfa is not None])["p99"]
    known = [v for v in (before, after) if v is not None]
    return (min(known) if known else None), f"idle p99 {before} ms before, {after} ms after"


async def normal_worker(client: NormalClient, stop: asyncio.Event, run: Run) -> None:
    while not stop.is_set():
        out = await client.request()
        run.normal.append(out)
        if out.error is not None:
            say(f"normal {client.kind} failed: {out.error}")
        await client.listen(out)


class Attacker:
    """The attack, in a process of its own (``python -m bench.soak_attacks``).

    Its clients' work (reading huge replies, building frames) then never delays the normal
    clients' event loop, whose clock measures voxrelay's time to first audio; a real
    server's attackers are not on its users' machines either.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.tally: dict[str, Counter[str]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(TALLY):
                found = json.loads(line.removeprefix(TALLY))
                self.tally = {name: Counter(outcomes) for name, outcomes in found.items()}

    async def stop(self) -> dict[str, Counter[str]]:
        """End the attack (SIGTERM); return what each attempt ended in."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        child_processes.forget(self.proc.pid)
        if self.reader is not None:  # the tally is its last line
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reader, 10)
        return self.tally


async def start_attack(targets: Targets, plan: Plan) -> Attacker:
    """Start the attack process; return once every attack runs."""
    argv = [sys.executable, "-m", "bench.soak_attacks", "--grpc", targets.grpc]
    argv += ["--ws", targets.ws_url, "--hold", str(plan.hold_s), "--scale", str(plan.attack_scale)]
    proc = await child_processes.spawn(
        "soak attack",
        *argv,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    attacker = Attacker(proc)
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while (line := await proc.stdout.readline()) and line.strip() != ATTACKING.encode():
            pass
    if proc.returncode is not None or not line:
        raise RuntimeError("the attack process did not start")
    attacker.reader = asyncio.create_task(attacker.read())
    return attacker


async def soak_phase(
    targets: Targets, voxrelay: ChildProcess, watch: Watch, plan: Plan, run: Run, args: Any
) -> None:
    stop = asyncio.Event()
    clients = [
        await normal_client(targets, plan, kind, loopback(1, i * len(KINDS) + k))
        for i in range(plan.normal_per_kind)
        for k, kind in enumerate(KINDS)
    ]
    attacker = await start_attack(targets, plan)
    watch.phase = "soak"
    normals = [asyncio.create_task(normal_worker(c, stop, run)) for c in clients]
    try:
        deadline = time.monotonic() + plan.soak_s
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            rss = watch.points[-1].rss_mb if watch.points else 0.0
            if rss > args.rss_guard_mb:
                run.guard_tripped = f"voxrelay RSS {rss:.0f} MB > {args.rss_guard_mb} MB"
                say(f"memory guard: {run.guard_tripped}; ending the attack early")
                break
            if voxrelay.proc.returncode is not None:
                run.guard_tripped = f"voxrelay exited with {voxrelay.proc.returncode}"
                say(run.guard_tripped)
                break
    finally:
        stop.set()
        watch.phase = "settle"
        # Attacks hold their streams until cancelled; normal clients finish their request.
        run.attacks = await attacker.stop()
        _, pending = await asyncio.wait(normals, timeout=plan.request_timeout_s + 5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*normals, return_exceptions=True)
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


# Criteria


def _growth(points: list[Point], attr: str, warmup_s: float, t0: float) -> tuple[float, str]:
    """Return the growth of *attr* after the warm-up, and a description.

    The attack's huge replies come and go, so single points swing widely; the peak of the
    second half against the peak of the first half is what a leak moves and noise does not.
    """
    after = [getattr(p, attr) for p in points if p.phase == "soak" and p.t >= t0 + warmup_s]
    if len(after) < 4:
        return float("nan"), "too few points after the warm-up"
    half = len(after) // 2
    first, second = max(after[:half]), max(after[half:])
    growth = second / first - 1 if first else float("inf")
    return growth, (
        f"peak {first:.0f} in the first half after the warm-up, {second:.0f} in the second, "
        f"{growth:+.1%} (from {after[0]:.0f} to {after[-1]:.0f})"
    )


def criteria(run: Run, watch: Watch, soak_t0: float) -> list[tuple[str, bool, str]]:
    plan = run.plan
    out = []
    flat = (("rss_mb", "RSS flat (MB)"), ("own_fds", "descriptors flat (callers' excluded)"))
    for attr, label in flat:
        growth, detail = _growth(watch.points, attr, plan.warmup_s, soak_t0)
        out.append((label, growth < GROWTH_LIMIT, detail))
    failed = [o for o in run.normal if o.error is not None]
    reasons = Counter(o.error for o in failed)
    detail = f"{len(failed)} of {len(run.normal)} failed"
    if reasons:
        detail += f": {dict(reasons)}"
    out.append(("no normal request fails", bool(run.normal) and not failed, detail))
    idle, where = idle_reference(run)
    soak = percentiles([o.ttfa for o in run.normal if o.ttfa is not None])["p99"]
    ok = idle is not None and soak is not None and soak <= TTFA_FACTOR * idle
    out.append(("normal TTFA p99 within 2x idle", ok, f"{soak} ms vs {idle} ms ({where})"))
    opened = [(t, k) for t, k in watch.breaker_opened if k == EMBEDDED_BREAKER]
    logged = [line for line in run.log_problems if "circuit breaker" in line and "tts" in line]
    failures = sum(
        v
        for k, v in watch.last.items()
        if k.startswith("voxrelay_upstream_failures_total{") and 'provider="espeak"' in k
    )
    detail = f"{len(opened)} polls saw it open, {failures:.0f} failed espeak calls"
    if opened:
        detail += f", first open at {opened[0][0]:.0f} s"
    out.append(("embedded engine breaker never opens", not opened and not logged, detail))
    if run.guard_tripped:
        out.append(("run completed", False, run.guard_tripped))
    return out


# Report


def table(points: list[Point]) -> str:
    head = (
        f"{'t s':>6} {'phase':<7} {'RSS MB':>8} {'main':>6} {'fds':>5} {'own':>4} {'thr':>4} "
        f"{'procs':>5} "
        f"{'tasks':>6} {'streams':>7} {'grpc':>5} {'wsconn':>6} {'ok':>4} {'fail':>4} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )

    def n(v: float | None, width: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.0f}"

    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(
            f"{p.t:>6.0f} {p.phase:<7} {p.rss_mb:>8.1f} {p.main_rss_mb:>6.0f} {p.fds:>5} "
            f"{p.own_fds:>4} {p.threads:>4} {p.processes:>5} {n(p.tasks, 6)} "
            f"{n(p.active_streams, 7)} {n(p.grpc_streams, 5)} "
            f"{n(p.ws_connections, 6)} {p.normal_ok:>4} {p.normal_failed:>4} "
            f"{n(p.ttfa_p50_ms, 8)} {n(p.ttfa_p99_ms, 8)}"
        )
    return "\n".join(lines)


def plot(
    points: list[Point], idle_p99: float | None, soak_t0: float, warmup_s: float, out: Path
) -> bool:
    """Draw each series against time; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [p.t for p in points]
    fig, axes = plt.subplots(5, 1, figsize=(10, 13), sharex=True)
    series: list[tuple[Any, list[tuple[str, list[Any]]], str]] = [
        (axes[0], [("RSS (voxrelay and children)", [p.rss_mb for p in points])], "MB"),
        (
            axes[1],
            [
                ("open descriptors", [p.fds for p in points]),
                ("not callers' connections", [p.own_fds for p in points]),
            ],
            "count",
        ),
        (
            axes[2],
            [
                ("event loop tasks", [p.tasks for p in points]),
                ("threads", [p.threads for p in points]),
            ],
            "count",
        ),
        (
            axes[3],
            [
                ("streams in flight", [p.active_streams for p in points]),
                ("of which gRPC", [p.grpc_streams for p in points]),
                ("WebSocket connections", [p.ws_connections for p in points]),
            ],
            "count",
        ),
        (
            axes[4],
            [
                ("normal TTFA p50", [p.ttfa_p50_ms for p in points]),
                ("normal TTFA p99", [p.ttfa_p99_ms for p in points]),
            ],
            "ms",
        ),
    ]
    for ax, lines, unit in series:
        for label, values in lines:
            ax.plot(t, [float("nan") if v is None else v for v in values], marker=".", label=label)
        ax.set_ylabel(unit)
        ax.axvspan(soak_t0, soak_t0 + warmup_s, color="0.9", label="warm-up")
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    if idle_p99 is not None:
        axes[4].axhline(idle_p99, color="green", linestyle=":", label="idle p99")
        axes[4].axhline(TTFA_FACTOR * idle_p99, color="red", linestyle="--", label="2x idle p99")
        axes[4].legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("seconds since start")
    fig.suptitle("voxrelay soak: normal traffic and the attack at once")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def report(run: Run, watch: Watch, soak_t0: float, out_dir: Path) -> bool:
    """Print the table and the verdicts; write JSON and the plot. Return whether all passed."""
    print(table(watch.points))
    print()
    idle = percentiles([o.ttfa for o in run.idle if o.ttfa is not None])
    idle_again = percentiles([o.ttfa for o in run.idle_again if o.ttfa is not None])
    by_kind = {
        kind: {
            phase: percentiles([o.ttfa for o in outcomes if o.kind == kind and o.ttfa])
            for phase, outcomes in (
                ("idle", run.idle),
                ("soak", run.normal),
                ("idle_again", run.idle_again),
            )
        }
        for kind in KINDS
    }
    print("normal TTFA by kind (ms), p50/p99: idle → soak → idle again")
    for kind, phases in by_kind.items():
        shown = " → ".join(f"{p['p50']}/{p['p99']}" for p in phases.values())
        print(f"  {kind:<11} {shown}")
    print("\nattack outcomes:")
    for name, tally in run.attacks.items():
        print(f"  {name}: {dict(sorted(tally.items()))}")
    if run.after_point is not None and run.idle_point is not None:
        after, before = run.after_point, run.idle_point
        print(
            f"\nafter the attack: streams {after.active_streams}, tasks {after.tasks} "
            f"(idle {before.tasks}), fds {after.fds} (idle {before.fds}), "
            f"RSS {after.rss_mb} MB (idle {before.rss_mb} MB)"
        )
    if run.log_problems:
        print(f"\nvoxrelay logged {len(run.log_problems)} warnings and errors:")
        for what, count in log_summary(run.log_problems).most_common(12):
            print(f"  {count:>5}  {what}")
    if own := own_errors(run.log_problems):
        entry = json.loads(own[0])
        print(f"\nvoxrelay's own errors: {len(own)}; the first one's traceback ends:")
        print("  " + str(entry.get("exc", entry.get("msg")))[-1500:].replace("\n", "\n  "))
    verdicts = criteria(run, watch, soak_t0)
    print()
    for label, ok, detail in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {detail}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    doc = {
        "plan": _fields(run.plan),
        "points": [p.row() for p in watch.points],
        "idle_point": run.idle_point.row() if run.idle_point else None,
        "after_point": run.after_point.row() if run.after_point else None,
        "ttfa_ms": {"idle": idle, "idle_again": idle_again, "by_kind": by_kind},
        "normal_failures": [o.error for o in run.normal if o.error],
        # every normal request: its kind, when it started (s into the soak), its TTFA (ms).
        "normal": [
            [o.kind, round(o.started - watch.started - soak_t0, 2), _ms(o.ttfa)] for o in run.normal
        ],
        "attacks": {name: dict(tally) for name, tally in run.attacks.items()},
        "breaker_opened": watch.breaker_opened[:100],
        "log_summary": dict(log_summary(run.log_problems)),
        "log_problems": run.log_problems[:50],
        "voxrelay_errors": own_errors(run.log_problems)[:200],
        "criteria": [{"name": n, "pass": ok, "detail": d} for n, ok, d in verdicts],
    }
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1))
    reference, _ = idle_reference(run)
    drawn = plot(watch.points, reference, soak_t0, run.plan.warmup_s, Path(f"{stem}.png"))
    say(f"wrote {stem}.json" + (f" and {stem}.png" if drawn else " (no matplotlib: no plot)"))
    return all(ok for _, ok, _ in verdicts)


def own_errors(lines: list[str]) -> list[str]:
    """Return the error lines voxrelay's own loggers wrote (not grpc's or websockets')."""
    out = []
    for line in lines:
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(line)
            if entry.get("level") == "error" and str(entry.get("logger")).startswith("voxrelay"):
                out.append(line)
    return out


def log_summary(lines: list[str]) -> Counter[str]:
    """Count log lines by level, logger and the start of their message."""
    kinds: Counter[str] = Counter()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            kinds[line[:80]] += 1
            continue
        message = re.sub(r"\d+(\.\d+)?", "#", str(entry.get("msg", "")))[:70]
        extra = f" [{entry['outcome']}]" if "outcome" in entry else ""
        kinds[f"{entry.get('level')} {entry.get('logger')}: {message}{extra}"] += 1
    return kinds


def _fields(plan: Plan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in plan.__slots__}


# The run


async def soak(args: argparse.Namespace) -> bool:
    plan = Plan.of(args.quick)
    if args.minutes is not None:
        plan = Plan(**{**_fields(plan), "soak_s": args.minutes * 60, "every_s": args.every})
    else:
        plan = Plan(**{**_fields(plan), "every_s": args.every})
    run = Run(plan)
    children = Children()
    pinning = Pinning.none("the soak shares the machine")
    hops: SourceHops | None = None
    try:
        say("starting the fake upstream and voxrelay")
        fake = children.add(
            await fake_process(
                pinning,
                ttft_ms=200,
                token_ms=20,
                tts_first_byte_ms=150,
                tts_rtf=0.2,
                reply=None,
                module="bench.soak_upstream",
            )
        )
        voxrelay = children.add(
            await voxrelay_process(pinning, fake.info["base_url"], extra_env=SOAK_ENV)
        )
        hops = SourceHops(voxrelay.info["grpc"])
        targets = Targets(grpc=voxrelay.info["grpc"], ws_url=voxrelay.info["websocket"], hops=hops)
        ports = frozenset(
            urlsplit(url).port or 0
            for url in (f"//{targets.grpc}", targets.ws_url, voxrelay.info["metrics"])
        )
        watch = Watch(
            voxrelay.pid, voxrelay.info["metrics"], lambda: run.normal, ports, plan.every_s
        )
        say(f"idle: {plan.idle_rounds} rounds of {', '.join(KINDS)}, one request at a time")
        watch.phase = "idle"
        await watch.poll()
        watch.sample()
        await idle_phase(targets, plan, run.idle)
        await watch.poll()
        run.idle_point = watch.sample()
        failed = [o.error for o in run.idle if o.error]
        say(f"idle TTFA {percentiles([o.ttfa for o in run.idle if o.ttfa])}; failed: {failed}")
        soak_t0 = watch.now()
        say(
            f"soak: {plan.soak_s:.0f} s of normal traffic and the attack, a point every "
            f"{plan.every_s:.0f} s"
        )

        def show(p: Point) -> None:
            say(
                f"t={p.t:.0f}s RSS {p.rss_mb} MB, fds {p.fds}, tasks {p.tasks}, "
                f"streams {p.active_streams}, TTFA p99 {p.ttfa_p99_ms} ms, "
                f"normal ok/failed {p.normal_ok}/{p.normal_failed}"
            )

        watcher = asyncio.create_task(watch.run(show))
        try:
            await soak_phase(targets, voxrelay, watch, plan, run, args)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        say("settle: waiting for voxrelay to have no stream in flight")
        run.after_point = await watch.settle(45.0)
        say("idle again: the same pass as before the attack")
        watch.phase = "idle2"
        await idle_phase(targets, plan, run.idle_again)
        await watch.poll()
        watch.sample()
        run.log_problems = voxrelay.problems()
        return report(run, watch, soak_t0, args.out)
    finally:
        say("stopping the processes")
        if hops is not None:
            await hops.aclose()
        await children.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run (about 3 minutes)")
    p.add_argument("--minutes", type=float, help="length of the soak phase (overrides the plan)")
    p.add_argument("--every", type=float, default=10.0, help="seconds between points")
    p.add_argument(
        "--rss-guard-mb",
        type=float,
        default=4096.0,
        help="end the attack early past this RSS (the machine is shared)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder ({RESULTS})")
    args = p.parse_args(argv)

    async def guarded() -> bool:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        caught: list[int] = []

        def on_signal(signum: int) -> None:
            if not caught:  # the first one cancels the run; its cleanup then goes on
                caught.append(signum)
                say(f"signal {signal.Signals(signum).name}: stopping")
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            loop.add_signal_handler(sig, on_signal, sig)
        return await soak(args)

    try:
        passed = asyncio.run(guarded())
    except asyncio.CancelledError:
        return 130
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
