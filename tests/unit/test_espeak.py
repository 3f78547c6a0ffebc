"""The embedded espeak-ng engine: real synthesis through libespeak-ng."""

from __future__ import annotations

import array
import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest

from voxrelay.service.errors import InvalidRequest, Unavailable, UpstreamTimeout
from voxrelay.service.providers import espeak
from voxrelay.service.providers.base import SpeechEngine
from voxrelay.service.providers.espeak import EspeakEngine

HELLO = "Hello world. This is voxrelay."
LONG = (
    "The quick brown fox jumps over the lazy dog, while the gateway streams speech "
    "sentence by sentence to every caller that asked for it. "
) * 6


@pytest.fixture
async def engine() -> AsyncIterator[EspeakEngine]:
    engine = EspeakEngine()
    yield engine
    await engine.aclose()


async def chunks_of(
    engine: EspeakEngine, text: str, *, voice: str = "", speed: float = 1.0
) -> list[bytes]:
    return [
        chunk
        async for chunk in engine.synthesize(
            text, voice=voice, speed=speed, instructions="", timeout=10
        )
    ]


def seconds(engine: EspeakEngine, pcm: bytes) -> float:
    return len(pcm) / 2 / engine.sample_rate


def peak(pcm: bytes) -> int:
    return max(abs(sample) for sample in array.array("h", pcm))


Put = Callable[[espeak._Job, "bytes | Exception | None"], None]


def spy_on_chunks(
    monkeypatch: pytest.MonkeyPatch, after_chunk: Callable[[espeak._Job, int], None]
) -> None:
    """Call *after_chunk(job, n)* on the espeak thread once the n-th chunk of a job is out."""
    original: Put = espeak._Job.put
    counts: dict[espeak._Job, int] = {}  # keyed by the job itself, so ids are never reused

    def put(job: espeak._Job, item: bytes | Exception | None) -> None:
        original(job, item)
        if isinstance(item, bytes):
            counts[job] = counts.get(job, 0) + 1
            after_chunk(job, counts[job])

    monkeypatch.setattr(espeak._Job, "put", put)


async def test_engine_is_a_speech_engine() -> None:
    engine: SpeechEngine = EspeakEngine()
    assert (engine.name, engine.sample_rate, engine.default_voice) == ("espeak", 22050, "en-us")
    assert engine.model.startswith("espeak-ng")
    await engine.aclose()


async def test_speaks_a_sentence_in_several_chunks(engine: EspeakEngine) -> None:
    chunks = await chunks_of(engine, HELLO)
    pcm = b"".join(chunks)
    assert len(chunks) > 1
    assert 1.0 < seconds(engine, pcm) < 4.0
    assert peak(pcm) > 1000


async def test_first_chunk_reaches_the_caller_while_espeak_is_still_speaking(
    engine: EspeakEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    consumed = threading.Event()

    def after_chunk(job: espeak._Job, n: int) -> None:
        if n == 1:
            # Hold espeak mid-sentence until the caller has the first chunk; an engine
            # that delivered only at the end would time out here.
            log.append("resumed" if consumed.wait(10) else "timed out")
        else:
            log.append(f"produced {n}")

    spy_on_chunks(monkeypatch, after_chunk)
    stream = engine.synthesize(LONG, voice="", speed=1.0, instructions="", timeout=20)
    first = await anext(stream)
    log.append("consumed 1")
    consumed.set()
    rest = [chunk async for chunk in stream]
    assert first and rest
    assert log[:3] == ["consumed 1", "resumed", "produced 2"]


async def test_the_event_loop_keeps_running_during_synthesis(
    engine: EspeakEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = 0
    ticked = threading.Event()
    threads: set[str] = set()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            if ticks == 50:
                ticked.set()
            await asyncio.sleep(0)

    def after_chunk(job: espeak._Job, n: int) -> None:
        threads.add(threading.current_thread().name)
        if n == 1:
            # The ticker can only reach 50 if espeak does not hold the loop's thread.
            assert ticked.wait(10)

    spy_on_chunks(monkeypatch, after_chunk)
    ticking = asyncio.create_task(ticker())
    try:
        chunks = await chunks_of(engine, LONG)
    finally:
        ticking.cancel()
    assert ticks >= 50
    assert seconds(engine, b"".join(chunks)) > 20
    assert len(threads) == 1
    assert threads.pop().startswith("espeak")
    assert threading.current_thread() is threading.main_thread()


async def test_voices_are_named_as_voice_accepts_them(engine: EspeakEngine) -> None:
    voices = await engine.voices()
    names = {voice.name for voice in voices}
    assert {"en-us", "en", "de", "fr", "es"} <= names
    assert len(names) == len(voices) > 50
    assert len({voice.language.split("-")[0] for voice in voices}) > 30
    assert next(v for v in voices if v.name == "en-us").language == "en-us"
    for name in ("de", "fr", "EN-US"):
        assert seconds(engine, b"".join(await chunks_of(engine, "Bonjour", voice=name))) > 0.3
    assert await engine.voices() == voices


async def test_a_language_code_finds_its_voice(engine: EspeakEngine) -> None:
    for code in ("fr-fr", "en-gb", "pt-br", "zh"):
        assert b"".join(await chunks_of(engine, "one", voice=code))


async def test_unknown_voice_is_an_invalid_request(engine: EspeakEngine) -> None:
    # espeak's own language match would pick Norwegian for this one.
    with pytest.raises(InvalidRequest, match="voxrelay voices"):
        await chunks_of(engine, HELLO, voice="no-such-voice")
    assert await chunks_of(engine, HELLO)


async def test_double_speed_is_clearly_shorter(engine: EspeakEngine) -> None:
    normal = seconds(engine, b"".join(await chunks_of(engine, HELLO, speed=1.0)))
    fast = seconds(engine, b"".join(await chunks_of(engine, HELLO, speed=2.0)))
    default = seconds(engine, b"".join(await chunks_of(engine, HELLO, speed=0)))
    assert fast < 0.7 * normal
    assert default == pytest.approx(normal, rel=0.05)
    with pytest.raises(InvalidRequest):
        await chunks_of(engine, HELLO, speed=-1)


async def test_markup_is_spoken_as_text(engine: EspeakEngine) -> None:
    plain = seconds(engine, b"".join(await chunks_of(engine, "hello")))
    tagged = seconds(engine, b"".join(await chunks_of(engine, "<speak>hello</speak>")))
    assert tagged > 1.5 * plain


async def test_closing_early_stops_espeak_and_the_next_synthesis_is_whole(
    engine: EspeakEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = await chunks_of(engine, LONG)
    produced: dict[espeak._Job, int] = {}
    log: list[str] = []
    closed = threading.Event()

    def after_chunk(job: espeak._Job, n: int) -> None:
        produced[job] = n
        if n == 1:
            # Keep the job busy past the abort: aclose() must still wait for its end.
            closed.wait(1)

    original = espeak._Runtime.synthesize

    def synthesize(runtime: espeak._Runtime, job: espeak._Job, *args: object) -> None:
        original(runtime, job, *args)  # type: ignore[arg-type]
        log.append("job ended")

    spy_on_chunks(monkeypatch, after_chunk)
    monkeypatch.setattr(espeak._Runtime, "synthesize", synthesize)
    stream = engine.synthesize(LONG, voice="", speed=1.0, instructions="", timeout=10)
    await anext(stream)
    await stream.aclose()
    log.append("closed")
    closed.set()
    ((cut_job, cut),) = produced.items()
    again = await chunks_of(engine, LONG)
    assert log[:2] == ["job ended", "closed"]
    # The cut job made no chunk after aclose() returned, and far fewer than a whole one.
    assert produced[cut_job] == cut < len(whole) / 2
    assert seconds(engine, b"".join(again)) == pytest.approx(
        seconds(engine, b"".join(whole)), rel=0.02
    )


async def test_a_cancelled_consumer_stops_espeak(engine: EspeakEngine) -> None:
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.synthesize(LONG, voice="", speed=1.0, instructions="", timeout=10):
            got_one.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 1.0 < seconds(engine, b"".join(await chunks_of(engine, HELLO))) < 4.0


async def test_concurrent_streams_both_complete(engine: EspeakEngine) -> None:
    solo_a = seconds(engine, b"".join(await chunks_of(engine, HELLO)))
    solo_b = seconds(engine, b"".join(await chunks_of(engine, LONG, voice="de")))
    a, b = await asyncio.gather(chunks_of(engine, HELLO), chunks_of(engine, LONG, voice="de"))
    assert seconds(engine, b"".join(a)) == pytest.approx(solo_a, rel=0.02)
    assert seconds(engine, b"".join(b)) == pytest.approx(solo_b, rel=0.02)


async def test_engines_share_one_thread_that_ends_with_the_last() -> None:
    baseline = threading.active_count()
    first, second = EspeakEngine(), EspeakEngine(default_voice="de")
    assert await chunks_of(first, HELLO)
    assert await chunks_of(second, HELLO)
    assert threading.active_count() == baseline + 1
    await first.aclose()
    await first.aclose()
    assert await chunks_of(second, HELLO)
    with pytest.raises(Unavailable):
        await chunks_of(first, HELLO)
    await second.aclose()
    assert threading.active_count() == baseline
    # A new engine after the last close starts the library afresh.
    third = EspeakEngine()
    assert 1.0 < seconds(third, b"".join(await chunks_of(third, HELLO))) < 4.0
    await third.aclose()
    assert threading.active_count() == baseline


async def test_a_stalled_engine_times_out(
    engine: EspeakEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled: list[espeak._Job] = []

    def after_chunk(job: espeak._Job, n: int) -> None:
        if not stalled:
            stalled.append(job)
            while not job.cancelled:  # stall until the stream gives up
                time.sleep(0.001)

    spy_on_chunks(monkeypatch, after_chunk)
    stream = engine.synthesize(LONG, voice="", speed=1.0, instructions="", timeout=0.05)
    with pytest.raises(UpstreamTimeout):
        async for _ in stream:
            pass
    assert await chunks_of(engine, HELLO)
