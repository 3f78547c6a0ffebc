"""In-process measurements: each encoder's CPU and buffering, and espeak's real-time factor.

These run in this process with nothing else under load: they cost the same CPU inside
voxrelay, where one encoder runs per stream in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fakes.openai_upstream import CHUNK_MS, DEFAULT_REPLY, SAMPLE_RATE, voice_pcm
from voxrelay.service.audio import StreamEncoder, output_rate
from voxrelay.service.chunker import SentenceChunker
from voxrelay.service.model import AudioFormat

__all__ = ["encoder_costs", "espeak_rtf"]


def _encode_once(fmt: AudioFormat, pcm: bytes, chunk: int) -> dict[str, Any]:
    encoder = StreamEncoder(
        fmt, input_rate=SAMPLE_RATE, output_rate=output_rate(fmt, SAMPLE_RATE, 0)
    )
    fed = 0
    first_after_ms: float | None = None
    out = 0
    cpu = time.thread_time()
    for offset in range(0, len(pcm), chunk):
        piece = pcm[offset : offset + chunk]
        fed += len(piece)
        data = encoder.encode(piece)
        if data and first_after_ms is None:
            first_after_ms = fed / 2 / SAMPLE_RATE * 1000
        out += len(data)
    out += len(encoder.flush())
    cpu = time.thread_time() - cpu
    return {"cpu_s": cpu, "first_output_after_audio_ms": first_after_ms, "bytes": out}


def encoder_costs(seconds: float = 10.0, repeats: int = 3) -> list[dict[str, Any]]:
    """Encode *seconds* of the fake's voice in the fake's 20 ms chunks, per format.

    ``cpu_ms_per_audio_s`` is the CPU one real-time stream costs per second;
    ``realtime_streams_per_core`` its inverse. ``first_output_after_audio_ms`` is how
    much audio the encoder swallows before its first byte comes out.
    """
    samples = round(seconds * SAMPLE_RATE)
    pcm = voice_pcm(samples)
    chunk = SAMPLE_RATE * CHUNK_MS // 1000 * 2
    rows = []
    for fmt in AudioFormat:
        runs = [_encode_once(fmt, pcm, chunk) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["cpu_s"])  # the least disturbed run
        cpu_ms_per_s = best["cpu_s"] * 1000 / seconds
        rows.append(
            {
                "format": fmt.value,
                "cpu_ms_per_audio_s": round(cpu_ms_per_s, 3),
                "cpu_pct_per_realtime_stream": round(cpu_ms_per_s / 10, 3),
                "realtime_streams_per_core": round(1000 / cpu_ms_per_s) if cpu_ms_per_s else None,
                "first_output_after_audio_ms": best["first_output_after_audio_ms"],
                "kbit_per_s": round(best["bytes"] * 8 / seconds / 1000, 1),
            }
        )
    return rows


async def espeak_rtf() -> dict[str, Any]:
    """Speak the benchmark's reply with the embedded engine, segment by segment."""
    from voxrelay.service.providers.espeak import EspeakEngine

    chunker = SentenceChunker()
    segments = chunker.feed(DEFAULT_REPLY) + chunker.flush()
    engine = EspeakEngine()
    try:
        # One warm-up: loading the voice data is start-up work, not speech.
        async for _ in engine.synthesize(
            "Warm up.", voice="", speed=1.0, instructions="", timeout=30
        ):
            pass
        wall = 0.0
        nbytes = 0
        firsts = []
        cpu = time.process_time()
        for text in segments:
            started = time.perf_counter()
            first = None
            async for chunk in engine.synthesize(
                text, voice="", speed=1.0, instructions="", timeout=30
            ):
                if first is None:
                    first = time.perf_counter() - started
                nbytes += len(chunk)
            wall += time.perf_counter() - started
            firsts.append(first or 0.0)
        cpu = time.process_time() - cpu
    finally:
        await engine.aclose()
    audio_s = nbytes / 2 / engine.sample_rate
    return {
        "segments": len(segments),
        "audio_s": round(audio_s, 3),
        "synth_s": round(wall, 4),
        "cpu_s": round(cpu, 4),
        "rtf": round(wall / audio_s, 4) if audio_s else None,
        "first_chunk_ms_max": round(max(firsts) * 1000, 2),
    }


if __name__ == "__main__":
    for row in encoder_costs():
        print(row)
    print(asyncio.run(espeak_rtf()))
