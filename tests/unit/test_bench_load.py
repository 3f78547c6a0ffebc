"""The benchmark's load generator paces its listeners as real ones, whatever its timers do."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from typing import Any

from bench.clients import Sample
from bench.load import Group, Meter, run_window

#: uvloop's timers count whole milliseconds: they may fire up to this much early.
EARLY_S = 0.002
AUDIO_S = 0.05
WINDOW_S = 0.125


class EarlyTimers(asyncio.SelectorEventLoop):
    """A loop whose every timer fires :data:`EARLY_S` early."""

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        return super().call_at(when - EARLY_S, callback, *args, context=context)


class Listener:
    """A client whose replies come at once, each with :data:`AUDIO_S` of audio to play."""

    kind = "grpc"

    def __init__(self) -> None:
        self.by_worker: defaultdict[object, list[Sample]] = defaultdict(list)

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None:
        sample.started = time.perf_counter()
        sample.ttfa = sample.total = 0.001
        sample.audio_s = AUDIO_S
        self.by_worker[asyncio.current_task()].append(sample)

    async def aclose(self) -> None:
        pass


def test_a_listener_sends_its_next_request_only_once_its_audio_has_played() -> None:
    listener = Listener()

    async def phase() -> None:
        await run_window(
            [Group(listener, 3)], ramp_s=0.0, window_s=WINDOW_S, meter=Meter(None, None)
        )

    with asyncio.Runner(loop_factory=EarlyTimers) as runner:
        runner.run(phase())

    assert len(listener.by_worker) == 3
    for samples in listener.by_worker.values():
        assert len(samples) >= 2
        for before, after in itertools.pairwise(samples):
            played = before.started + (before.ttfa or 0) + before.audio_s
            # Never while the last reply still plays (a burst at the window's end did).
            assert after.started >= played - EARLY_S - 0.005, (
                f"a request {1000 * (played - after.started):.1f} ms before the last reply"
                " had played"
            )
