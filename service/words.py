"""Time each word of a segment on the stream's audio clock, and say what was heard.

Two sources of timings, one result: every word of the segment's *original* text
(:func:`word_spans`), in order, with ``start_ms <= end_ms <= next start_ms``, all
inside the segment's audio.

* :func:`from_marks` — exact: the engine reported where in its input each word it
  spoke starts, and when (espeak's word events). The positions are in the spoken
  text, so they are mapped back through normalization to the original words.
* :func:`estimate` — fitted: find where speech starts and ends in the segment's PCM,
  then share that span among the spoken words by their length, with pauses where
  punctuation implies them.

Both reduce to *units* — spoken words with a time span and the original span they
were made from — and share how units become original words: words and units that
overlap form a group (one word said as several, "$3.50"; rarely several as one), a
group's time is shared among its words by length, and a word nothing was said for
(an emoji, a table) gets a zero-length timing where its neighbour ends.
"""

from __future__ import annotations

import array
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from .model import SegmentStarted, WordTiming
from .spoken import Spoken

__all__ = [
    "SpeechSpan",
    "WordMark",
    "estimate",
    "estimate_in",
    "from_marks",
    "heard_in",
    "heard_text",
    "speech_bounds",
    "weight",
    "word_spans",
]

# A word is a run without whitespace (or dashes used between words), less the
# punctuation at either end: "Hello," is "Hello"; "$3.50", "20°C", "don't" are whole.
_TOKEN = re.compile(r"[^\s—–]+")
_EXTRA_PUNCTUATION = frozenset("`|~")
# Weights, in letters: a word's own, and the pause that punctuation before the
# next word implies (a sentence break inside a segment is rarely longer than a comma).
_WORD_WEIGHT = 0.5
_PAUSE = 4.0
_STOPS = frozenset(".!?…。！？\n,;:—–()，、；：")
# PCM energy: 10 ms frames; a frame is speech when its peak reaches about -36 dBFS.
_FRAME_MS = 10
_SPEECH_PEAK = 512
# Speech holds its level over many samples, so every fourth is enough to find it.
_STRIDE = 4


@dataclass(frozen=True, slots=True)
class WordMark:
    """An engine's report that it starts a word: where in its input, and when.

    *offset* and *length* are in code points of the spoken text; *time_ms* is from
    the start of the segment's audio as sent.
    """

    offset: int
    length: int
    time_ms: int


def _is_edge_punctuation(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "P" or ch in _EXTRA_PUNCTUATION


def word_spans(text: str) -> list[tuple[int, int]]:
    """Return the ``(start, end)`` of each word of *text*, in order."""
    spans = []
    for match in _TOKEN.finditer(text):
        start, end = match.span()
        while start < end and _is_edge_punctuation(text[start]):
            start += 1
        while end > start and _is_edge_punctuation(text[end - 1]):
            end -= 1
        # Dots end an abbreviation rather than close it: "e.g.", "U.S.", "a.m.".
        word = text[start:end]
        dotted = "." in word and word.replace(".", "").isalpha()
        if dotted and end < match.end() and text[end] == ".":
            end += 1
        if end > start:
            spans.append((start, end))
    return spans


def weight(word: str) -> float:
    """Return how long *word* takes to say, relative to other words.

    That is its letters, plus a little for the word itself: letters follow the
    sounds more closely than a syllable count does (see docs/words.md).
    """
    return sum(1 for ch in word if ch.isalnum()) + _WORD_WEIGHT


@dataclass(slots=True)
class _Unit:
    """A spoken word: the original span it was made from, and when it is said."""

    low: int
    high: int
    start: float
    end: float


def from_marks(
    segment_text: str,
    spoken: Spoken,
    marks: Sequence[WordMark],
    *,
    offset_ms: int,
    audio_ms: int,
    text_offset: int = 0,
    pcm: bytes | None = None,
    sample_rate: int = 0,
    partial: bool = False,
) -> list[WordTiming]:
    """Return the timings of *segment_text*'s words from an engine's word marks.

    *spoken* is what the engine was given (its map leads back to *segment_text*).
    A word starts at its mark and lasts until the next one, the last until the end
    of the segment's audio (*audio_ms* long, starting at *offset_ms* on the stream's
    clock). Given the segment's *pcm* (s16le mono at *sample_rate*), a word ends
    where speech stops instead, before the silence of a pause. *text_offset* is
    where the segment starts in the reply.

    With *partial*, the segment is still being spoken (a cancel came mid-segment):
    *marks*, *pcm* and *audio_ms* are those so far, and the words after the last
    mark are left out, as not yet said, rather than given zero-length timings.
    """
    _check(segment_text, spoken)
    audio_ms = max(0, audio_ms)
    times = []
    last = 0
    for mark in marks:
        last = min(audio_ms, max(last, mark.time_ms))
        times.append(last)
    samples = _samples(pcm) if pcm is not None and sample_rate > 0 else None
    units = []
    for i, mark in enumerate(marks):
        low, high = spoken.original_span(mark.offset, mark.offset + max(1, mark.length))
        end = times[i + 1] if i + 1 < len(marks) else audio_ms
        if samples is not None:
            end = _speech_end(samples, sample_rate, times[i], end)
        units.append(_Unit(low, high, times[i], end))
    timings = _assign(segment_text, units, offset_ms, 0, audio_ms, text_offset)
    if partial:
        timings = timings[: _said_words(spoken, marks)]
    return timings


def _said_words(spoken: Spoken, marks: Sequence[WordMark]) -> int:
    """Return how many words of the original have all their spoken words marked."""
    said_until = max((mark.offset + max(1, mark.length) for mark in marks), default=0)
    # The first spoken word not yet said: the original words from its origin on
    # ("$3.50" when "fifty" is still to come) are not said in full.
    unsaid = next((a for a, _ in word_spans(spoken.text) if a >= said_until), None)
    if unsaid is None:
        return len(word_spans(spoken.original))
    low, _ = spoken.original_span(unsaid, unsaid + 1)
    return sum(1 for _, end in word_spans(spoken.original) if end <= low)


def _speech_end(samples: array.array[int], sample_rate: int, start_ms: int, end_ms: int) -> int:
    """Return where the speech between *start_ms* and *end_ms* stops (else *end_ms*).

    Frames are read back from *end_ms* only as far as the silence goes, so a word
    costs a few frames, not its whole length.
    """
    frame = max(1, sample_rate * _FRAME_MS // 1000)
    first = start_ms // _FRAME_MS + 1  # a word keeps at least its first frame
    at = min(-(-end_ms // _FRAME_MS), -(-len(samples) // frame))
    while at > first and not _loud(samples, (at - 1) * frame, at * frame):
        at -= 1
    return max(start_ms, min(end_ms, at * _FRAME_MS))


def estimate(
    segment_text: str,
    spoken: Spoken,
    pcm: bytes,
    sample_rate: int,
    *,
    offset_ms: int,
    text_offset: int = 0,
) -> list[WordTiming]:
    """Return estimated timings of *segment_text*'s words in the segment's audio.

    *pcm* is the segment's audio as sent (s16le mono at *sample_rate*), starting at
    *offset_ms* on the stream's clock; *spoken* is what the engine was given.
    """
    audio_ms = len(pcm) // 2 * 1000 // sample_rate if sample_rate > 0 else 0
    first, last = speech_bounds(pcm, sample_rate)
    return estimate_in(
        segment_text, spoken, first, last, audio_ms, offset_ms=offset_ms, text_offset=text_offset
    )


def estimate_in(
    segment_text: str,
    spoken: Spoken,
    first_ms: int,
    last_ms: int,
    audio_ms: int,
    *,
    offset_ms: int,
    text_offset: int = 0,
) -> list[WordTiming]:
    """Return estimated timings of *segment_text*'s words, spoken from *first_ms* to
    *last_ms* of the segment's *audio_ms* (as :func:`speech_bounds` or :class:`SpeechSpan`
    found them)."""
    _check(segment_text, spoken)
    text = spoken.text
    spans = word_spans(text)
    weights = [weight(text[a:b]) for a, b in spans]
    pauses = [_pause(text[spans[i][1] : spans[i + 1][0]]) for i in range(len(spans) - 1)]
    total = sum(weights) + sum(pauses)
    per_unit = (last_ms - first_ms) / total if total > 0 else 0.0
    units = []
    at = float(first_ms)
    for i, (a, b) in enumerate(spans):
        low, high = spoken.original_span(a, b)
        end = at + weights[i] * per_unit
        units.append(_Unit(low, high, at, end))
        at = end + (pauses[i] * per_unit if i < len(pauses) else 0.0)
    return _assign(segment_text, units, offset_ms, first_ms, audio_ms, text_offset)


class SpeechSpan:
    """Find where speech starts and ends in a segment's audio as it streams past.

    The same test as :func:`speech_bounds`, frame by frame from the segment's start,
    without holding the audio: a stream keeps a few bytes, not its segment's PCM.
    """

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._frame = max(1, sample_rate * _FRAME_MS // 1000)
        self._carry = b""
        self._samples = 0
        self._first: int | None = None
        self._end = 0

    def feed(self, pcm: bytes) -> None:
        """Take the next PCM of the segment (s16le mono)."""
        data = self._carry + pcm if self._carry else pcm
        whole = len(data) // (2 * self._frame) * (2 * self._frame)
        self._carry = data[whole:]
        if whole:
            self._scan(_samples(data[:whole]))

    def _scan(self, samples: array.array[int]) -> None:
        # Only the first loud frame of the segment and the last loud frame of each piece
        # matter: the first is looked for from the front once, the last from the back.
        frame, n, before = self._frame, len(samples), self._samples
        self._samples += n
        starts = range(0, n, frame)
        if self._first is None:
            first = next((s for s in starts if _loud(samples, s, s + frame)), None)
            if first is None:
                return
            self._first = before + first
        for start in reversed(starts):
            if before + start < self._first:
                return
            if _loud(samples, start, start + frame):
                self._end = before + start + min(frame, n - start)
                return

    @property
    def audio_ms(self) -> int:
        return (self._samples + len(self._carry) // 2) * 1000 // self.sample_rate

    def bounds(self) -> tuple[int, int]:
        """Return (start, end) of the speech so far in ms, as :func:`speech_bounds` does."""
        if self._carry:
            self._scan(_samples(self._carry))
            self._carry = b""
        total_ms = self.audio_ms
        if self._first is None:
            return 0, total_ms
        rate = self.sample_rate
        return self._first * 1000 // rate, min(total_ms, -(-self._end * 1000 // rate))


def _check(segment_text: str, spoken: Spoken) -> None:
    if spoken.original != segment_text:
        raise ValueError("spoken was not made from this segment's text")


def _pause(between: str) -> float:
    """Return the pause, in letters, that the text between two words implies."""
    return _PAUSE if any(ch in _STOPS for ch in between) else 0.0


def speech_bounds(pcm: bytes, sample_rate: int) -> tuple[int, int]:
    """Return where speech starts and ends in *pcm* (s16le mono), in ms from its start.

    Silence is found in 10 ms frames from either end; audio that is all silence
    gives ``(0, its length)``, so words still get times inside it.
    """
    if sample_rate <= 0:
        return 0, 0
    samples = _samples(pcm)
    n = len(samples)
    total_ms = n * 1000 // sample_rate
    frame = max(1, sample_rate * _FRAME_MS // 1000)
    start = 0
    while start < n and not _loud(samples, start, start + frame):
        start += frame
    if start >= n:
        return 0, total_ms
    end = n
    while end > start and not _loud(samples, max(start, end - frame), end):
        end -= frame
    return start * 1000 // sample_rate, min(total_ms, -(-end * 1000 // sample_rate))


def _samples(pcm: bytes) -> array.array[int]:
    samples = array.array("h", pcm[: len(pcm) // 2 * 2])
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _loud(samples: array.array[int], start: int, stop: int) -> bool:
    """Return whether ``samples[start:stop]`` holds speech, reading every few samples."""
    frame = samples[start:stop:_STRIDE]
    return bool(frame) and (max(frame) >= _SPEECH_PEAK or min(frame) <= -_SPEECH_PEAK)


def _assign(
    text: str,
    units: list[_Unit],
    offset_ms: int,
    first_ms: float,
    audio_ms: int,
    text_offset: int,
) -> list[WordTiming]:
    """Turn *units* into one timing per word of *text* (see the module's docstring)."""
    words = word_spans(text)
    # For each word: (start, end) in ms from the segment's start, or None if unsaid.
    spans: list[tuple[float, float] | None] = [None] * len(words)
    w = 0  # first word that may overlap the next unit
    group: list[int] = []  # the words of the group being built
    group_start = group_end = 0.0
    for unit in units:
        while w < len(words) and words[w][1] <= unit.low:
            w += 1
        hits = []
        j = w
        while j < len(words) and words[j][0] < unit.high:
            if words[j][1] > unit.low:
                hits.append(j)
            j += 1
        if not hits:
            continue  # said for no word of the original ("and" for "&")
        if group and hits[0] <= group[-1]:
            group += [h for h in hits if h > group[-1]]
            group_end = max(group_end, unit.end)
            continue
        _share(text, words, group, group_start, group_end, spans)
        group, group_start, group_end = hits, unit.start, unit.end
    _share(text, words, group, group_start, group_end, spans)
    # Unsaid words sit where the word before them ends (the first ones, where
    # speech starts).
    timings = []
    previous_end = next((span[0] for span in spans if span is not None), first_ms)
    for (a, b), span in zip(words, spans, strict=True):
        start, end = span if span is not None else (previous_end, previous_end)
        start = max(start, previous_end)
        end = min(max(end, start), audio_ms)
        start = min(start, end)
        previous_end = end
        timings.append(
            WordTiming(text[a:b], offset_ms + round(start), offset_ms + round(end), text_offset + a)
        )
    # Rounding each end on its own cannot break the order: round is monotonic.
    return timings


def _share(
    text: str,
    words: list[tuple[int, int]],
    group: list[int],
    start: float,
    end: float,
    spans: list[tuple[float, float] | None],
) -> None:
    """Share ``[start, end]`` among the words of *group* by their weights."""
    if not group:
        return
    if len(group) == 1:
        spans[group[0]] = (start, end)
        return
    weights = [weight(text[words[i][0] : words[i][1]]) for i in group]
    total = sum(weights)
    at = start
    for i, share in zip(group, weights, strict=True):
        span_end = at + (end - start) * share / total
        spans[i] = (at, span_end)
        at = span_end


def heard_in(
    segments: Sequence[SegmentStarted], timings: Sequence[WordTiming], played_ms: int
) -> str:
    """Return what was heard by *played_ms* of a stream whose *segments* were sent.

    The segments are slices of the reply at their ``text_offset``; what lies between
    them is whitespace, so the reply so far is rebuilt from them.
    """
    text = ""
    for segment in segments:
        text += " " * max(0, segment.text_offset - len(text)) + segment.text
    return heard_text(text, timings, played_ms)


def heard_text(reply_text: str, timings: Sequence[WordTiming], played_ms: int) -> str:
    """Return *reply_text* up to the last word heard in full by *played_ms*.

    A word is heard once its ``end_ms <= played_ms``; the punctuation right after it
    ("," "." closing quotes) is kept with it. Nothing heard gives "".
    """
    end = 0
    for timing in timings:
        if timing.end_ms > played_ms:
            break
        end = max(end, timing.text_offset + len(timing.text))
    end = min(end, len(reply_text))
    while 0 < end < len(reply_text) and _is_edge_punctuation(reply_text[end]):
        end += 1
    return reply_text[:end]
