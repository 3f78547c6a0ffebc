"""Encoder settings for speech, measured: CPU, bitrate, first-audio delay and quality.

``python -m bench.encoders`` speaks about a minute of the benchmark's reply with the
embedded espeak engine and encodes it with today's settings and with candidates, the way
a stream does (20 ms chunks in one thread). Per setting it reports:

- ``cpu_ms_per_audio_s``: thread CPU time of encoding, per second of audio (best of 3);
- ``kbit_per_s``: the stream's size over its duration;
- ``held_ms``: audio fed but not yet in the output's decodable bytes, at worst during
  the first second (what the encoder holds back);
- ``lag_ms``: how late the decoded audio starts against the source (codec priming that
  the decoder does not remove, found by cross-correlation);
- ``snr_db`` and ``lsd_db``: SNR and log-spectral distance of decoded vs source, aligned.

It also encodes the same audio in 2 threads at once (does PyAV let go of the GIL?) and in
larger chunks (what batching saves).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import av
import numpy as np

from fakes.openai_upstream import DEFAULT_REPLY
from voxrelay.service import audio
from voxrelay.service.audio import StreamEncoder
from voxrelay.service.model import AudioFormat

__all__ = ["CANDIDATES", "espeak_speech", "measure"]

CHUNK_MS = 20


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One encoder setting: what replaces the format's entry in ``audio._ENCODINGS``."""

    name: str
    format: AudioFormat
    bit_rate: int
    options: dict[str, str]
    #: other fields of the format's ``_Encoding`` (its codec, sample format, muxer options)
    encoding: dict[str, Any] = dataclasses.field(default_factory=dict)


_LOWDELAY = {"application": "lowdelay"}
#: opus on ffmpeg's Ogg muxer (a page per packet, each held until the next), as before
#: voxrelay wrote its pages.
_FFMPEG_OGG: dict[str, Any] = {"muxer": "ogg", "muxer_options": {"page_duration": "20000"}}
#: ... and upsampled to 48 kHz before libopus, as before it was fed the engine's rate.
_AT_48K = {**_FFMPEG_OGG, "codec_takes_input_rate": False}
#: mp3 through PyAV's own libmp3lame, as before lameenc.
_PYAV_LAME = {
    "codec": "libmp3lame",
    "sample_format": "s16p",
    "muxer_options": {"write_xing": "0", "id3v2_version": "0"},
}


def _lowdelay(
    name: str, bit_rate: int, complexity: int, encoding: dict[str, Any] | None = None
) -> Candidate:
    """An opus setting with CELT alone (``lowdelay``) at *complexity*."""
    options = {**_LOWDELAY, "compression_level": str(complexity)}
    return Candidate(name, AudioFormat.OPUS, bit_rate, options, encoding=encoding or {})


#: Today's setting of each format is marked "(now)"; the rest are measured beside it.
CANDIDATES: list[Candidate] = [
    Candidate(
        "opus 32k, audio, complexity 10 (first)",
        AudioFormat.OPUS,
        32000,
        {"application": "audio", "compression_level": "10"},
        encoding=_FFMPEG_OGG,
    ),
    _lowdelay("opus 24k lowdelay c5, fed at 48 kHz (earlier)", 24000, 5, _AT_48K),
    _lowdelay("opus 24k lowdelay c3, fed at 48 kHz", 24000, 3, _AT_48K),
    _lowdelay("opus 24k lowdelay c3, ffmpeg's Ogg muxer (before)", 24000, 3, _FFMPEG_OGG),
    _lowdelay("opus 24k lowdelay c5", 24000, 5),
    _lowdelay("opus 24k lowdelay c3, our Ogg pages (now)", 24000, 3),
    _lowdelay("opus 24k lowdelay c0", 24000, 0),
    _lowdelay("opus 16k lowdelay c3", 16000, 3),
    Candidate(
        "mp3 64k, LAME default quality, PyAV (first)",
        AudioFormat.MP3,
        64000,
        {"compression_level": "-1"},
        encoding=_PYAV_LAME,
    ),
    Candidate(
        "mp3 64k q7 no reservoir, PyAV (before)",
        AudioFormat.MP3,
        64000,
        {"compression_level": "7", "reservoir": "0"},
        encoding=_PYAV_LAME,
    ),
    Candidate("mp3 64k q7, lameenc (now)", AudioFormat.MP3, 64000, {"quality": "7"}),
    Candidate("mp3 64k q5, lameenc", AudioFormat.MP3, 64000, {"quality": "5"}),
    Candidate("mp3 48k q7, lameenc", AudioFormat.MP3, 48000, {"quality": "7"}),
    Candidate("aac 64k", AudioFormat.AAC, 64000, {}),
    Candidate("flac", AudioFormat.FLAC, 0, {}),
]


async def _speak(seconds: float) -> tuple[bytes, int]:
    from voxrelay.service.providers.espeak import EspeakEngine

    engine = EspeakEngine()
    parts: list[bytes] = []
    size = 0
    try:
        while size < seconds * engine.sample_rate * 2:
            async for chunk in engine.synthesize(
                DEFAULT_REPLY, voice="", speed=1.0, instructions="", timeout=30
            ):
                parts.append(chunk)
                size += len(chunk)
    finally:
        await engine.aclose()
    pcm = b"".join(parts)[: round(seconds * engine.sample_rate) * 2]
    return pcm, engine.sample_rate


def espeak_speech(seconds: float = 60.0) -> tuple[bytes, int]:
    """Return *seconds* of espeak's speech (s16le mono) and its rate."""
    return asyncio.run(_speak(seconds))


@contextmanager
def _setting(candidate: Candidate) -> Iterator[None]:
    fmt = candidate.format
    saved = audio._ENCODINGS[fmt]
    audio._ENCODINGS[fmt] = dataclasses.replace(
        saved,
        bit_rate=candidate.bit_rate,
        codec_options=dict(candidate.options),
        **candidate.encoding,
    )
    try:
        yield
    finally:
        audio._ENCODINGS[fmt] = saved


def _encoder(fmt: AudioFormat, rate: int) -> StreamEncoder:
    return StreamEncoder(fmt, input_rate=rate, output_rate=audio.output_rate(fmt, rate, 0))


def _encode(fmt: AudioFormat, pcm: bytes, rate: int, chunk_ms: int) -> tuple[bytes, float]:
    chunk = rate * chunk_ms // 1000 * 2
    encoder = _encoder(fmt, rate)
    parts = []
    cpu = time.thread_time()
    for offset in range(0, len(pcm), chunk):
        parts.append(encoder.encode(pcm[offset : offset + chunk]))
    parts.append(encoder.flush())
    return b"".join(parts), time.thread_time() - cpu


def _decode(data: bytes, rate: int) -> np.ndarray:
    """Decode *data* to float mono at *rate* (what decodes of it, for a prefix)."""
    out: list[np.ndarray] = []
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            for frame in container.decode(audio=0):
                for f in resampler.resample(frame):
                    out.append(f.to_ndarray().reshape(-1))
    except (av.FFmpegError, StopIteration):
        pass
    for f in resampler.resample(None):
        out.append(f.to_ndarray().reshape(-1))
    if not out:
        return np.zeros(0)
    return np.concatenate(out).astype(np.float64) / 32768


def _held_ms(fmt: AudioFormat, pcm: bytes, rate: int) -> float:
    """The most audio fed but not yet decodable from the output, in the first second."""
    chunk = rate * CHUNK_MS // 1000 * 2
    encoder = _encoder(fmt, rate)
    out = b""
    worst = 0.0
    for offset in range(0, rate * 2, chunk):
        out += encoder.encode(pcm[offset : offset + chunk])
        fed_ms = (offset + chunk) / 2 / rate * 1000
        decoded_ms = len(_decode(out, rate)) / rate * 1000 if out else 0.0
        worst = max(worst, fed_ms - decoded_ms)
    encoder.close()
    return worst


def _align(src: np.ndarray, dec: np.ndarray, rate: int) -> int:
    """Samples by which *dec* lags *src* (0 to 200 ms), by cross-correlation."""
    n = min(len(src), len(dec), rate * 10)
    a, b = src[:n], dec[:n]
    size = 1 << (2 * n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)
    return int(np.argmax(corr[: rate // 5]))


def _quality(src: np.ndarray, dec: np.ndarray, rate: int) -> tuple[int, float, float]:
    lag = _align(src, dec, rate)
    dec = dec[lag:]
    n = min(len(src), len(dec))
    s, d = src[:n], dec[:n]
    snr = 10 * np.log10(np.sum(s**2) / max(np.sum((s - d) ** 2), 1e-12))
    win = 512
    frames = n // win
    window = np.hanning(win)
    ps = np.abs(np.fft.rfft(s[: frames * win].reshape(frames, win) * window, axis=1)) ** 2
    pd = np.abs(np.fft.rfft(d[: frames * win].reshape(frames, win) * window, axis=1)) ** 2
    loud = 10 * np.log10(ps.sum(axis=1) + 1e-12) > 10 * np.log10(ps.sum(axis=1).max()) - 40
    # Bins 60 dB under their frame's peak are inaudible next to it: floor them there.
    floor = ps[loud].max(axis=1, keepdims=True) * 1e-6
    diff = 10 * np.log10((ps[loud] + floor) / (pd[loud] + floor))
    lsd = float(np.mean(np.sqrt(np.mean(diff**2, axis=1))))
    return lag, float(snr), lsd


def measure(pcm: bytes, rate: int, repeats: int = 3) -> list[dict[str, Any]]:
    """One row per candidate setting."""
    src = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768
    seconds = len(src) / rate
    rows = []
    for candidate in CANDIDATES:
        fmt = candidate.format
        with _setting(candidate):
            runs = [_encode(fmt, pcm, rate, CHUNK_MS) for _ in range(repeats)]
            data = runs[0][0]
            cpu = min(r[1] for r in runs)
            held = _held_ms(fmt, pcm, rate)
        lag, snr, lsd = _quality(src, _decode(data, rate), rate)
        rows.append(
            {
                "setting": candidate.name,
                "cpu_ms_per_audio_s": round(cpu * 1000 / seconds, 3),
                "streams_per_core": round(seconds / cpu),
                "kbit_per_s": round(len(data) * 8 / seconds / 1000, 1),
                "held_ms": round(held, 1),
                "lag_ms": round(lag / rate * 1000, 1),
                "snr_db": round(snr, 1),
                "lsd_db": round(lsd, 2),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def threads(pcm: bytes, rate: int, candidate: Candidate) -> dict[str, float]:
    """Wall time of one encode alone, and of two at once in two threads."""
    fmt = candidate.format
    with _setting(candidate):
        started = time.perf_counter()
        _encode(fmt, pcm, rate, CHUNK_MS)
        alone = time.perf_counter() - started
        workers = [
            threading.Thread(target=_encode, args=(fmt, pcm, rate, CHUNK_MS)) for _ in range(2)
        ]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        both = time.perf_counter() - started
    return {"one_encode_s": round(alone, 3), "two_in_two_threads_s": round(both, 3)}


def batches(pcm: bytes, rate: int, candidate: Candidate) -> dict[int, float]:
    """CPU ms per audio second by the size of the chunks fed."""
    fmt = candidate.format
    seconds = len(pcm) / 2 / rate
    result = {}
    with _setting(candidate):
        for chunk_ms in (20, 100, 500):
            cpu = min(_encode(fmt, pcm, rate, chunk_ms)[1] for _ in range(3))
            result[chunk_ms] = round(cpu * 1000 / seconds, 3)
    return result


if __name__ == "__main__":
    pcm, rate = espeak_speech(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
    print(json.dumps({"audio_s": len(pcm) / 2 / rate, "rate": rate}))
    for row in measure(pcm, rate):
        print(json.dumps(row))
    for candidate in CANDIDATES:
        if candidate.name.endswith(("(before)", "(now)")):
            name = candidate.name
            print(json.dumps({"setting": name, "threads": threads(pcm, rate, candidate)}))
            print(
                json.dumps({"setting": name, "cpu_ms_by_chunk_ms": batches(pcm, rate, candidate)})
            )
