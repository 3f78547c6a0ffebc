"""The phrase cache over real doors and a real Redis.

A repeated reply costs no speech request to the (fake) OpenAI upstream, on either door;
every format is made from one replayed entry; two processes' caches ("replicas") share
phrases through a real ``redis-server`` (``tests.redis_server``), within the shared tier's
own bound and expiry, and a Redis that does not answer costs a stream nothing but the phrase.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import av
import pytest
from redis.asyncio import Redis

from fakes.openai_upstream import FakeOpenAI, Latency
from fakes.providers import SpyChat, ToneSpeech, pcm_bytes
from tests.integration.test_metrics import PROMTOOL, Scrape, delta, promtool_check, scrape
from tests.redis_server import RedisServer, free_port
from tests.servers import make_settings, running_app
from voxrelay.client import AudioChunk, Client, StreamFinished
from voxrelay.gateways.app import App
from voxrelay.service import metrics
from voxrelay.service.cache import Phrase, PhraseCache, SharedPhrases
from voxrelay.service.model import AudioChunk as CoreAudioChunk
from voxrelay.service.model import AudioFormat, Mode, SynthesisRequest
from voxrelay.service.model import WordTimings as CoreWordTimings
from voxrelay.service.providers.registry import make_chat, make_speech
from voxrelay.service.synthesizer import Synthesizer

WAIT = 30.0
KEY = "sk-cache-3c1f0e9a7b5d42e8"
TEXT = "Sure! Let me check that for you."


def speak(text: str = TEXT) -> SynthesisRequest:
    return SynthesisRequest(text=text, mode=Mode.SPEAK, format=AudioFormat.PCM)


async def pcm_of(core: Synthesizer, request: SynthesisRequest) -> bytes:
    async with asyncio.timeout(WAIT), core.stream(request) as events:
        return b"".join(getattr(e, "data", b"") for e in [e async for e in events])


@asynccontextmanager
async def replica(url: str, **settings: Any) -> AsyncIterator[tuple[Synthesizer, ToneSpeech]]:
    """One "replica": its own core, engine and in-memory cache, on the shared Redis."""
    speech = ToneSpeech()
    core = Synthesizer(make_settings(cache_mb=64, redis_url=url, **settings), SpyChat(), speech)
    try:
        yield core, speech
    finally:
        await core.aclose()


# Shared through Redis


async def test_a_phrase_made_on_one_replica_is_replayed_on_another(
    redis_server: RedisServer,
) -> None:
    async with (
        replica(redis_server.url) as (one, one_speech),
        replica(redis_server.url) as (two, two_speech),
    ):
        made = await pcm_of(one, speak())
        assert one.phrases is not None
        await one.phrases.flushed()
        replayed = await pcm_of(two, speak())
        assert two_speech.calls == []  # the second replica asked no engine
        assert replayed == made and len(made) == sum(pcm_bytes(s) for s in one_speech.calls)


async def test_redis_evicts_the_least_recently_used_of_uses_in_one_millisecond(
    redis_server: RedisServer,
) -> None:
    """Uses closer together than a millisecond keep their order in the LRU.

    Names are put in reverse order, so ties broken by name would evict the wrong one;
    five rounds, because a round's first put may have had its millisecond to itself.
    """
    entry = Phrase(bytes(1_000), 24000)
    names = list("zyxwvutsrqponmlk")
    for round_ in range(5):
        shared = SharedPhrases.from_url(
            redis_server.url,
            max_bytes=len(names) * len(entry.to_bytes()),
            ttl_s=60,
            prefix=f"{{test-ties-{round_}}}",
        )
        try:
            for name in names:
                await shared.put(name, entry)
            await shared.put("newest", entry)

            assert await shared.get(names[0]) is None
            assert all([await shared.get(name) == entry for name in [*names[1:], "newest"]])
        finally:
            await shared.aclose()


async def test_redis_holds_the_phrases_within_its_own_bound_and_expiry(
    redis_server: RedisServer,
) -> None:
    entry = Phrase(bytes(10_000), 24000)
    size = len(entry.to_bytes())
    shared = SharedPhrases.from_url(
        redis_server.url, max_bytes=3 * size, ttl_s=60, prefix="{test-bound}"
    )
    client = Redis.from_url(redis_server.url)
    try:
        evictions = metrics.CACHE_EVICTIONS._value.get()
        for name in ("a", "b", "c"):
            await shared.put(name, entry)
        assert await shared.get("a") == entry  # "a" is now the most recently used
        await shared.put("d", entry)
        assert await shared.get("b") is None
        assert all([await shared.get(name) == entry for name in ("a", "c", "d")])
        assert int(await client.get("{test-bound}:total")) == 3 * size
        assert metrics.CACHE_EVICTIONS._value.get() == evictions + 1
        assert 0 < await client.pttl("{test-bound}:e:a") <= 60_000
        # Too big for the bound: not stored, nothing pushed out.
        await shared.put("huge", Phrase(bytes(4 * size), 24000))
        assert await shared.get("huge") is None and await shared.get("a") == entry
    finally:
        await client.aclose()
        await shared.aclose()


async def test_expired_phrases_leave_the_bookkeeping(redis_server: RedisServer) -> None:
    shared = SharedPhrases.from_url(
        redis_server.url, max_bytes=1_000_000, ttl_s=0.05, prefix="{test-ttl}"
    )
    client = Redis.from_url(redis_server.url)
    try:
        await shared.put("old", Phrase(bytes(1000), 24000))
        async with asyncio.timeout(WAIT):
            while await client.exists("{test-ttl}:e:old"):  # noqa: ASYNC110 - Redis expiry
                await asyncio.sleep(0.01)
        await shared.put("new", Phrase(bytes(2000), 24000))
        assert await client.hkeys("{test-ttl}:size") == [b"new"]
        assert int(await client.get("{test-ttl}:total")) == len(
            Phrase(bytes(2000), 24000).to_bytes()
        )
    finally:
        await client.aclose()
        await shared.aclose()


async def test_a_redis_that_does_not_answer_is_a_miss_not_a_failure(
    redis_server: RedisServer,
) -> None:
    async with replica(redis_server.url) as (core, speech):
        redis_server.pause()
        made = await pcm_of(core, speak("Still here."))
        assert speech.calls == ["Still here."]
        assert len(made) == pcm_bytes("Still here.")
        assert core.phrases is not None
        await core.phrases.flushed()  # the write times out too, and is dropped
        # The phrase is still served from this process's memory.
        assert await pcm_of(core, speak("Still here.")) == made
        assert speech.calls == ["Still here."]


async def test_no_redis_at_all_is_a_miss_not_a_failure() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with replica(url) as (core, speech):
        assert len(await pcm_of(core, speak("Hello."))) == pcm_bytes("Hello.")
        assert speech.calls == ["Hello."]


# Over the doors


@asynccontextmanager
async def openai_app(**overrides: Any) -> AsyncIterator[tuple[App, FakeOpenAI]]:
    """The app on one fake OpenAI upstream (chat and speech), the cache on."""
    async with FakeOpenAI(latency=Latency.zero(), api_key=KEY) as upstream:
        settings: dict[str, Any] = dict(
            llm="openai",
            tts="openai",
            llm_base_url=upstream.base_url,
            tts_base_url=upstream.base_url,
            llm_api_key=KEY,
            tts_api_key=KEY,
            cache_mb=64,
        )
        settings.update(overrides)
        async with running_app(**settings) as app:
            yield app, upstream


def target(app: App, via: str) -> str:
    if via == "ws":
        return f"ws://127.0.0.1:{app.ws_port}/v1/stream"
    return f"127.0.0.1:{app.grpc_port}"


@pytest.mark.parametrize("via", ["grpc", "ws"])
async def test_a_repeated_reply_costs_no_speech_request(via: str) -> None:
    async with openai_app() as (app, upstream):
        heard = []
        for _ in range(2):
            async with Client(target(app, via), timeout=WAIT) as client:
                events = [e async for e in client.synthesize("What does a ticket cost?")]
            assert isinstance(events[-1], StreamFinished)
            heard.append(b"".join(e.data for e in events if isinstance(e, AudioChunk)))
            if len(heard) == 1:
                speech_requests = len(upstream.speech_requests)
                assert speech_requests > 0
        assert len(upstream.chat_requests) == 2  # the reply is still the LLM's to write
        assert len(upstream.speech_requests) == speech_requests  # but none of it is spoken again
        assert heard[1] == heard[0]  # the same audio


async def test_repeated_speak_requests_cost_no_upstream_request() -> None:
    async with openai_app() as (app, upstream):
        async with Client(target(app, "grpc"), timeout=WAIT) as client:
            first = [e async for e in client.synthesize(TEXT, mode="speak", format="mp3")]
            before = len(upstream.requests)
            again = [e async for e in client.synthesize(TEXT, mode="speak", format="mp3")]
        assert len(upstream.requests) == before
        assert isinstance(first[-1], StreamFinished) and isinstance(again[-1], StreamFinished)
        assert again[-1].audio_ms == first[-1].audio_ms


DECODE = {
    "pcm": ("s16le", {"sample_rate": "22050", "ch_layout": "mono"}),
    "wav": ("wav", {}),
    "mp3": ("mp3", {}),
    "opus": ("ogg", {}),
    "flac": ("flac", {}),
    "aac": ("aac", {}),
    "mulaw": ("mulaw", {"sample_rate": "8000", "ch_layout": "mono"}),
    "alaw": ("alaw", {"sample_rate": "8000", "ch_layout": "mono"}),
}


def decode_seconds(data: bytes, fmt: str) -> float:
    demux, options = DECODE[fmt]
    with av.open(io.BytesIO(data), format=demux, options=options) as container:
        samples = rate = 0
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate


async def test_every_format_decodes_from_one_replayed_entry() -> None:
    assert set(DECODE) == {f.value for f in AudioFormat}
    async with running_app(cache_mb=64) as app:  # the embedded espeak engine
        async with Client(target(app, "grpc"), timeout=WAIT) as client:
            first = [e async for e in client.synthesize(TEXT, mode="speak", format="pcm")]
            assert isinstance(finished := first[-1], StreamFinished)
            misses = metrics.CACHE_MISSES._value.get()
            hits = metrics.CACHE_HITS._value.get()
            for fmt in DECODE:
                events = [e async for e in client.synthesize(TEXT, mode="speak", format=fmt)]
                assert isinstance(events[-1], StreamFinished)
                audio = b"".join(e.data for e in events if isinstance(e, AudioChunk))
                seconds = decode_seconds(audio, fmt)
                assert abs(seconds * 1000 - finished.audio_ms) / finished.audio_ms < 0.05, fmt
        assert metrics.CACHE_MISSES._value.get() == misses  # every one of them a replay
        assert metrics.CACHE_HITS._value.get() > hits


async def test_the_cache_is_closed_with_the_app(redis_server: RedisServer) -> None:
    async with running_app(cache_mb=64, redis_url=redis_server.url) as app:
        phrases = app.synthesizer.phrases
        assert isinstance(phrases, PhraseCache) and phrases.shared is not None
        async with Client(target(app, "grpc"), timeout=WAIT) as client:
            [e async for e in client.synthesize("Hello there.", mode="speak")]
        assert phrases.bytes > 0
    assert phrases.bytes == 0


async def test_metrics_count_hits_misses_and_bytes() -> None:
    async with running_app(cache_mb=64) as app:  # the embedded espeak engine
        before = Scrape.parse(await scrape(app))
        async with Client(target(app, "ws"), timeout=WAIT) as client:
            for _ in range(2):
                [e async for e in client.synthesize(TEXT, mode="speak")]
        after = Scrape.parse(await scrape(app))
    # Every segment made once by the first request, replayed by the second.
    misses = delta(before, after, "voxrelay_cache_misses_total")
    assert misses > 0 and delta(before, after, "voxrelay_cache_hits_total") == misses
    assert after.types["voxrelay_cache_bytes"] == "gauge"
    assert after.value("voxrelay_cache_bytes") > 0
    assert "voxrelay_cache_evictions_total" in after.names()
    if PROMTOOL is not None:
        checked = promtool_check(after.text)
        assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_the_engines_word_marks_are_kept_and_replayed() -> None:
    settings = make_settings(cache_mb=64)
    core = Synthesizer(settings, make_chat(settings), make_speech(settings))
    try:
        phrases = core.phrases
        assert phrases is not None and core.engines.speech.reports_words  # espeak
        heard = []
        for _ in range(2):
            request = SynthesisRequest(
                text=TEXT, mode=Mode.SPEAK, format=AudioFormat.PCM, word_timestamps=True
            )
            async with asyncio.timeout(WAIT), core.stream(request) as stream:
                events = [e async for e in stream]
            timings = [e for e in events if isinstance(e, CoreWordTimings)]
            assert timings and not any(t.estimated for t in timings)
            audio = b"".join(e.data for e in events if isinstance(e, CoreAudioChunk))
            heard.append((audio, [t.words for t in timings]))
        assert heard[1] == heard[0]
        kept = list(phrases._entries.values())
        assert kept and all(phrase.marks for phrase in kept)
    finally:
        await core.aclose()
