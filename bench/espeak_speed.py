"""Time the embedded engine alone: first chunk and real-time factor over 50 sentences.

Run as ``python -m bench.espeak_speed [--rounds N] [--module M]``. Sentences are spoken
one after another by one engine, as a stream's segments are; each is timed from the call
to its first chunk and to its end, and each figure is the best of the rounds. ``--module``
names another module with an ``EspeakEngine`` (say, an older copy) to compare. Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import statistics
import time
from typing import Any

SENTENCES = [
    f"Sentence number {n} of the benchmark, in which the gateway speaks a reply "
    "of ordinary length to a caller who is listening."
    if n % 3
    else f"Short one, {n}."
    for n in range(50)
]


async def measure(rounds: int, module: str) -> dict[str, Any]:
    engine = importlib.import_module(module).EspeakEngine()
    # Per sentence, the best of the rounds: on a shared machine, the other figures
    # measure the neighbours as much as the engine.
    walls = [math.inf] * len(SENTENCES)
    firsts = [math.inf] * len(SENTENCES)
    nbytes = 0
    try:
        # Loading the library and its voice data is start-up work, not speech.
        async for _ in engine.synthesize(
            "Warm up.", voice="", speed=1.0, instructions="", timeout=30
        ):
            pass
        for _ in range(rounds):
            nbytes = 0
            for n, text in enumerate(SENTENCES):
                started = time.perf_counter()
                first: float | None = None
                async for chunk in engine.synthesize(
                    text, voice="", speed=1.0, instructions="", timeout=30
                ):
                    if first is None:
                        first = time.perf_counter() - started
                    nbytes += len(chunk)
                walls[n] = min(walls[n], time.perf_counter() - started)
                firsts[n] = min(firsts[n], first or 0.0)
    finally:
        await engine.aclose()
    audio_s = nbytes / 2 / engine.sample_rate
    firsts.sort()
    return {
        "sentences": len(SENTENCES),
        "rounds": rounds,
        "audio_s": round(audio_s, 2),
        "synth_s": round(sum(walls), 4),
        "rtf": round(sum(walls) / audio_s, 6),
        "first_chunk_ms_median": round(statistics.median(firsts) * 1000, 3),
        "first_chunk_ms_p90": round(firsts[int(len(firsts) * 0.9)] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--module", default="voxrelay.service.providers.espeak", help="where EspeakEngine is"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.rounds, args.module))))


if __name__ == "__main__":
    main()
