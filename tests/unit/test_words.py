"""Tests for word timings: from an engine's marks, estimated from PCM, and what was heard."""

from __future__ import annotations

import itertools
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.service.model import WordTiming
from voxrelay.service.normalize import TextNormalizer
from voxrelay.service.spoken import Spoken
from voxrelay.service.words import (
    SpeechSpan,
    WordMark,
    estimate,
    from_marks,
    heard_text,
    speech_bounds,
    word_spans,
)

RATE = 16000


def silence(ms: int, *, level: int = 0) -> bytes:
    """Quiet audio: zeros, or a low hum of amplitude *level*."""
    n = RATE * ms // 1000
    return b"".join(struct.pack("<h", level if i % 2 else -level) for i in range(n))


def tone(ms: int) -> bytes:
    n = RATE * ms // 1000
    return b"".join(struct.pack("<h", round(9000 * math.sin(i * 0.2))) for i in range(n))


def words_of(timings: list[WordTiming]) -> list[tuple[str, int, int, int]]:
    return [(t.text, t.start_ms, t.end_ms, t.text_offset) for t in timings]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Hello, world!", ["Hello", "world"]),
        ("It costs $3.50 today.", ["It", "costs", "$3.50", "today"]),
        ("Don't stop — it's 20°C.", ["Don't", "stop", "it's", "20°C"]),
        ("(quoted) «words» “here”", ["quoted", "words", "here"]),
        ("e.g. the U.S. at 3 p.m.", ["e.g.", "the", "U.S.", "at", "3", "p.m."]),
        ("It grew 3.5. Then 1.2.", ["It", "grew", "3.5", "Then", "1.2"]),
        ("**bold** `code` | cell |", ["bold", "code", "cell"]),
        ("Hi 🎉 there", ["Hi", "🎉", "there"]),
        ("well-known a—b", ["well-known", "a", "b"]),
        ("... — !", []),
        ("", []),
    ],
)
def test_word_spans(text: str, words: list[str]) -> None:
    assert [text[a:b] for a, b in word_spans(text)] == words


def test_from_marks_times_each_word_until_the_next_mark() -> None:
    text = "Hello there, friend."
    marks = [WordMark(0, 5, 0), WordMark(6, 5, 320), WordMark(13, 6, 900)]
    timings = from_marks(
        text, Spoken.verbatim(text), marks, offset_ms=1000, audio_ms=1500, text_offset=40
    )
    assert words_of(timings) == [
        ("Hello", 1000, 1320, 40),
        ("there", 1320, 1900, 46),
        ("friend", 1900, 2500, 53),
    ]


def test_from_marks_maps_spoken_words_back_through_normalization() -> None:
    text = "It costs **$3.50** today."
    spoken = TextNormalizer().normalize(text)
    assert spoken.text == "It costs three dollars fifty today."
    starts = {"It": 0, "costs": 100, "three": 400, "dollars": 600, "fifty": 900, "today": 1200}
    marks = [WordMark(spoken.text.index(w), len(w), ms) for w, ms in starts.items()]
    timings = from_marks(text, spoken, marks, offset_ms=0, audio_ms=1600)
    assert words_of(timings) == [
        ("It", 0, 100, 0),
        ("costs", 100, 400, 3),
        ("$3.50", 400, 1200, 11),
        ("today", 1200, 1600, 19),
    ]


def test_words_that_are_not_spoken_get_a_zero_length_timing_at_their_neighbour() -> None:
    text = "🎉 Hi 🎉 there 🎉"
    spoken = TextNormalizer().normalize(text)
    marks = [
        WordMark(spoken.text.index("Hi"), 2, 200),
        WordMark(spoken.text.index("there"), 5, 500),
    ]
    timings = from_marks(text, spoken, marks, offset_ms=100, audio_ms=900)
    assert [(t.text, t.start_ms, t.end_ms) for t in timings] == [
        ("🎉", 300, 300),  # before any speech: where the first word starts
        ("Hi", 300, 600),
        ("🎉", 600, 600),
        ("there", 600, 1000),
        ("🎉", 1000, 1000),
    ]


def test_a_skipped_table_still_gets_timings_in_order() -> None:
    text = "Look:\n| a | b |\n|---|---|\n| 1 | 2 |"
    spoken = TextNormalizer().normalize(text)
    assert spoken.text == "Look:"
    timings = from_marks(text, spoken, [WordMark(0, 4, 10)], offset_ms=0, audio_ms=400)
    assert [t.text for t in timings] == ["Look", "a", "b", "1", "2"]
    assert [(t.start_ms, t.end_ms) for t in timings[1:]] == [(400, 400)] * 4


def test_from_marks_clamps_marks_into_the_audio_and_keeps_them_in_order() -> None:
    text = "one two three"
    marks = [WordMark(0, 3, 50), WordMark(4, 3, 20), WordMark(8, 5, 5000)]
    timings = from_marks(text, Spoken.verbatim(text), marks, offset_ms=0, audio_ms=800)
    assert [(t.start_ms, t.end_ms) for t in timings] == [(50, 50), (50, 800), (800, 800)]


def test_from_marks_shares_a_group_of_original_words_by_length() -> None:
    # One spoken word for two original words: they share its time.
    text = "New York"
    spoken = Spoken.verbatim(text).rewrite([(0, 8, "Gotham")])
    timings = from_marks(text, spoken, [WordMark(0, 6, 0)], offset_ms=0, audio_ms=900)
    # By weight: "New" 3.5, "York" 4.5 (letters, and half a letter a word).
    assert [(t.start_ms, t.end_ms) for t in timings] == [(0, 394), (394, 900)]


def test_from_marks_refuses_a_spoken_text_of_another_segment() -> None:
    with pytest.raises(ValueError):
        from_marks("a", Spoken.verbatim("b"), [], offset_ms=0, audio_ms=0)


def test_speech_bounds_finds_leading_and_trailing_silence() -> None:
    pcm = silence(300, level=100) + tone(500) + silence(200) + tone(100) + silence(400)
    start, end = speech_bounds(pcm, RATE)
    assert abs(start - 300) <= 10
    assert abs(end - 1100) <= 10


@pytest.mark.parametrize("pcm", [b"", silence(500), b"\x01"])
def test_speech_bounds_of_silence_is_the_whole_audio(pcm: bytes) -> None:
    assert speech_bounds(pcm, RATE) == (0, len(pcm) // 2 * 1000 // RATE)


def test_estimate_shares_the_speech_by_word_length() -> None:
    # Three words of five letters, each said in 550 ms, between silences.
    text = "alpha bravo delta"
    pcm = silence(300) + tone(1650) + silence(400)
    timings = estimate(text, Spoken.verbatim(text), pcm, RATE, offset_ms=1000, text_offset=7)
    expected = [("alpha", 1300, 1850, 7), ("bravo", 1850, 2400, 13), ("delta", 2400, 2950, 19)]
    for got, want in zip(words_of(timings), expected, strict=True):
        assert got[0] == want[0] and got[3] == want[3]
        assert abs(got[1] - want[1]) <= 10 and abs(got[2] - want[2]) <= 10


def test_estimate_leaves_a_pause_where_punctuation_implies_one() -> None:
    # A comma's pause weighs four letters: 400 ms here, as each letter takes 100 ms.
    text = "alpha, bravo delta."
    pcm = silence(300) + tone(550) + silence(400) + tone(1100) + silence(500)
    timings = estimate(text, Spoken.verbatim(text), pcm, RATE, offset_ms=0)
    starts = [t.start_ms for t in timings]
    for got, want in zip(starts, [300, 1250, 1800], strict=True):
        assert abs(got - want) <= 10
    assert abs(timings[0].end_ms - 850) <= 10


def test_estimate_weighs_words_by_what_is_said_for_them() -> None:
    # "$3" is said as "three dollars": far longer than "ok".
    text = "ok $3"
    spoken = TextNormalizer().normalize(text)
    timings = estimate(text, spoken, tone(1000), RATE, offset_ms=0)
    ok, money = timings
    assert ok.end_ms - ok.start_ms < (money.end_ms - money.start_ms) / 3


HEARD = "Hello there, my friend. How are you?"


def heard_timings() -> list[WordTiming]:
    words = word_spans(HEARD)
    return [WordTiming(HEARD[a:b], i * 100, i * 100 + 80, a) for i, (a, b) in enumerate(words)]


@pytest.mark.parametrize(
    ("played_ms", "heard"),
    [
        (0, ""),
        (79, ""),
        (80, "Hello"),
        (180, "Hello there,"),
        (379, "Hello there, my"),
        (380, "Hello there, my friend."),
        (10_000, HEARD),
    ],
)
def test_heard_text_ends_at_the_last_word_heard_with_its_punctuation(
    played_ms: int, heard: str
) -> None:
    assert heard_text(HEARD, heard_timings(), played_ms) == heard


def test_heard_text_with_no_timings_is_empty() -> None:
    assert heard_text("“Quoted”", [], 500) == ""


MARKDOWNISH = st.lists(
    st.sampled_from([*"ab 19$.,%:-*_`#|[]()<>!&\n", "km", "pm", "Dec", "🎉", "```", "word"]),
    max_size=30,
).map("".join)


def assert_well_formed(text: str, timings: list[WordTiming], low: int, high: int) -> None:
    assert [(t.text_offset, t.text_offset + len(t.text)) for t in timings] == word_spans(text)
    for timing in timings:
        assert text[timing.text_offset :].startswith(timing.text)
        assert low <= timing.start_ms <= timing.end_ms <= high
    for before, after in itertools.pairwise(timings):
        assert before.end_ms <= after.start_ms


@settings(max_examples=200, deadline=None)
@given(MARKDOWNISH, st.lists(st.integers(-50, 3000)), st.integers(0, 2000), st.integers(0, 10**6))
def test_timings_from_any_marks_are_monotonic_and_inside_the_audio(
    text: str, times: list[int], audio_ms: int, offset_ms: int
) -> None:
    spoken = TextNormalizer().normalize(text)
    spans = word_spans(spoken.text) or [(0, 0)]
    marks = [
        WordMark(spans[i % len(spans)][0], spans[i % len(spans)][1] - spans[i % len(spans)][0], t)
        for i, t in enumerate(times)
    ]
    timings = from_marks(text, spoken, marks, offset_ms=offset_ms, audio_ms=audio_ms)
    assert_well_formed(text, timings, offset_ms, offset_ms + audio_ms)


@settings(max_examples=200, deadline=None)
@given(MARKDOWNISH, st.lists(st.sampled_from([0, 100, 3000]), max_size=40), st.integers(0, 10**6))
def test_estimated_timings_are_monotonic_and_inside_the_audio(
    text: str, levels: list[int], offset_ms: int
) -> None:
    spoken = TextNormalizer().normalize(text)
    pcm = b"".join(tone(20) if level == 3000 else silence(20, level=level) for level in levels)
    timings = estimate(text, spoken, pcm, RATE, offset_ms=offset_ms)
    audio_ms = len(pcm) // 2 * 1000 // RATE
    assert_well_formed(text, timings, offset_ms, offset_ms + audio_ms)


def test_from_marks_with_the_pcm_ends_words_where_speech_stops() -> None:
    # "Hello," then a pause, "there" (marks at 0 and 500 ms), then trailing silence.
    text = "Hello, there."
    pcm = tone(300) + silence(200) + tone(400) + silence(300)
    marks = [WordMark(0, 5, 0), WordMark(7, 5, 500)]
    timings = from_marks(
        text, Spoken.verbatim(text), marks, offset_ms=0, audio_ms=1200, pcm=pcm, sample_rate=RATE
    )
    assert [(t.start_ms, t.end_ms) for t in timings] == [(0, 300), (500, 900)]
    without = from_marks(text, Spoken.verbatim(text), marks, offset_ms=0, audio_ms=1200)
    assert [(t.start_ms, t.end_ms) for t in without] == [(0, 500), (500, 1200)]


@settings(max_examples=100, deadline=None)
@given(
    MARKDOWNISH, st.lists(st.integers(0, 1500)), st.lists(st.sampled_from([0, 3000]), max_size=60)
)
def test_timings_from_marks_and_pcm_are_monotonic_and_inside_the_audio(
    text: str, times: list[int], levels: list[int]
) -> None:
    spoken = TextNormalizer().normalize(text)
    spans = word_spans(spoken.text) or [(0, 0)]
    marks = [WordMark(spans[i % len(spans)][0], 1, t) for i, t in enumerate(sorted(times))]
    pcm = b"".join(tone(20) if level else silence(20) for level in levels)
    audio_ms = len(pcm) // 2 * 1000 // RATE
    timings = from_marks(
        text, spoken, marks, offset_ms=0, audio_ms=audio_ms, pcm=pcm, sample_rate=RATE
    )
    assert_well_formed(text, timings, 0, audio_ms)


def test_a_partial_segment_leaves_out_the_words_not_yet_said() -> None:
    text = "It costs $3.50 🎉 today, friend."
    spoken = TextNormalizer().normalize(text)
    marks = [
        WordMark(spoken.text.index(word), len(word), ms)
        for word, ms in (("It", 0), ("costs", 100), ("three", 400), ("dollars", 600))
    ]
    # "$3.50" is half said ("fifty" is still to come): not heard yet.
    timings = from_marks(text, spoken, marks, offset_ms=0, audio_ms=800, partial=True)
    assert [(t.text, t.start_ms, t.end_ms) for t in timings] == [
        ("It", 0, 100),
        ("costs", 100, 400),
    ]
    assert heard_text(text, timings, 800) == "It costs"
    marks.append(WordMark(spoken.text.index("fifty"), 5, 700))
    timings = from_marks(text, spoken, marks, offset_ms=0, audio_ms=800, partial=True)
    assert [t.text for t in timings] == ["It", "costs", "$3.50", "🎉"]  # nothing to say
    marks.append(WordMark(spoken.text.index("today"), 5, 900))
    timings = from_marks(text, spoken, marks, offset_ms=0, audio_ms=1000, partial=True)
    assert [t.text for t in timings] == ["It", "costs", "$3.50", "🎉", "today"]
    whole = from_marks(text, spoken, marks, offset_ms=0, audio_ms=800)
    assert [t.text for t in whole] == ["It", "costs", "$3.50", "🎉", "today", "friend"]


@settings(max_examples=150, deadline=None)
@given(MARKDOWNISH, st.lists(st.integers(0, 2000)), st.integers(0, 2000))
def test_a_partial_segment_gives_a_prefix_of_its_words(
    text: str, times: list[int], audio_ms: int
) -> None:
    spoken = TextNormalizer().normalize(text)
    spans = word_spans(spoken.text)
    marks = [WordMark(a, b - a, t) for (a, b), t in zip(spans, sorted(times), strict=False)]
    timings = from_marks(text, spoken, marks, offset_ms=0, audio_ms=audio_ms, partial=True)
    words = [(t.text_offset, t.text_offset + len(t.text)) for t in timings]
    assert words == word_spans(text)[: len(words)]
    for before, after in itertools.pairwise(timings):
        assert before.end_ms <= after.start_ms


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(st.tuples(st.booleans(), st.integers(1, 400)), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 5000), max_size=6),
)
def test_speech_span_finds_what_speech_bounds_finds_piece_by_piece(
    parts: list[tuple[bool, int]], cuts: list[int]
) -> None:
    pcm = b"".join(tone(ms) if loud else silence(ms) for loud, ms in parts)
    span = SpeechSpan(RATE)
    bounds = sorted({0, *(c * 2 for c in cuts if c * 2 < len(pcm)), len(pcm)})
    for a, b in itertools.pairwise(bounds):
        span.feed(pcm[a:b])
    first, last = speech_bounds(pcm, RATE)
    got_first, got_last = span.bounds()
    assert span.audio_ms == len(pcm) // 2 * 1000 // RATE
    assert got_first == first
    assert abs(got_last - last) <= 10  # frames counted from the start, not the end
