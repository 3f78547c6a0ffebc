"""The fake OpenAI upstream, checked with the real SDK and a raw HTTP client."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from fakes.openai_upstream import (
    CHUNK_MS,
    DEFAULT_REPLY,
    SAMPLE_RATE,
    FakeOpenAI,
    Latency,
    expected_pcm_bytes,
    hang,
    malformed,
    reset_after,
    slow_first_byte,
    status,
    tokenize,
)

ROOT = Path(__file__).resolve().parents[2]
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How much is a ticket?"},
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(latency=Latency.zero()) as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(api_key="sk-unit-test-key", base_url=fake.base_url, max_retries=0)
    yield sdk
    await sdk.close()


async def chat(client: openai.AsyncOpenAI, **options: object) -> list[object]:
    create: Any = client.chat.completions.create  # options vary per test
    stream = await create(model="gpt-4o-mini", messages=MESSAGES, stream=True, **options)
    async with stream:
        return [chunk async for chunk in stream]


async def speak(client: openai.AsyncOpenAI, text: str, **options: object) -> list[bytes]:
    async with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="alloy",
        input=text,
        response_format="pcm",
        **options,  # type: ignore[arg-type]
    ) as response:
        return [chunk async for chunk in response.iter_bytes()]


# The reply and its tokens


def test_tokens_concatenate_to_the_text_and_split_inside_prices() -> None:
    for text in (DEFAULT_REPLY, "  leading and trailing  ", "a.b,c!!", "", "\n\nx"):
        assert "".join(tokenize(text)) == text
    tokens = tokenize(DEFAULT_REPLY)
    i = tokens.index(" $3.")
    assert tokens[i + 1] == "50"


async def test_sse_stream_has_the_shape_of_the_real_api(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    chunks = await chat(client, stream_options={"include_usage": True})
    first, *content, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"  # type: ignore[attr-defined]
    assert "".join(c.choices[0].delta.content for c in content) == DEFAULT_REPLY  # type: ignore[attr-defined]
    assert len(content) == len(tokenize(DEFAULT_REPLY))
    assert finish.choices[0].finish_reason == "stop"  # type: ignore[attr-defined]
    assert usage.choices == []  # type: ignore[attr-defined]
    assert usage.usage.completion_tokens == len(content)  # type: ignore[attr-defined]
    assert usage.usage.prompt_tokens == len(tokenize("Be brief.")) + len(  # type: ignore[attr-defined]
        tokenize("How much is a ticket?")
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)  # type: ignore[attr-defined]
    request = fake.chat_requests[0]
    assert request.body["stream"] is True
    assert request.api_key == "sk-unit-test-key"
    assert [kind for _, kind in request.events][-1] == "chat_done"


async def test_wire_format_is_chunked_sse_ending_in_done(fake: FakeOpenAI) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 3}
    async with (
        httpx2.AsyncClient() as raw,
        raw.stream("POST", f"{fake.base_url}/chat/completions", json=body) as response,
    ):
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[1][6:])  # not asked for
    assert len(lines) == 1 + 3 + 1 + 1  # role, three tokens, finish, [DONE]


async def test_max_tokens_cuts_the_reply(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    chunks = await chat(client, max_tokens=4, stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # type: ignore[attr-defined]
    assert text == "".join(tokenize(DEFAULT_REPLY)[:4])
    assert chunks[-2].choices[0].finish_reason == "length"  # type: ignore[attr-defined]
    assert chunks[-1].usage.completion_tokens == 4  # type: ignore[attr-defined]


async def test_reply_can_follow_the_request(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.reply = lambda messages: f"You said: {messages[-1]['content']}"
    chunks = await chat(client)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # type: ignore[attr-defined]
    assert text == "You said: How much is a ticket?"


async def test_non_streamed_completion(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.content == DEFAULT_REPLY


async def test_keep_alive_reuses_one_connection(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    for _ in range(3):
        await chat(client)
    await speak(client, "Hi.")
    assert len(fake.requests) == 4
    assert fake.connections_total == 1


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert "gpt-4o-mini" in models


# Speech


async def test_speech_length_follows_the_text(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    text = "Hello there, how are you?"
    pcm = b"".join(await speak(client, text))
    assert len(pcm) == expected_pcm_bytes(text) == round(len(text) * 0.060 * SAMPLE_RATE) * 2
    fast = b"".join(await speak(client, text, speed=2.0))
    assert len(fast) == expected_pcm_bytes(text, 2.0) == pytest.approx(len(pcm) / 2, abs=2)
    samples = array("h", pcm)
    rms = math.sqrt(sum(s * s for s in samples) / len(samples))
    assert 1000 < rms < 20000  # a voice-like level, never silence
    chunks = [k for _, k in fake.speech_requests[0].events if k.startswith("tts_")]
    per_chunk = SAMPLE_RATE * CHUNK_MS // 1000 * 2
    assert chunks[0] == "tts_first_byte" and chunks[-1] == "tts_done"
    assert len(chunks) - 1 == math.ceil(len(pcm) / per_chunk)


async def test_speech_can_start_with_silence() -> None:
    async with FakeOpenAI(latency=Latency.zero(), leading_silence_ms=150) as server:
        sdk = openai.AsyncOpenAI(api_key="sk-unit-test-key", base_url=server.base_url)
        try:
            pcm = b"".join(await speak(sdk, "Hello there."))
        finally:
            await sdk.close()
    silence = SAMPLE_RATE * 150 // 1000 * 2
    assert pcm[:silence] == bytes(silence)
    assert len(pcm) == silence + expected_pcm_bytes("Hello there.")
    assert max(array("h", pcm[silence : silence + 480])) > 184


async def test_speech_is_the_same_every_time(client: openai.AsyncOpenAI) -> None:
    assert await speak(client, "Same.") == await speak(client, "Same.")


async def test_speech_refuses_other_formats(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="pcm"):
        await client.audio.speech.create(model="m", voice="alloy", input="Hi.")
    assert fake.speech_requests[0].status == 400


async def test_speech_is_paced_by_the_real_time_factor(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.latency = Latency(tts_first_byte_s=0.05, tts_rtf=0.5)
    text = "x" * 10  # 600 ms of audio → 300 ms of sending after the first byte
    started = time.monotonic()
    await speak(client, text)
    elapsed = time.monotonic() - started
    assert 0.05 + 0.3 - 0.03 <= elapsed < 0.05 + 0.3 + 0.25
    request = fake.speech_requests[0]
    first = request.first("tts_first_byte")
    assert first is not None and first - request.started_at >= 0.05


async def test_chat_is_paced_by_the_latency_model(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.latency = Latency(ttft_s=0.1, token_s=0.01)
    await chat(client, max_tokens=6)
    request = fake.chat_requests[0]
    first, done = request.first("chat_first_token"), request.first("chat_done")
    assert first is not None and done is not None
    assert first - request.started_at >= 0.1
    assert done - first >= 5 * 0.01


# Faults


async def test_429_carries_retry_after_and_an_openai_error_body(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.chat_faults.append(status(429, retry_after=2, retry_after_ms=1500))
    with pytest.raises(openai.RateLimitError) as caught:
        await chat(client)
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.headers["retry-after-ms"] == "1500"
    assert caught.value.code == "rate_limit_exceeded"
    await chat(client)  # a queued fault is used once


@pytest.mark.parametrize(
    ("code", "error"),
    [(500, openai.InternalServerError), (401, openai.AuthenticationError)],
)
async def test_status_faults(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, code: int, error: type[Exception]
) -> None:
    fake.speech_faults.append(status(code))
    with pytest.raises(error):
        await speak(client, "Hi.")
    assert fake.speech_requests[0].status == code


async def test_401_echoes_a_masked_key_like_openai(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.api_key = "sk-the-right-one"
    with pytest.raises(openai.AuthenticationError, match=r"sk-\*\*\*ey"):
        await chat(client)


async def test_sticky_fault_until_cleared(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.chat_faults.always(status(503))
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            await chat(client)
    fake.chat_faults.clear()
    await chat(client)


async def test_reset_after_n_tokens(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.chat_faults.append(reset_after(3))
    seen: list[str] = []
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async with stream:
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "".join(tokenize(DEFAULT_REPLY)[:3])
    request = fake.chat_requests[0]
    assert request.first("reset") is not None
    assert request.client_gone_at is None  # the server hung up, not the client


async def test_reset_after_n_audio_chunks(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.speech_faults.append(reset_after(2))
    received = bytearray()
    with pytest.raises(httpx2.TransportError):
        async with client.audio.speech.with_streaming_response.create(
            model="m", voice="alloy", input="A long sentence to speak.", response_format="pcm"
        ) as response:
            async for chunk in response.iter_bytes():
                received += chunk
    assert len(received) == 2 * SAMPLE_RATE * CHUNK_MS // 1000 * 2


async def test_hang_until_the_client_gives_up(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.chat_faults.append(hang())
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True, timeout=0.2)
    request = fake.chat_requests[0]
    await fake.wait_for(lambda: request.client_gone_at is not None)
    assert request.first_byte_at is None


async def test_malformed_chat_frame(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.chat_faults.append(malformed())
    with pytest.raises(json.JSONDecodeError):
        await chat(client)


async def test_malformed_speech_is_not_audio(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.speech_faults.append(malformed())
    async with client.audio.speech.with_streaming_response.create(
        model="m", voice="alloy", input="Hi.", response_format="pcm"
    ) as response:
        assert response.headers["content-type"].startswith("text/html")
        assert b"<html>" in await response.read()


async def test_slow_first_byte(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.chat_faults.append(slow_first_byte(0.15))
    await chat(client)
    request = fake.chat_requests[0]
    assert request.first_byte_at is not None
    assert request.first_byte_at - request.started_at >= 0.15
    fake.speech_faults.append(slow_first_byte(1.0))
    with pytest.raises(openai.APITimeoutError):
        await client.audio.speech.create(
            model="m", voice="alloy", input="Hi.", response_format="pcm", timeout=0.1
        )


# Noticing the client leave


async def test_client_gone_is_recorded_promptly(fake: FakeOpenAI) -> None:
    fake.latency = Latency(ttft_s=0.0, token_s=0.05)
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with httpx2.AsyncClient() as raw:
        async with raw.stream("POST", f"{fake.base_url}/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                break
            closed_at = time.monotonic()
        request = fake.chat_requests[0]
        await fake.wait_for(lambda: request.client_gone_at is not None, timeout=1.0)
    assert request.client_gone_at is not None
    assert request.client_gone_at - closed_at < 0.1
    assert request.first("chat_done") is None  # it stopped writing
    await fake.wait_for(lambda: fake.open_connections == 0)


async def test_idle_keep_alive_close_is_not_client_gone(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    await chat(client)
    await client.close()
    await fake.wait_for(lambda: fake.open_connections == 0)
    assert fake.chat_requests[0].client_gone_at is None


async def test_wait_for_times_out_with_a_clear_error(fake: FakeOpenAI) -> None:
    with pytest.raises(TimeoutError, match=r"0\.05"):
        await fake.wait_for(lambda: False, timeout=0.05)


# Command line


def test_cli_serves_until_interrupted() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-m", "fakes.openai_upstream", "--port", "0", "--ttft-ms", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().split()[4]
            assert base_url.startswith("http://127.0.0.1:")
            reply = httpx2.get(f"{base_url}/models", timeout=5)
            assert reply.status_code == 200
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0
