"""How close estimated word timings land against espeak's exact ones, and what words cost.

``python -m bench.word_timing [--json]``: speaks ~50 sentences with libespeak-ng
(loaded here through ctypes, with its word events), after normalization, and compares
:func:`~voxrelay.service.words.estimate` on the PCM with
:func:`~voxrelay.service.words.from_marks` on espeak's events: the mean and p90 of the
absolute error of word starts, in ms. It also times normalization per sentence and
both timing functions per audio second.

:func:`espeak_speak` is written for reuse: it shows how to read ``espeak_EVENT``
(speak_lib.h) in the synth callback and turn ``espeakEVENT_WORD`` into
:class:`~voxrelay.service.words.WordMark`. espeak reports ``text_position`` 1-based,
in characters of its UTF-8 input (with ``espeakCHARS_UTF8``), and ``audio_position``
in ms from the start of the synthesis.

This loads its own copy of the library state, so it must not run inside a process
where the production espeak engine is in use.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import espeakng_loader

from voxrelay.service.model import WordTiming
from voxrelay.service.normalize import TextNormalizer
from voxrelay.service.words import WordMark, estimate, from_marks

__all__ = ["SENTENCES", "EspeakEvent", "espeak_speak", "measure"]

# From speak_lib.h.
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
SAMPLE_RATE = 22050


class EspeakEvent(ctypes.Structure):
    """``espeak_EVENT``; an array of them ends with type ``espeakEVENT_LIST_TERMINATED``."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters of the input
        ("length", ctypes.c_int),  # of the word, in characters
        ("audio_position", ctypes.c_int),  # ms from the start of the synthesis
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # a union: number, name pointer or string[8]
    ]


_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(EspeakEvent)
)


@dataclass(slots=True)
class _Espeak:
    lib: ctypes.CDLL
    callback: object
    pcm: bytearray
    marks: list[WordMark]


_state: _Espeak | None = None


def _open(voice: str) -> _Espeak:
    global _state
    if _state is not None:
        return _state
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    path = espeakng_loader.get_data_path().encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 100, path, _INITIALIZE_DONT_EXIT)
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng initialised at {rate} Hz")
    pcm = bytearray()
    marks: list[WordMark] = []

    def on_audio(wav: int | None, samples: int, events: ctypes.Array[EspeakEvent]) -> int:
        if wav and samples > 0:
            pcm.extend(ctypes.string_at(wav, samples * 2))
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_WORD:
                marks.append(WordMark(event.text_position - 1, event.length, event.audio_position))
            i += 1
        return 0

    callback = _Callback(on_audio)
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_SetVoiceByName(voice.encode())
    _state = _Espeak(lib, callback, pcm, marks)
    return _state


def espeak_speak(text: str, *, voice: str = "gmw/en-US") -> tuple[bytes, list[WordMark]]:
    """Speak *text*; return its PCM (s16le mono, 22050 Hz, host order) and word marks."""
    state = _open(voice)
    state.pcm.clear()
    state.marks.clear()
    data = text.replace("\0", " ").encode("utf-8")
    status = state.lib.espeak_Synth(
        data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None
    )
    if status != 0:
        raise RuntimeError(f"espeak_Synth failed (status {status})")
    return bytes(state.pcm), list(state.marks)


SENTENCES = [
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "It costs $3.50 at the corner shop, or €20 online.",
    "We met on Dec 6, 2026 at 3:30 pm in the lobby.",
    "Growth was 3.5% last quarter and 12% the year before.",
    "She finished 21st out of 300 runners in 1999.",
    "Call me at 555-123-4567 when you land.",
    "Run 5 km, then drink 500 ml of water.",
    "It was 20°C in the shade and the sky was clear.",
    "Dr. Smith prefers tea, e.g. green or jasmine, etc.",
    "**Bold** claims need _careful_ evidence.",
    "See [the documentation](https://example.com/docs) for details.",
    "Well, I suppose that settles it; we leave at dawn.",
    "Photosynthesis converts light energy into chemical energy.",
    "Please remember to bring your passport, ticket, and charger.",
    "The meeting moved to Thursday because Maria is travelling.",
    "A 3 GB file took about 10 minutes to download.",
    "My grandmother was born in 1948 in a small village.",
    "Can you believe it? The train was on time! 🎉",
    "The committee approved the budget after a long debate.",
    "Temperatures will drop to -5 degrees overnight.",
    "The package weighs 10 kg and measures 40 cm across.",
    "On 2026-12-06 the new policy takes effect.",
    "Our revenue reached £1.5m, up from £900,000.",
    "Turn left at the second light, then right at the bakery.",
    "The recipe needs two eggs, a cup of flour, and some milk.",
    "Honestly, nobody expected the results to be this good.",
    "The server responded in 250 ms on average.",
    "I'll be there at 9am, unless the traffic is terrible.",
    "Mount Everest is about 8,849 meters tall.",
    "Wait — did you hear that noise outside?",
    "Economists disagree about the long-term effects of inflation.",
    "The library opens at 10:00 and closes at 6 pm.",
    "Version 2 fixed 37 bugs and added 4 new features.",
    "Apples vs. oranges is a classic comparison.",
    "He paid $1,250 for the bicycle last spring.",
    "The children laughed as the puppy chased its tail.",
    "Unfortunately, the flight was cancelled due to fog.",
    "About 7.8 billion people lived on Earth in 2020.",
    "The concert starts at 8:15 p.m. sharp.",
    "Please reply by the 3rd of January.",
    "A good night's sleep improves memory and mood.",
    "The bridge is 1.2 km long and 30 m wide.",
    "Our team won the championship for the 2nd time.",
    "Every morning she walks 3 miles along the river.",
    "The museum, which opened in 1889, attracts many visitors.",
    "Interest rates rose by 0.25% this month.",
    "Scientists discovered a new species of frog in the rainforest.",
    "If it rains tomorrow, we will postpone the picnic.",
    "Thank you so much for your help with the move!",
]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _cpu_s(work: Callable[[], object], *, rounds: int = 5) -> float:
    """Return the least CPU time *work* took over a few rounds (the machine is shared)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def measure(sentences: list[str]) -> dict[str, float]:
    """Return the estimate's errors against espeak's marks, and the costs.

    The reference is :func:`from_marks` with the PCM: starts from espeak's events,
    ends where speech stops before the next word.
    """
    if sys.byteorder == "big":
        raise RuntimeError("this measurement assumes a little-endian host")
    spoken_all = [TextNormalizer().normalize(sentence) for sentence in sentences]
    spoken_audio = [espeak_speak(spoken.text) for spoken in spoken_all]
    audio_ms = [len(pcm) // 2 * 1000 // SAMPLE_RATE for pcm, _ in spoken_audio]
    audio_s = sum(audio_ms) / 1000
    cases = list(zip(sentences, spoken_all, spoken_audio, audio_ms, strict=True))

    def exact_all() -> list[list[WordTiming]]:
        return [
            from_marks(s, sp, marks, offset_ms=0, audio_ms=ms, pcm=pcm, sample_rate=SAMPLE_RATE)
            for s, sp, (pcm, marks), ms in cases
        ]

    def estimate_all() -> list[list[WordTiming]]:
        return [estimate(s, sp, pcm, SAMPLE_RATE, offset_ms=0) for s, sp, (pcm, _), _ms in cases]

    def normalize_all(texts: list[str]) -> None:
        normalizer = TextNormalizer()
        for text in texts:
            normalizer.normalize(text)

    errors: list[float] = []
    end_errors: list[float] = []
    for exact, fitted in zip(exact_all(), estimate_all(), strict=True):
        for a, b in zip(exact, fitted, strict=True):
            if a.end_ms > a.start_ms:  # words espeak said
                errors.append(abs(a.start_ms - b.start_ms))
                end_errors.append(abs(a.end_ms - b.end_ms))
    plain = [s for s in sentences if not any(ch.isdigit() for ch in s) and "*" not in s]
    return {
        "sentences": len(sentences),
        "words": len(errors),
        "audio_s": round(audio_s, 1),
        "start_error_mean_ms": round(statistics.fmean(errors), 1),
        "start_error_p50_ms": round(_percentile(errors, 0.5), 1),
        "start_error_p90_ms": round(_percentile(errors, 0.9), 1),
        "end_error_mean_ms": round(statistics.fmean(end_errors), 1),
        "end_error_p90_ms": round(_percentile(end_errors, 0.9), 1),
        "normalize_us_per_sentence": round(
            _cpu_s(lambda: normalize_all(sentences * 20)) / (20 * len(sentences)) * 1e6, 1
        ),
        "normalize_plain_us_per_sentence": round(
            _cpu_s(lambda: normalize_all(plain * 20)) / (20 * len(plain)) * 1e6, 1
        ),
        "normalize_us_per_audio_s": round(
            _cpu_s(lambda: normalize_all(sentences * 20)) / (20 * audio_s) * 1e6, 1
        ),
        "estimate_us_per_audio_s": round(_cpu_s(estimate_all) / audio_s * 1e6, 1),
        "from_marks_us_per_audio_s": round(_cpu_s(exact_all) / audio_s * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures = measure(SENTENCES)
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:34} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
