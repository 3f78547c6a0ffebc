"""The silence trimmer alone (sans-I/O), and in the core with the embedded espeak engine."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from fakes.openai_upstream import voice_pcm
from fakes.providers import ToneSpeaker, ToneSpeech, pcm_bytes
from tests.servers import make_settings
from voxrelay.service.model import (
    AudioChunk,
    AudioFormat,
    Event,
    Mode,
    SegmentStarted,
    SynthesisRequest,
    WordTimings,
)
from voxrelay.service.providers.base import ReadHold, SpokenDelta
from voxrelay.service.providers.echo import EchoChat
from voxrelay.service.providers.espeak import EspeakEngine
from voxrelay.service.silence import LEAD_MS, MAX_HOLD_MS, SilenceTrimmer
from voxrelay.service.synthesizer import Synthesizer
from voxrelay.service.words import WordMark

RATE = 24_000
MS = RATE * 2 // 1000  # bytes a millisecond


def silence(ms: int) -> bytes:
    return bytes(ms * MS)


def speech(ms: int) -> bytes:
    return voice_pcm(ms * RATE // 1000)


def leading_silence_ms(pcm: bytes) -> int:
    """Milliseconds before the first sample at or above -45 dBFS."""
    samples = memoryview(pcm).cast("h")
    for i, sample in enumerate(samples):
        if abs(sample) >= 184:
            return i * 1000 // RATE
    return len(samples) * 1000 // RATE


def trailing_silence_ms(pcm: bytes) -> int:
    """Milliseconds after the last sample at or above -45 dBFS."""
    samples = memoryview(pcm).cast("h")
    for i in range(len(samples) - 1, -1, -1):
        if abs(samples[i]) >= 184:
            return (len(samples) - 1 - i) * 1000 // RATE
    return len(samples) * 1000 // RATE


def feed_in(trimmer: SilenceTrimmer, pcm: bytes, step: int) -> bytes:
    out = b""
    for at in range(0, len(pcm), step):
        out += trimmer.feed(pcm[at : at + step])
    return out + trimmer.end()


def test_a_segment_starts_at_its_sound_and_ends_in_one_pause() -> None:
    trimmer = SilenceTrimmer(RATE, pause_ms=250)
    out = feed_in(trimmer, silence(400) + speech(500) + silence(700), 960)
    assert leading_silence_ms(out) <= 30
    assert 240 <= trailing_silence_ms(out) <= 260
    assert speech(500) in out


def test_a_short_trailing_silence_is_made_up_to_the_pause() -> None:
    trimmer = SilenceTrimmer(RATE, pause_ms=250)
    out = feed_in(trimmer, speech(300) + silence(50), 480)
    assert len(out) == (300 + 250) * MS
    assert out.startswith(speech(300))


def test_a_pause_inside_a_segment_is_kept_whole() -> None:
    trimmer = SilenceTrimmer(RATE, pause_ms=100)
    pcm = speech(200) + silence(600) + speech(200)
    out = feed_in(trimmer, pcm, 480)
    assert out == pcm + silence(100)


def test_speech_after_a_held_silence_sends_the_silence_once_then_itself() -> None:
    trimmer = SilenceTrimmer(RATE, pause_ms=100)
    sent = trimmer.feed(speech(200)) + trimmer.feed(silence(600))
    assert len(sent) == 300 * MS  # the rest of the silence is held
    sent += trimmer.feed(speech(200))  # a piece that is speech throughout
    sent += trimmer.feed(speech(200))
    assert sent == speech(200) + silence(600) + speech(200) + speech(200)


def test_silence_is_held_back_only_beyond_the_pause_and_only_so_long() -> None:
    trimmer = SilenceTrimmer(RATE, pause_ms=100, max_hold_ms=500)
    assert trimmer.feed(speech(100)) == speech(100)
    # The first 100 ms of a silence goes out at once, the rest is held ...
    assert len(trimmer.feed(silence(300))) == 100 * MS
    # ... but never more than max_hold_ms of it.
    assert len(trimmer.feed(silence(1000))) == (1300 - 100 - 500) * MS


def test_a_silent_segment_sends_nothing_and_each_segment_is_trimmed() -> None:
    trimmer = SilenceTrimmer(RATE, pause_ms=250)
    assert feed_in(trimmer, silence(500), 960) == b""
    trimmer.begin()
    first = feed_in(trimmer, silence(300) + speech(100) + silence(300), 960)
    trimmer.begin()
    second = feed_in(trimmer, silence(300) + speech(100) + silence(300), 960)
    assert first == second
    assert leading_silence_ms(first) <= 30


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=1, max_value=600)), min_size=1, max_size=8
    ),
    step=st.integers(min_value=1, max_value=4000),
    pause_ms=st.integers(min_value=0, max_value=400),
)
def test_any_segment_in_any_chunks(parts: list[tuple[bool, int]], step: int, pause_ms: int) -> None:
    pcm = b"".join(speech(ms) if loud else silence(ms) for loud, ms in parts)
    whole = SilenceTrimmer(RATE, pause_ms=pause_ms)
    once = whole.feed(pcm) + whole.end()
    # Chunking does not matter (odd chunk sizes split samples too).
    assert feed_in(SilenceTrimmer(RATE, pause_ms=pause_ms), pcm, step) == once
    # Nor does the shortcut for pieces that are speech throughout: window by window
    # (an empty run is found in any piece) gives the same audio.
    windowed = SilenceTrimmer(RATE, pause_ms=pause_ms)
    windowed._quiet_run = b""
    assert feed_in(windowed, pcm, step) == once
    if not any(loud for loud, _ in parts):
        assert once == b""
        return
    assert leading_silence_ms(once) <= 30
    # The segment ends in its pause, and at most the silent part of its last loud window
    # and what a silence longer than the trimmer may hold let go of.
    surplus = max(0, trailing_silence_ms(pcm) - pause_ms - MAX_HOLD_MS)
    assert pause_ms <= trailing_silence_ms(once) <= pause_ms + 11 + surplus
    # Between its first and last sound the audio is untouched.
    first = leading_silence_ms(pcm) * MS
    last = len(pcm) - trailing_silence_ms(pcm) * MS
    if last - first > 20 * MS:
        assert pcm[first + 10 * MS : last - 10 * MS] in once


def audio_per_segment(events: list[Event]) -> dict[int, bytes]:
    audio: dict[int, bytes] = {}
    for event in events:
        if isinstance(event, AudioChunk):
            audio[event.segment_index] = audio.get(event.segment_index, b"") + event.data
    return audio


async def speak_with_espeak(trim: bool) -> tuple[list[SegmentStarted], dict[int, bytes]]:
    core = Synthesizer(
        make_settings(trim_silence=trim, segment_pause_ms=250), EchoChat(), EspeakEngine()
    )
    request = SynthesisRequest(
        text="Hello there. This is one sentence. And this is another.",
        mode=Mode.SPEAK,
        format=AudioFormat.PCM,
    )
    try:
        async with asyncio.timeout(20), core.stream(request) as events:
            got = [event async for event in events]
    finally:
        await core.aclose()
    return [e for e in got if isinstance(e, SegmentStarted)], audio_per_segment(got)


async def test_espeak_segments_start_at_their_sound_and_follow_the_audio_as_sent() -> None:
    segments, audio = await speak_with_espeak(trim=True)
    assert len(segments) == 3
    rate = 22050
    at = 0
    for i, segment in enumerate(segments):
        pcm = audio[i]
        samples = memoryview(pcm).cast("h")
        first = next(n for n, s in enumerate(samples) if abs(s) >= 184)
        assert first * 1000 // rate <= 30
        # start_ms follows the audio as sent.
        assert abs(segment.start_ms - at * 1000 // rate) <= 1
        at += len(pcm) // 2
        if i < len(segments) - 1:
            last = max(n for n, s in enumerate(samples) if abs(s) >= 184)
            assert abs((len(samples) - 1 - last) * 1000 // rate - 250) <= 15


@dataclass
class LateSpeaker(ToneSpeaker):
    """A speaking model whose reply starts with 300 ms of silence, as realtime models' do."""

    async def _respond(self, speed: float) -> AsyncGenerator[SpokenDelta, None]:
        yield SpokenDelta(pcm=silence(300))
        async for delta in super()._respond(speed):
            yield delta


async def test_a_speaking_models_reply_starts_at_its_sound() -> None:
    speaker = LateSpeaker()
    core = Synthesizer(make_settings(trim_silence=True), speaker, ToneSpeech())
    request = SynthesisRequest(text="Say something.", mode=Mode.CHAT, format=AudioFormat.PCM)
    try:
        async with asyncio.timeout(20), core.stream(request) as events:
            got = [event async for event in events]
    finally:
        await core.aclose()
    pcm = b"".join(e.data for e in got if isinstance(e, AudioChunk))
    assert leading_silence_ms(pcm) <= 30
    # The tone itself is never silent: all of it is sent, after its lead-in and before
    # the one pause that ends the reply.
    assert len(pcm) == (LEAD_MS + 250) * MS + pcm_bytes(speaker.reply)
    segments = [e for e in got if isinstance(e, SegmentStarted)]
    assert segments[0].start_ms == 0
    words = [w for e in got if isinstance(e, WordTimings) for w in e.words]
    assert words and words[0].start_ms <= 30


@dataclass
class MarkingSpeech(ToneSpeech):
    """Speaks after 300 ms of silence and reports where each word starts, as espeak does."""

    reports_words: bool = True

    def synthesize(
        self,
        text: str,
        *,
        voice: str,
        speed: float,
        instructions: str,
        timeout: float,
        caller: str | None = None,
        marks: list[WordMark] | None = None,
        hold: ReadHold | None = None,
    ) -> AsyncGenerator[bytes, None]:
        return self._late(text, speed, marks)

    async def _late(
        self, text: str, speed: float, marks: list[WordMark] | None
    ) -> AsyncGenerator[bytes, None]:
        if marks is not None:
            for word in re.finditer(r"\S+", text):
                marks.append(WordMark(word.start(), len(word.group()), 300 + word.start() * 10))
        yield silence(300)
        async for chunk in self._speak(text, speed):
            yield chunk


async def test_an_engines_word_marks_follow_the_trimmed_audio() -> None:
    core = Synthesizer(make_settings(trim_silence=True), EchoChat(), MarkingSpeech())
    request = SynthesisRequest(
        text="Right then. Let us begin.", mode=Mode.SPEAK, format=AudioFormat.PCM
    )
    try:
        async with asyncio.timeout(20), core.stream(request) as events:
            got = [event async for event in events]
    finally:
        await core.aclose()
    words = [w for e in got if isinstance(e, WordTimings) for w in e.words]
    segments = [e for e in got if isinstance(e, SegmentStarted)]
    assert [w.text for w in words] == ["Right", "then", "Let", "us", "begin"]
    # Each segment's sound starts LEAD_MS into its audio; so does its first word.
    assert [w.start_ms for w in words] == [
        segments[0].start_ms + LEAD_MS,
        segments[0].start_ms + LEAD_MS + 60,
        segments[1].start_ms + LEAD_MS,
        segments[1].start_ms + LEAD_MS + 40,
        segments[1].start_ms + LEAD_MS + 70,
    ]
