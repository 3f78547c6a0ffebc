"""``voxrelay.client`` against the real app on free ports, over both doors.

Each test runs once per door (``via``): the same calls must give the same events and the
same typed errors. Cancels and deadlines are checked where they matter, at the upstream:
a chat upstream (:class:`FakeOpenAI`) that records when voxrelay closed its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import av
import pytest

from fakes.openai_upstream import FakeOpenAI, Latency, hang
from tests.conftest import AppFactory
from tests.servers import running_app
from tests.waiting import eventually
from voxrelay.client import (
    AudioChunk,
    ChatMessage,
    Client,
    ConnectionFailed,
    Event,
    SegmentStarted,
    StreamFinished,
    StreamStarted,
    Via,
)
from voxrelay.gateways.app import App
from voxrelay.service import metrics
from voxrelay.service.errors import InvalidRequest, RateLimited, TooLarge, Unauthorized

TEXT = "Hello world. This is voxrelay, speaking one sentence at a time. Goodbye for now."
WAIT = 30.0  # safety net for every call
VIAS: list[Via] = ["grpc", "ws"]
CHAT_KEY = "sk-client-test-upstream"


def client_of(app: App, via: Via, **options: Any) -> Client:
    port = app.grpc_port if via == "grpc" else app.ws_port
    options.setdefault("timeout", WAIT)
    return Client(f"127.0.0.1:{port}", via=via, **options)


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in events]


def audio_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, AudioChunk))


def decode_seconds(data: bytes, fmt: str) -> float:
    with av.open(io.BytesIO(data), format=fmt) as container:
        samples, rate = 0, 0
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate


def active_streams(via: Via) -> float:
    value = metrics.REGISTRY.get_sample_value("voxrelay_active_streams", {"protocol": via})
    return value or 0.0


@pytest.mark.parametrize("via", VIAS)
async def test_events_in_order_and_the_audio_decodes(app_factory: AppFactory, via: Via) -> None:
    app = await app_factory()
    async with client_of(app, via) as client:
        events = await collect(
            client.synthesize(TEXT, mode="speak", format="mp3", request_id="client-1")
        )
        # The same client (channel, connection) serves the next call.
        again = await collect(client.synthesize("Once more.", mode="speak", format="wav"))
    started, finished = events[0], events[-1]
    assert isinstance(started, StreamStarted) and isinstance(finished, StreamFinished)
    assert started.request_id == "client-1" and started.format == "mp3"
    assert started.voice == "en-us" and started.sample_rate_hz > 0
    assert isinstance(events[1], SegmentStarted), "no audio may precede segment(0)"
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    segment = -1
    for event in events[1:-1]:
        if isinstance(event, SegmentStarted):
            assert event.index == segment + 1
            segment = event.index
        else:
            assert isinstance(event, AudioChunk) and event.segment_index == segment
    texts = [e.text for e in events if isinstance(e, SegmentStarted)]
    assert " ".join(texts) == TEXT and finished.segments == len(texts) == 3
    audio = audio_of(events)
    assert finished.audio_bytes == len(audio)
    assert decode_seconds(audio, "mp3") == pytest.approx(finished.audio_ms / 1000, abs=0.1)
    assert isinstance(again[-1], StreamFinished)
    assert audio_of(again)[:4] == b"RIFF"


@pytest.mark.parametrize("via", VIAS)
async def test_the_server_s_refusals_are_typed_errors(app_factory: AppFactory, via: Via) -> None:
    app = await app_factory(max_input_chars=50, api_keys="k-1", rate_limit_per_min=1)
    async with client_of(app, via, api_key="k-1") as client:
        with pytest.raises(TooLarge, match="limit is 50"):
            await collect(client.synthesize("x" * 51, mode="speak"))
        with pytest.raises(InvalidRequest, match="unknown voice"):
            await collect(client.synthesize("Hi.", voice="nobody"))
        assert isinstance(
            (await collect(client.synthesize("Hi.", mode="speak")))[-1], StreamFinished
        )
        # A second request in the minute (refusals do not count): the wait comes with it.
        with pytest.raises(RateLimited) as limited:
            await collect(client.synthesize("Hi.", mode="speak"))
    assert limited.value.retryable and limited.value.retry_after_s is not None
    assert 0 < limited.value.retry_after_s <= 60


@pytest.mark.parametrize("via", VIAS)
async def test_api_keys(app_factory: AppFactory, via: Via) -> None:
    app = await app_factory(api_keys="k-1")
    async with client_of(app, via, api_key="k-1") as client:
        assert isinstance(
            (await collect(client.synthesize("Hi.", mode="speak")))[-1], StreamFinished
        )
        if via == "grpc":
            assert "en-us" in {v.name for v in await client.voices("en")}
    for key in (None, "wrong"):
        async with client_of(app, via, api_key=key) as client:
            with pytest.raises(Unauthorized):
                await collect(client.synthesize("Hi.", mode="speak"))


@asynccontextmanager
async def slow_chat(**latency: float) -> AsyncIterator[tuple[App, FakeOpenAI]]:
    """The app with a chat upstream that takes its time (espeak still speaks)."""
    timing = Latency(ttft_s=0.0, token_s=0.2, tts_first_byte_s=0.0, tts_rtf=0.0)
    for name, value in latency.items():
        setattr(timing, name, value)
    async with (
        FakeOpenAI(latency=timing, api_key=CHAT_KEY) as chat,
        running_app(llm="openai", llm_base_url=chat.base_url, llm_api_key=CHAT_KEY) as app,
    ):
        yield app, chat


async def upstream_closed(chat: FakeOpenAI) -> None:
    """Return once voxrelay has closed every chat request it made before it ended."""
    await chat.wait_for(
        lambda: (
            bool(chat.chat_requests)
            and all(q.client_gone_at is not None or q.finished_at for q in chat.chat_requests)
        )
    )
    assert any(q.client_gone_at is not None for q in chat.chat_requests)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("how", ["break", "exception", "task cancel"])
async def test_leaving_early_cancels_the_stream_on_the_server(via: Via, how: str) -> None:
    async with slow_chat() as (app, chat), client_of(app, via) as client:
        heard = asyncio.Event()

        async def listen() -> None:
            async for event in client.synthesize("Tell me about the trains."):
                if isinstance(event, AudioChunk):
                    heard.set()
                    if how == "break":
                        break
                    if how == "exception":
                        raise LookupError("the listener gave up")

        task = asyncio.create_task(listen())
        await asyncio.wait_for(heard.wait(), WAIT)
        if how == "task cancel":
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, LookupError):
            await task
        await upstream_closed(chat)
        await eventually(lambda: active_streams(via) == 0)
        # The connection is clean for the next stream (WebSocket: the cancel was answered).
        chat.latency = Latency.zero()
        events = await collect(client.synthesize("Short one.", mode="speak"))
        assert isinstance(events[-1], StreamFinished)


@pytest.mark.parametrize("via", VIAS)
async def test_the_deadline_ends_the_call_and_its_upstream(via: Via) -> None:
    async with slow_chat() as (app, chat), client_of(app, via) as client:
        chat.chat_faults.append(hang())
        with pytest.raises(TimeoutError):
            await collect(client.synthesize("Are you there?", timeout=0.5))
        await upstream_closed(chat)
        await eventually(lambda: active_streams(via) == 0)


@pytest.mark.parametrize("via", VIAS)
async def test_no_server_is_a_connection_failure(via: Via) -> None:
    async with running_app() as app:
        port = app.grpc_port if via == "grpc" else app.ws_port
    async with Client(f"127.0.0.1:{port}", via=via, timeout=WAIT) as client:
        with pytest.raises(ConnectionFailed, match="connection refused"):
            await collect(client.synthesize("Hi."))


async def test_history_goes_over_grpc_only(app_factory: AppFactory) -> None:
    app = await app_factory()
    history = [ChatMessage("user", "My name is Ada."), ChatMessage("assistant", "Hello Ada.")]
    async with client_of(app, "grpc") as client:
        events = await collect(client.synthesize("What is my name?", history=history))
        assert isinstance(events[-1], StreamFinished)
    async with client_of(app, "ws") as client:
        with pytest.raises(InvalidRequest, match="history"):
            await collect(client.synthesize("What is my name?", history=history))
        with pytest.raises(InvalidRequest, match="gRPC"):
            await client.voices()


def test_targets() -> None:
    assert Client("127.0.0.1:1").via == "grpc"
    ws = Client("127.0.0.1:1", via="ws")
    assert (ws.via, ws.target) == ("ws", "ws://127.0.0.1:1/v1/stream")
    assert Client("wss://example.test:1").target == "wss://example.test:1/v1/stream"
    assert Client("ws://h:1/custom").target == "ws://h:1/custom"
    for target, options in (
        ("http://h:1", {}),
        ("ws://h:1", {"via": "grpc"}),
        ("ws://h:1", {"tls": True}),
    ):
        with pytest.raises(ValueError):
            Client(target, **options)
    with pytest.raises(InvalidRequest, match="mode must be one of chat, speak"):
        Client("127.0.0.1:1").synthesize("Hi.", mode="sing")


@pytest.mark.parametrize("via", VIAS)
async def test_an_interrupted_stream_says_what_was_heard(app_factory: AppFactory, via: Via) -> None:
    app = await app_factory()
    text = "One two three four five. " * 20
    async with client_of(app, via) as client:
        events = client.synthesize(text, mode="speak", format="pcm", word_timestamps=True)
        segments: list[SegmentStarted] = []
        async for event in events:
            if isinstance(event, SegmentStarted):
                segments.append(event)
                if len(segments) == 2:  # the first segment's audio and words are in
                    break
        heard = await events.interrupt(played_ms=10_000_000)
        assert heard.startswith(segments[0].text) and text.startswith(heard)
        assert len(heard) < len(text)
        # The connection (or channel) serves the next call.
        assert isinstance(
            (await collect(client.synthesize("Hi.", mode="speak")))[-1], StreamFinished
        )
    await eventually(lambda: app.runtime.active_streams == 0)
