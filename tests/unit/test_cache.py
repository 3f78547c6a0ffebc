"""The phrase cache: the core alone (fakes.providers), and the cache's own bound.

A repeated segment is replayed: the speech engine is not asked again, the audio and the
word timings come out as the first time. Two streams asking for one phrase at once make
it once; a phrase whose making failed or was cancelled is never served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from fakes.providers import SpyChat, ToneSpeech, pcm_bytes
from tests.servers import make_settings
from tests.waiting import eventually
from voxrelay.service import metrics
from voxrelay.service.cache import ENTRY_OVERHEAD, MAX_ENTRY_SHARE, Phrase, PhraseCache, PhraseKey
from voxrelay.service.errors import VoxrelayError
from voxrelay.service.model import (
    AudioChunk,
    AudioFormat,
    Event,
    Mode,
    SegmentStarted,
    SynthesisRequest,
    WordTimings,
)
from voxrelay.service.synthesizer import Synthesizer
from voxrelay.service.words import WordMark

TEXT = "Sure thing. Let me check that for you."
WAIT = 10.0


def speak(text: str = TEXT, **fields: Any) -> SynthesisRequest:
    return SynthesisRequest(text=text, mode=Mode.SPEAK, format=AudioFormat.PCM, **fields)


async def run(core: Synthesizer, request: SynthesisRequest) -> list[Event]:
    async with asyncio.timeout(WAIT), core.stream(request) as events:
        return [event async for event in events]


def audio(events: Sequence[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, AudioChunk))


def words(events: Sequence[Event]) -> list[Any]:
    return [e.words for e in events if isinstance(e, WordTimings)]


def segments(events: Sequence[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, SegmentStarted)]


@pytest.fixture
async def core() -> AsyncIterator[tuple[Synthesizer, ToneSpeech]]:
    speech = ToneSpeech(gate=None)
    synthesizer = Synthesizer(make_settings(cache_mb=64), SpyChat(), speech)
    yield synthesizer, speech
    await synthesizer.aclose()


def key(text: str, **fields: Any) -> PhraseKey:
    values: dict[str, Any] = dict(
        engine="espeak",
        model="tone",
        voice="tone",
        speed=1.0,
        instructions="",
        sample_rate=24000,
        text=text,
    )
    values.update(fields)
    return PhraseKey(**values)


# The bound


def test_a_phrase_survives_its_trip_through_bytes() -> None:
    marks = (WordMark(0, 4, 0), WordMark(5, 5, 310))
    for phrase in (Phrase(b"\x01\x02" * 50, 24000), Phrase(b"\x00\x10" * 7, 16000, marks)):
        assert Phrase.from_bytes(phrase.to_bytes()) == phrase
    assert Phrase.from_bytes(b"not a phrase") is None
    assert Phrase.from_bytes(Phrase(b"\x00\x01", 24000).to_bytes()[:-1]) is None


def test_least_recently_used_goes_first_and_bytes_stay_within_the_bound() -> None:
    size = 1000
    cache = PhraseCache(max_bytes=4 * (size + ENTRY_OVERHEAD) * MAX_ENTRY_SHARE // 4)
    evictions = metrics.CACHE_EVICTIONS._value.get()
    gauge = metrics.CACHE_BYTES._value.get()
    for word in "abcd":
        cache.put(key(word), Phrase(bytes(size), 24000))
    assert len(cache) == 4 and cache.bytes == 4 * (size + ENTRY_OVERHEAD)
    assert cache.get(key("a")) is not None  # "a" is now the most recently used
    cache.put(key("e"), Phrase(bytes(size), 24000))
    assert cache.get(key("b")) is None  # the least recently used went
    assert all(cache.get(key(word)) is not None for word in "acde")
    assert cache.bytes <= cache.max_bytes
    assert metrics.CACHE_EVICTIONS._value.get() == evictions + 1
    assert metrics.CACHE_BYTES._value.get() == gauge + cache.bytes


def test_a_phrase_too_big_for_its_share_is_not_kept() -> None:
    cache = PhraseCache(max_bytes=40_000)
    cache.put(key("long"), Phrase(bytes(40_000 // MAX_ENTRY_SHARE), 24000))
    assert cache.get(key("long")) is None and cache.bytes == 0


def test_every_field_of_the_key_tells_phrases_apart() -> None:
    base = key("Hello.")
    others = [
        key("Hello!"),
        key("Hello.", engine="openai"),
        key("Hello.", model="other"),
        key("Hello.", voice="low"),
        key("Hello.", speed=1.25),
        key("Hello.", instructions="cheerful"),
        key("Hello.", sample_rate=16000),
    ]
    assert len({base.digest(), *(k.digest() for k in others)}) == len(others) + 1
    assert base.digest() == key("Hello.").digest()


# Through the core


async def test_a_repeated_segment_is_replayed_with_the_same_audio_and_words(
    core: tuple[Synthesizer, ToneSpeech],
) -> None:
    synthesizer, speech = core
    hits = metrics.CACHE_HITS._value.get()
    misses = metrics.CACHE_MISSES._value.get()
    first = await run(synthesizer, speak())
    assert speech.calls == ["Sure thing.", "Let me check that for you."]
    again = await run(synthesizer, speak())
    assert len(speech.calls) == 2  # nothing new asked of the engine
    assert audio(again) == audio(first) and len(audio(first)) == sum(
        pcm_bytes(s) for s in speech.calls
    )
    assert words(again) == words(first) and words(first)
    assert metrics.CACHE_MISSES._value.get() == misses + 2
    assert metrics.CACHE_HITS._value.get() == hits + 2
    # One segment shared with another text: only the new one is spoken.
    await run(synthesizer, speak("Sure thing. Anything else?"))
    assert speech.calls[2:] == ["Anything else?"]


async def test_another_voice_or_speed_is_another_phrase(
    core: tuple[Synthesizer, ToneSpeech],
) -> None:
    synthesizer, speech = core
    await run(synthesizer, speak("Hello."))
    await run(synthesizer, speak("Hello.", voice="low"))
    await run(synthesizer, speak("Hello.", speed=1.5))
    await run(synthesizer, speak("Hello.", speed=1.5))
    assert speech.calls == ["Hello."] * 3


async def test_cache_mb_0_turns_it_off() -> None:
    speech = ToneSpeech()
    synthesizer = Synthesizer(make_settings(cache_mb=0), SpyChat(), speech)
    try:
        assert synthesizer.phrases is None
        await run(synthesizer, speak("Hello."))
        await run(synthesizer, speak("Hello."))
        assert speech.calls == ["Hello.", "Hello."]
    finally:
        await synthesizer.aclose()


async def test_two_streams_asking_at_once_synthesise_once(
    core: tuple[Synthesizer, ToneSpeech],
) -> None:
    synthesizer, speech = core
    speech.gate = asyncio.Event()  # every segment holds after its first chunk
    first = asyncio.create_task(run(synthesizer, speak("Just a moment.")))
    await eventually(lambda: len(speech.calls) == 1)
    second = asyncio.create_task(run(synthesizer, speak("Just a moment.")))
    phrases = synthesizer.phrases
    assert phrases is not None
    await eventually(lambda: phrases.waiting(key("Just a moment.")) == 1)
    speech.gate.set()
    a, b = await asyncio.gather(first, second)
    assert speech.calls == ["Just a moment."]
    assert audio(a) == audio(b) and len(audio(a)) == pcm_bytes("Just a moment.")


async def test_a_cancelled_maker_leaves_no_half_phrase_and_its_waiter_makes_it(
    core: tuple[Synthesizer, ToneSpeech],
) -> None:
    synthesizer, speech = core
    phrases = synthesizer.phrases
    assert phrases is not None
    speech.gate = asyncio.Event()
    maker = asyncio.create_task(run(synthesizer, speak("Just a moment.")))
    await eventually(lambda: len(speech.calls) == 1)
    waiter = asyncio.create_task(run(synthesizer, speak("Just a moment.")))
    await eventually(lambda: phrases.waiting(key("Just a moment.")) == 1)
    maker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await maker
    assert len(phrases) == 0  # the maker's half is not kept
    await eventually(lambda: len(speech.calls) == 2)  # the waiter makes it itself
    speech.gate.set()
    events = await waiter
    assert len(audio(events)) == pcm_bytes("Just a moment.")
    assert len(phrases) == 1
    cached = phrases.get(key("Just a moment."))
    assert cached is not None and cached.pcm == audio(events)


async def test_a_failed_segment_is_not_cached(core: tuple[Synthesizer, ToneSpeech]) -> None:
    synthesizer, speech = core
    speech.fail_on = "broken"
    with pytest.raises(VoxrelayError):
        await run(synthesizer, speak("This one is broken."))
    assert synthesizer.phrases is not None and len(synthesizer.phrases) == 0
    speech.fail_on = None
    events = await run(synthesizer, speak("This one is broken."))
    assert speech.calls == ["This one is broken."] * 2
    assert len(audio(events)) == pcm_bytes("This one is broken.")


async def test_a_waiter_whose_maker_is_stuck_speaks_the_segment_itself(
    core: tuple[Synthesizer, ToneSpeech],
) -> None:
    synthesizer, speech = core
    phrases = synthesizer.phrases
    assert phrases is not None
    phrases.max_wait_s = 0.05
    speech.gate = asyncio.Event()  # the maker is held after its first chunk, for good
    maker = asyncio.create_task(run(synthesizer, speak("Just a moment.")))
    await eventually(lambda: len(speech.calls) == 1)
    speech.gate = None  # the waiter's own call is not held
    waiter = asyncio.create_task(run(synthesizer, speak("Just a moment.")))
    await eventually(lambda: len(speech.calls) == 2)  # it gave up waiting and asked itself
    assert phrases.waiting(key("Just a moment.")) == 0
    events = await waiter
    assert len(audio(events)) == pcm_bytes("Just a moment.")
    assert speech.calls == ["Just a moment."] * 2
    assert len(phrases) == 0  # caching is left to the maker, still at work
    maker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await maker
    assert len(phrases) == 0
