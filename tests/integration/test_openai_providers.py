"""The OpenAI chat provider and speech engine against the fake upstream, over real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import pytest

from fakes.openai_upstream import (
    DEFAULT_REPLY,
    FakeOpenAI,
    Fault,
    Latency,
    RecordedRequest,
    expected_pcm_bytes,
    hang,
    malformed,
    reset_after,
    slow_first_byte,
    status,
    tokenize,
    voice_pcm,
)
from tests.waiting import eventually
from voxrelay.service.errors import UpstreamError, UpstreamTimeout, VoxrelayError
from voxrelay.service.model import ChatMessage
from voxrelay.service.providers.base import ChatDelta, ChatProvider, ReadHold, SpeechEngine
from voxrelay.service.providers.openai_chat import OpenAIChat
from voxrelay.service.providers.openai_speech import OpenAISpeech

CHAT_KEY = "sk-chat-0123456789abcdef"
SPEECH_KEY = "sk-speech-fedcba9876543210"
MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "How much is a ticket?")]
SENTENCE = "A single ticket costs three dollars and fifty cents."
RecordProperty = Callable[[str, object], None]
CLOSE_BUDGET_S = 0.1  # SPEC: upstream requests closed within 100 ms of a cancel


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(latency=Latency.zero()) as server:
        yield server


@pytest.fixture
async def chat(fake: FakeOpenAI) -> AsyncIterator[OpenAIChat]:
    provider = OpenAIChat(api_key=CHAT_KEY, base_url=fake.base_url, model="gpt-4o-mini")
    yield provider
    await provider.aclose()


@pytest.fixture
async def speech(fake: FakeOpenAI) -> AsyncIterator[OpenAISpeech]:
    engine = OpenAISpeech(api_key=SPEECH_KEY, base_url=fake.base_url, model="gpt-4o-mini-tts")
    yield engine
    await engine.aclose()


async def collect(
    chat: ChatProvider, *, max_tokens: int = 512, net_timeout: float = 5.0
) -> list[ChatDelta]:
    stream = chat.stream(MESSAGES, max_tokens=max_tokens, timeout=net_timeout)
    return [delta async for delta in stream]


async def say(
    speech: SpeechEngine,
    text: str = SENTENCE,
    *,
    speed: float = 1.0,
    instructions: str = "",
    net_timeout: float = 5.0,
) -> list[bytes]:
    stream = speech.synthesize(
        text, voice="alloy", speed=speed, instructions=instructions, timeout=net_timeout
    )
    return [chunk async for chunk in stream]


def gone(request: RecordedRequest) -> Callable[[], bool]:
    """Return a predicate: the fake saw the client leave *request*."""
    return lambda: request.client_gone_at is not None


def pool_size(provider: OpenAIChat | OpenAISpeech) -> int:
    """Count the SDK pool's open connections (its aiohttp connector's internals)."""
    session = provider._client._client._transport.client  # type: ignore[attr-defined]
    connector = session.connector
    return len(connector._acquired) + sum(len(idle) for idle in connector._conns.values())


# Chat


async def test_chat_streams_the_reply_and_reports_usage(fake: FakeOpenAI, chat: OpenAIChat) -> None:
    deltas = await collect(chat)
    *text, usage = deltas
    assert "".join(d.text for d in text) == DEFAULT_REPLY
    assert len(text) == len(tokenize(DEFAULT_REPLY))
    assert usage == ChatDelta(
        prompt_tokens=len(tokenize("Be brief.")) + len(tokenize("How much is a ticket?")),
        completion_tokens=len(text),
    )
    body = fake.chat_requests[0].body
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How much is a ticket?"},
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 512
    assert "max_completion_tokens" not in body


async def test_max_tokens_reaches_the_upstream(chat: OpenAIChat) -> None:
    *text, usage = await collect(chat, max_tokens=5)
    assert "".join(d.text for d in text) == "".join(tokenize(DEFAULT_REPLY)[:5])
    assert usage.completion_tokens == 5


async def test_each_upstream_gets_its_own_key() -> None:
    async with FakeOpenAI(latency=Latency.zero()) as llm, FakeOpenAI(latency=Latency.zero()) as tts:
        chat = OpenAIChat(api_key=CHAT_KEY, base_url=llm.base_url, model="m")
        speech = OpenAISpeech(api_key=SPEECH_KEY, base_url=tts.base_url, model="t")
        try:
            await collect(chat)
            await say(speech)
        finally:
            await chat.aclose()
            await speech.aclose()
        assert [r.path for r in llm.requests] == ["/v1/chat/completions"]
        assert [r.path for r in tts.requests] == ["/v1/audio/speech"]
        assert llm.requests[0].headers["authorization"] == f"Bearer {CHAT_KEY}"
        assert tts.requests[0].headers["authorization"] == f"Bearer {SPEECH_KEY}"


async def test_sdk_does_not_retry_on_its_own(fake: FakeOpenAI, chat: OpenAIChat) -> None:
    fake.chat_faults.extend([status(500), status(500)])
    with pytest.raises(UpstreamError):
        await collect(chat)
    assert len(fake.chat_requests) == 1  # the core retries; the SDK must not


CHAT_FAULTS = [
    (status(429, retry_after=2), UpstreamError, True, 429, 2.0),
    (status(429, retry_after_ms=1500), UpstreamError, True, 429, 1.5),
    (status(429, retry_after=7, retry_after_ms=250), UpstreamError, True, 429, 0.25),
    (status(500), UpstreamError, True, 500, None),
    (status(503, retry_after=1), UpstreamError, True, 503, 1.0),
    (status(401), UpstreamError, False, 401, None),
    (status(400, message="bad 'messages'"), UpstreamError, False, 400, None),
    (status(404, message="The model `m` does not exist"), UpstreamError, False, 404, None),
    (reset_after(0), UpstreamError, True, None, None),
    (reset_after(3), UpstreamError, True, None, None),
    (malformed(), UpstreamError, False, None, None),
    (hang(), UpstreamTimeout, True, None, None),
    (slow_first_byte(1.0), UpstreamTimeout, True, None, None),
]


@pytest.mark.parametrize(("fault", "error", "retryable", "code", "retry_after"), CHAT_FAULTS)
async def test_chat_faults_map_to_service_errors(
    fake: FakeOpenAI,
    chat: OpenAIChat,
    fault: Fault,
    error: type[VoxrelayError],
    retryable: bool,
    code: int | None,
    retry_after: float | None,
) -> None:
    fake.chat_faults.append(fault)
    with pytest.raises(error) as caught:
        await collect(chat, net_timeout=0.3)
    exc = caught.value
    assert type(exc) is error
    assert exc.retryable is retryable
    assert exc.retry_after_s == retry_after
    if isinstance(exc, UpstreamError):
        assert exc.status == code
    assert CHAT_KEY not in str(exc)
    assert "chat upstream" in str(exc)


async def test_chat_refusal_message_is_clear_and_keeps_the_key_secret(
    fake: FakeOpenAI, chat: OpenAIChat, caplog: pytest.LogCaptureFixture
) -> None:
    fake.api_key = "sk-the-right-one"
    with pytest.raises(UpstreamError) as caught:
        await collect(chat)
    message = str(caught.value)
    assert message == "chat upstream rejected the request: 401"
    said = [r for r in caplog.records if getattr(r, "event", None) == "upstream_error"]
    assert said and "invalid_api_key" in str(getattr(said[-1], "detail", ""))
    assert CHAT_KEY not in message
    assert f"{CHAT_KEY[:3]}***{CHAT_KEY[-2:]}" not in message  # OpenAI's masked echo
    assert "***" not in message


async def test_reset_mid_stream_after_deltas(fake: FakeOpenAI, chat: OpenAIChat) -> None:
    fake.chat_faults.append(reset_after(3))
    received: list[str] = []
    with pytest.raises(UpstreamError) as caught:
        async for delta in chat.stream(MESSAGES, max_tokens=512, timeout=5):
            received.append(delta.text)
    assert received == tokenize(DEFAULT_REPLY)[:3]
    assert caught.value.retryable


# Speech


async def test_speech_streams_pcm_incrementally(fake: FakeOpenAI, speech: OpenAISpeech) -> None:
    fake.latency = Latency(tts_first_byte_s=0.02, tts_rtf=0.1)  # 3 s of audio over 0.3 s
    arrivals: list[tuple[float, int]] = []
    async for chunk in speech.synthesize(
        SENTENCE, voice="alloy", speed=1.0, instructions="", timeout=5
    ):
        arrivals.append((time.monotonic(), len(chunk)))
    request = fake.speech_requests[0]
    done = request.first("tts_done")
    assert done is not None
    assert len(arrivals) > 1
    assert arrivals[0][0] < done  # the first audio arrived before the fake finished
    assert sum(n for _, n in arrivals) == expected_pcm_bytes(SENTENCE)
    assert request.body == {
        "model": "gpt-4o-mini-tts",
        "voice": "alloy",
        "input": SENTENCE,
        "response_format": "pcm",
    }  # speed 1.0 and empty instructions are left out for servers that know neither
    assert request.api_key == SPEECH_KEY


async def test_speech_names_its_socket_to_a_hold(fake: FakeOpenAI, speech: OpenAISpeech) -> None:
    fake.latency = Latency(tts_rtf=0.05)  # 3 s of audio over 0.15 s: chunks every millisecond
    hold = ReadHold()
    stream = speech.synthesize(
        SENTENCE, voice="alloy", speed=1.0, instructions="", timeout=5, hold=hold
    )
    async with aclosing(stream) as chunks:
        pcm = [await anext(chunks)]
        holding = asyncio.create_task(hold.hold(0.05))
        await eventually(lambda: hold.held, within=5)  # the response's socket, paused
        await holding
        pcm += [chunk async for chunk in chunks]
    assert b"".join(pcm) == voice_pcm(expected_pcm_bytes(SENTENCE) // 2)  # nothing lost
    await hold.hold(0)  # the stream is over: its socket, pooled, is not its to hold
    assert not hold.held


async def test_speech_sends_speed_and_instructions(fake: FakeOpenAI, speech: OpenAISpeech) -> None:
    pcm = b"".join(await say(speech, speed=1.5, instructions="Speak warmly."))
    body = fake.speech_requests[0].body
    assert body["speed"] == 1.5
    assert body["instructions"] == "Speak warmly."
    assert len(pcm) == expected_pcm_bytes(SENTENCE, 1.5)


async def test_speech_passes_unknown_voices_to_the_upstream(
    fake: FakeOpenAI, speech: OpenAISpeech
) -> None:
    assert speech.validates_voices is False
    async for _ in speech.synthesize("Hi.", voice="af_bella", speed=0, instructions="", timeout=5):
        pass
    assert fake.speech_requests[0].body["voice"] == "af_bella"
    assert "speed" not in fake.speech_requests[0].body  # 0 means the default


async def test_speech_voices_and_attributes(speech: OpenAISpeech) -> None:
    voices = await speech.voices()
    names = [v.name for v in voices]
    assert names[:2] == ["alloy", "ash"] and "marin" in names and "cedar" in names
    assert len(names) == 13
    assert {v.language for v in voices} == {"multilingual"}
    assert (speech.name, speech.sample_rate, speech.default_voice) == ("openai", 24000, "alloy")


SPEECH_FAULTS = [
    (status(429, retry_after=3), UpstreamError, True, 429, 3.0),
    (status(500), UpstreamError, True, 500, None),
    (status(401), UpstreamError, False, 401, None),
    (reset_after(0), UpstreamError, True, None, None),
    (reset_after(2), UpstreamError, True, None, None),
    (malformed(), UpstreamError, False, 200, None),
    (hang(), UpstreamTimeout, True, None, None),
    (slow_first_byte(1.0), UpstreamTimeout, True, None, None),
]


@pytest.mark.parametrize(("fault", "error", "retryable", "code", "retry_after"), SPEECH_FAULTS)
async def test_speech_faults_map_to_service_errors(
    fake: FakeOpenAI,
    speech: OpenAISpeech,
    fault: Fault,
    error: type[VoxrelayError],
    retryable: bool,
    code: int | None,
    retry_after: float | None,
) -> None:
    fake.speech_faults.append(fault)
    with pytest.raises(error) as caught:
        await say(speech, net_timeout=0.3)
    exc = caught.value
    assert type(exc) is error
    assert exc.retryable is retryable
    assert exc.retry_after_s == retry_after
    if isinstance(exc, UpstreamError):
        assert exc.status == code
    assert SPEECH_KEY not in str(exc)
    assert "speech upstream" in str(exc)


async def test_speech_stall_mid_stream_is_a_timeout(fake: FakeOpenAI, speech: OpenAISpeech) -> None:
    fake.latency = Latency(tts_first_byte_s=0.0, tts_rtf=20.0)  # 20 ms of audio every 0.4 s
    with pytest.raises(UpstreamTimeout):
        await say(speech, net_timeout=0.2)


# Cancellation closes the upstream request at once


async def test_aclose_after_first_delta_closes_the_request(
    fake: FakeOpenAI, chat: OpenAIChat, record_property: RecordProperty
) -> None:
    fake.latency = Latency(ttft_s=0.0, token_s=0.05)
    delays = []
    for _ in range(5):
        stream = chat.stream(MESSAGES, max_tokens=512, timeout=5)
        assert (await anext(stream)).text
        closed_at = time.monotonic()
        await stream.aclose()  # type: ignore[attr-defined]
        request = fake.chat_requests[-1]
        await fake.wait_for(gone(request), timeout=1.0)
        assert request.client_gone_at is not None
        delays.append(request.client_gone_at - closed_at)
    record_property("chat_aclose_to_close_ms", [round(d * 1000, 2) for d in delays])
    print(f"\nchat aclose → upstream closed: {[f'{d * 1000:.2f} ms' for d in delays]}")
    assert max(delays) < CLOSE_BUDGET_S
    assert all(r.first("chat_done") is None for r in fake.chat_requests)


async def test_cancel_while_waiting_for_the_first_token(
    fake: FakeOpenAI, chat: OpenAIChat, record_property: RecordProperty
) -> None:
    fake.chat_faults.append(hang())

    async def consume() -> None:
        async for _ in chat.stream(MESSAGES, max_tokens=512, timeout=30):
            pass

    task = asyncio.create_task(consume())
    await fake.wait_for_event("hanging")
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    request = fake.chat_requests[0]
    await fake.wait_for(gone(request), timeout=1.0)
    assert request.client_gone_at is not None
    delay = request.client_gone_at - cancelled_at
    record_property("chat_cancel_before_first_token_ms", round(delay * 1000, 2))
    print(f"\nchat cancel before first token → upstream closed: {delay * 1000:.2f} ms")
    assert delay < CLOSE_BUDGET_S


async def test_cancel_during_time_to_first_token(fake: FakeOpenAI, chat: OpenAIChat) -> None:
    fake.latency = Latency(ttft_s=5.0)  # headers sent, body waits
    task = asyncio.create_task(collect(chat, net_timeout=30))
    await fake.wait_for(lambda: bool(fake.requests) and fake.requests[0].first_byte_at is not None)
    # Aims the cancel at the SDK's body read, which nothing marks; a cancel a little sooner
    # or later must close the request as fast.
    await asyncio.sleep(0.02)
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    request = fake.chat_requests[0]
    await fake.wait_for(gone(request), timeout=1.0)
    assert request.client_gone_at is not None
    assert request.client_gone_at - cancelled_at < CLOSE_BUDGET_S


async def test_speech_aclose_after_first_chunk_closes_the_request(
    fake: FakeOpenAI, speech: OpenAISpeech, record_property: RecordProperty
) -> None:
    fake.latency = Latency(tts_first_byte_s=0.0, tts_rtf=1.0)
    stream = speech.synthesize(SENTENCE, voice="alloy", speed=1.0, instructions="", timeout=5)
    assert await anext(stream)
    closed_at = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    request = fake.speech_requests[0]
    await fake.wait_for(gone(request), timeout=1.0)
    assert request.client_gone_at is not None
    delay = request.client_gone_at - closed_at
    record_property("speech_aclose_to_close_ms", round(delay * 1000, 2))
    print(f"\nspeech aclose → upstream closed: {delay * 1000:.2f} ms")
    assert delay < CLOSE_BUDGET_S
    assert request.first("tts_done") is None


async def test_fifty_cancelled_streams_leak_nothing(
    fake: FakeOpenAI, chat: OpenAIChat, speech: OpenAISpeech
) -> None:
    await collect(chat)  # warm: one idle keep-alive connection each side
    await say(speech, "Hi.")
    await fake.wait_for(lambda: fake.open_connections == 2)
    baseline = (fake.open_connections, pool_size(chat), pool_size(speech))
    tasks_before = len(asyncio.all_tasks())
    fake.latency = Latency(ttft_s=0.0, token_s=0.05, tts_first_byte_s=0.0, tts_rtf=1.0)

    for i in range(50):
        if i % 2:
            stream = chat.stream(MESSAGES, max_tokens=512, timeout=5)
            await anext(stream)
            await stream.aclose()  # type: ignore[attr-defined]
        else:
            task = asyncio.create_task(say(speech))
            await fake.wait_for(lambda: fake.events[-1][1] == "tts_first_byte")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    await fake.wait_for(lambda: sum(r.client_gone_at is not None for r in fake.requests) == 50)
    # Every socket the fake still holds is one the SDK pools still hold, and no more.
    await fake.wait_for(
        lambda: fake.open_connections == pool_size(chat) + pool_size(speech), timeout=2.0
    )
    # Cancelled requests close their connection (the warm idle one too, if they reused it).
    after = (fake.open_connections, pool_size(chat), pool_size(speech))
    print(f"\nafter 50 cancels: (fake open, chat pool, speech pool) = {after}, baseline {baseline}")
    assert all(now <= then for now, then in zip(after, baseline, strict=True)), (after, baseline)
    assert len(asyncio.all_tasks()) <= tasks_before
    assert len(fake.requests) == 52

    # The pools still work after all that.
    fake.latency = Latency.zero()
    assert "".join(d.text for d in (await collect(chat))[:-1]) == DEFAULT_REPLY
    assert b"".join(await say(speech, "Hi.")) != b""


async def test_aclose_closes_the_pool(fake: FakeOpenAI) -> None:
    chat = OpenAIChat(api_key=CHAT_KEY, base_url=fake.base_url, model="m")
    await collect(chat)
    await fake.wait_for(lambda: fake.open_connections == 1)
    await chat.aclose()
    await fake.wait_for(lambda: fake.open_connections == 0, timeout=1.0)
