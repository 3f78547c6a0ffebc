"""Chat mode through a speaking model: both doors → voxrelay → a fake OpenAI Realtime server.

The :class:`FakeRealtime` server stands in for the Realtime API (it refuses any key but
its own); a :class:`FakeOpenAI` stands in for the speech upstream that speak mode still
uses. Assertions read the fakes' own records and event logs (the same ``time.monotonic``
clock as this process); the 100 ms cancel budget is SPEC's and is asserted as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from websockets.asyncio.client import ClientConnection, connect

from fakes.openai_realtime import (
    DEFAULT_REPLY,
    SAMPLE_RATE,
    FakeRealtime,
    Fault,
    Latency,
    close_after,
    error_event,
    expected_pcm_bytes,
    hang,
    malformed,
    reset_after,
    status,
)
from fakes.openai_upstream import FakeOpenAI
from tests.integration.test_grpc import decode_seconds, retry_delay_ms
from tests.servers import running_app
from tests.waiting import eventually
from voxrelay.gateways.app import App
from voxrelay.service import metrics
from voxrelay.service.chunker import SentenceChunker
from voxrelay.service.planner import DEFAULT_SYSTEM_PROMPT
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

REALTIME_KEY = "sk-realtime-5c1e9a7d3b2f48e0a6d4"
TTS_KEY = "sk-speech-8d2f6b0e4a1c97533f1b"
MODEL = "gpt-realtime-2.1-mini"
QUESTION = "How much is a ticket, and how often do trains run?"
CLOSE_BUDGET_S = 0.1  # SPEC: a cancel closes the upstream session within 100 ms
FAST: dict[str, Any] = dict(
    llm_timeout_s=1,
    tts_timeout_s=1,
    breaker_failures=3,
    breaker_cooldown_s=0.5,
    upstream_retries=2,
)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RecordProperty = Callable[[str, object], None]


def sentences(text: str) -> list[str]:
    chunker = SentenceChunker()
    return chunker.feed(text) + chunker.flush()


def assert_segments_match(texts: list[str], reply: str) -> None:
    """The segments are the reply's sentences; the first may be cut short at a word.

    With audio waiting and no sentence complete, the first words become segment 0 so the
    first audio need not wait for the whole first sentence.
    """
    assert texts and reply.startswith(texts[0]) and texts[0]
    assert texts[1:] == sentences(reply.removeprefix(texts[0]))


@dataclass
class Rig:
    """The app, a gRPC stub on it, the Realtime fake and the speech fake."""

    app: App
    stub: pb_grpc.SynthesizerStub
    realtime: FakeRealtime
    tts: FakeOpenAI

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.app.ws_port}/v1/stream"

    async def settled(self) -> None:
        """Wait until no stream is in flight and every upstream session has closed."""
        await eventually(lambda: self.app.runtime.active_streams == 0)
        await self.realtime.wait_for(lambda: self.realtime.open_connections == 0)


@asynccontextmanager
async def rig(
    latency: Latency | None = None, *, reply: Any = DEFAULT_REPLY, **overrides: Any
) -> AsyncIterator[Rig]:
    latency = latency or Latency.zero()
    async with (
        FakeRealtime(latency=latency, reply=reply, api_key=REALTIME_KEY) as realtime,
        FakeOpenAI(latency=latency, api_key=TTS_KEY) as tts,
    ):
        settings: dict[str, Any] = dict(
            llm="realtime",
            tts="openai",
            llm_base_url=realtime.base_url,
            llm_api_key=REALTIME_KEY,
            tts_base_url=tts.base_url,
            tts_api_key=TTS_KEY,
            **FAST,
        )
        settings.update(overrides)
        async with (
            running_app(**settings) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            yield Rig(app, pb_grpc.SynthesizerStub(channel), realtime, tts)


def request(text: str = QUESTION, **fields: Any) -> pb.SynthesizeRequest:
    fields.setdefault("format", pb.AUDIO_FORMAT_PCM)
    return pb.SynthesizeRequest(text=text, **fields)


async def synthesize(stub: pb_grpc.SynthesizerStub, **fields: Any) -> list[pb.SynthesizeResponse]:
    return [r async for r in stub.Synthesize(request(**fields), timeout=30)]


async def fail(stub: pb_grpc.SynthesizerStub) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Synthesize(request(), timeout=30):
            pass
    return caught.value


def kinds(responses: list[pb.SynthesizeResponse]) -> list[str]:
    return [str(r.WhichOneof("event")) for r in responses]


def audio(responses: list[pb.SynthesizeResponse]) -> bytes:
    return b"".join(r.audio.data for r in responses if r.HasField("audio"))


# Chat mode end to end


async def test_chat_mode_over_grpc_speaks_the_transcript_segment_by_segment() -> None:
    async with rig() as r:
        responses = await synthesize(r.stub, request_id="rt-1")

    order = kinds(responses)
    assert order[0] == "started" and order[1] == "segment" and order[-1] == "finished"
    started, finished = responses[0].started, responses[-1].finished
    assert started.request_id == "rt-1"
    assert started.llm_model == started.tts_model == MODEL
    assert started.voice == "alloy" and started.sample_rate_hz == SAMPLE_RATE

    segments = [r.segment for r in responses if r.HasField("segment")]
    assert_segments_match([s.text for s in segments], DEFAULT_REPLY)
    assert [s.index for s in segments] == list(range(len(segments)))
    seqs = [r.audio.seq for r in responses if r.HasField("audio")]
    assert seqs == list(range(len(seqs)))
    # Each segment's audio starts where the one before it ended, with audio for each.
    pcm_before = 0
    for i, response in enumerate(responses):
        if response.HasField("segment"):
            assert response.segment.start_ms == pcm_before // 2 * 1000 // SAMPLE_RATE
            assert responses[i + 1].HasField("audio"), "a segment without its audio"
        elif response.HasField("audio"):
            pcm_before += len(response.audio.data)

    data = audio(responses)
    assert len(data) == expected_pcm_bytes(DEFAULT_REPLY) == finished.audio_bytes
    assert finished.audio_ms == len(data) // 2 * 1000 // SAMPLE_RATE
    assert finished.reply_text == DEFAULT_REPLY
    assert finished.segments == len(segments)
    assert finished.prompt_tokens > 0 and finished.completion_tokens > 0
    assert 0 < finished.llm_first_token_ms <= finished.tts_first_byte_ms
    assert finished.time_to_first_audio_ms >= finished.tts_first_byte_ms

    # What the upstream was asked: one session, the key, the model, PCM 24 kHz, the prompt.
    [session] = r.realtime.sessions
    assert session.api_key == REALTIME_KEY and session.model == MODEL
    output = session.session["audio"]["output"]
    assert output["format"] == {"type": "audio/pcm", "rate": 24000} and output["voice"] == "alloy"
    assert session.session["instructions"] == DEFAULT_SYSTEM_PROMPT
    assert session.session["max_output_tokens"] == 4096
    assert session.conversation[0] == {"role": "user", "content": QUESTION}
    assert not r.tts.requests, "chat mode must not call the speech upstream"


async def test_segment_audio_is_announced_before_it_and_carries_its_index() -> None:
    async with rig(Latency(ttft_s=0.01, token_s=0.002, tts_first_byte_s=0.01, tts_rtf=0.05)) as r:
        responses = await synthesize(r.stub)
    current = -1
    for response in responses:
        if response.HasField("segment"):
            current = response.segment.index
        elif response.HasField("audio"):
            assert response.audio.segment_index == current >= 0


async def test_the_first_audio_leaves_before_the_upstream_has_finished_the_reply() -> None:
    latency = Latency(ttft_s=0.02, token_s=0.03, tts_first_byte_s=0.01, tts_rtf=0.2)
    async with rig(latency) as r:
        first_audio_at = None
        async for response in r.stub.Synthesize(request(), timeout=30):
            if response.HasField("audio") and first_audio_at is None:
                first_audio_at = time.monotonic()
        [response_record] = r.realtime.responses
    assert first_audio_at is not None and response_record.done_at is not None
    assert first_audio_at < response_record.done_at


async def test_instructions_voice_speed_and_history_reach_the_session() -> None:
    async with rig() as r:
        history = [
            pb.ChatMessage(role="user", content="My name is Ada."),
            pb.ChatMessage(role="assistant", content="Hello Ada."),
        ]
        responses = await synthesize(
            r.stub, instructions="Be brief.", voice="marin", speed=1.25, history=history
        )
        assert kinds(responses)[-1] == "finished"
        [session] = r.realtime.sessions
    assert session.session["instructions"] == "Be brief."
    assert session.session["audio"]["output"]["voice"] == "marin"
    assert session.session["audio"]["output"]["speed"] == 1.25
    # (Then the reply, which the upstream adds to the conversation itself.)
    assert session.conversation[:3] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": QUESTION},
    ]
    # The fake speaks faster at 1.25: the audio says so.
    assert len(audio(responses)) == expected_pcm_bytes(DEFAULT_REPLY, 1.25)


async def test_a_speed_the_realtime_model_cannot_do_is_refused() -> None:
    async with rig() as r:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await synthesize(r.stub, speed=2.0)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1.5" in str(caught.value.details())
        assert not r.realtime.sessions


async def test_the_output_cap_reaches_the_session_and_ends_the_reply_there() -> None:
    async with rig(realtime_max_output_tokens=5) as r:
        responses = await synthesize(r.stub)
        [session] = r.realtime.sessions
    assert session.session["max_output_tokens"] == 5
    finished = responses[-1].finished
    assert DEFAULT_REPLY.startswith(finished.reply_text) and finished.reply_text != DEFAULT_REPLY
    assert len(audio(responses)) == expected_pcm_bytes(finished.reply_text)


async def test_speak_mode_still_uses_the_speech_engine() -> None:
    async with rig() as r:
        responses = await synthesize(r.stub, text="Hello world.", mode=pb.MODE_SPEAK)
        assert kinds(responses)[-1] == "finished"
        assert responses[0].started.tts_model == "gpt-4o-mini-tts"
        assert responses[0].started.llm_model == ""
        assert len(r.tts.speech_requests) == 1 and not r.realtime.sessions


@pytest.mark.parametrize(
    ("fmt", "demux", "options"),
    [
        (pb.AUDIO_FORMAT_PCM, "s16le", {"sample_rate": "24000", "ch_layout": "mono"}),
        (pb.AUDIO_FORMAT_WAV, "wav", {}),
        (pb.AUDIO_FORMAT_MP3, "mp3", {}),
        (pb.AUDIO_FORMAT_OPUS, "ogg", {}),
        (pb.AUDIO_FORMAT_FLAC, "flac", {}),
        (pb.AUDIO_FORMAT_AAC, "aac", {}),
        (pb.AUDIO_FORMAT_MULAW, "mulaw", {"sample_rate": "8000", "ch_layout": "mono"}),
        (pb.AUDIO_FORMAT_ALAW, "alaw", {"sample_rate": "8000", "ch_layout": "mono"}),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
async def test_every_format_decodes_to_the_spoken_duration(
    fmt: int, demux: str, options: dict[str, str]
) -> None:
    async with rig() as r:
        responses = await synthesize(r.stub, format=fmt)
    finished = responses[-1].finished
    seconds = decode_seconds(audio(responses), demux, **options)
    spoken = expected_pcm_bytes(DEFAULT_REPLY) / 2 / SAMPLE_RATE
    assert finished.audio_ms == pytest.approx(spoken * 1000, abs=1)
    assert seconds == pytest.approx(spoken, rel=0.05)


# The WebSocket door


async def receive_until_end(ws: ClientConnection) -> list[dict[str, Any] | bytes]:
    frames: list[dict[str, Any] | bytes] = []
    async with asyncio.timeout(30):
        while True:
            message = await ws.recv()
            frame = message if isinstance(message, bytes) else json.loads(message)
            frames.append(frame)
            if isinstance(frame, dict) and frame["type"] in ("finished", "error", "cancelled"):
                return frames


def echo_last_user(conversation: list[dict[str, str]]) -> str:
    """Reply with the conversation so far, so a test can read what the model was told."""
    users = [m["content"] for m in conversation if m["role"] == "user"]
    return f"You said {len(users)} things. The last was {users[-1]}"


async def test_chat_mode_over_websocket_with_memory_and_reset() -> None:
    async with rig(reply=echo_last_user) as r, connect(r.ws_url) as ws:
        await ws.send(json.dumps({"type": "synthesize", "id": "w1", "text": "Apples are red."}))
        first = await receive_until_end(ws)
        await ws.send(json.dumps({"type": "synthesize", "id": "w2", "text": "Pears are green."}))
        second = await receive_until_end(ws)
        await ws.send(json.dumps({"type": "reset"}))
        await ws.send(json.dumps({"type": "synthesize", "id": "w3", "text": "Plums are blue."}))
        third = await receive_until_end(ws)

        for frames in (first, second, third):
            head = frames[0]
            assert isinstance(head, dict) and head["type"] == "started"
            assert head["llm_model"] == head["tts_model"] == MODEL
            assert isinstance(frames[1], dict) and frames[1]["type"] == "segment"
            tail = frames[-1]
            assert isinstance(tail, dict) and tail["type"] == "finished"
            pcm = b"".join(f for f in frames if isinstance(f, bytes))
            assert tail["audio_bytes"] == len(pcm) > 0
            texts = [f["text"] for f in frames if isinstance(f, dict) and f["type"] == "segment"]
            assert_segments_match(texts, tail["reply_text"])
        replies = [frames[-1]["reply_text"] for frames in (first, second, third)]  # type: ignore[index]
        assert replies[0] == "You said 1 things. The last was Apples are red."
        assert replies[1] == "You said 2 things. The last was Pears are green."
        assert replies[2] == "You said 1 things. The last was Plums are blue."
        # The memory was replayed as items: user, assistant, then the new user text.
        assert r.realtime.sessions[1].conversation[:2] == [
            {"role": "user", "content": "Apples are red."},
            {"role": "assistant", "content": replies[0]},
        ]


# Cancellation closes the upstream session at once


@pytest.mark.parametrize("door", ["grpc", "ws"])
@pytest.mark.parametrize("where", ["before the response", "after the first audio"])
async def test_cancel_sends_response_cancel_and_closes_the_session(
    door: str, where: str, record_property: RecordProperty
) -> None:
    latency = Latency(ttft_s=0.05, token_s=0.02, tts_first_byte_s=0.02, tts_rtf=0.5)
    async with rig(latency) as r:
        if where == "before the response":
            r.realtime.response_faults.append(hang())
        if door == "grpc":
            call = r.stub.Synthesize(request(), timeout=30)
            if where == "before the response":
                await r.realtime.wait_for_event("fault:hang")
            else:
                async for response in call:
                    if response.HasField("audio"):
                        break
            cancelled_at = time.monotonic()
            call.cancel()
        else:
            async with connect(r.ws_url) as ws:
                await ws.send(json.dumps({"type": "synthesize", "id": "c1", "text": QUESTION}))
                if where == "before the response":
                    await r.realtime.wait_for_event("fault:hang")
                else:
                    while not isinstance(await ws.recv(), bytes):
                        pass
                cancelled_at = time.monotonic()
                await ws.send(json.dumps({"type": "cancel", "id": "c1"}))
                frames = await receive_until_end(ws)
                assert isinstance(frames[-1], dict) and frames[-1]["type"] == "cancelled"
                # Binary frames sent before the cancel arrived may still be in flight;
                # after the cancelled frame nothing more of the stream may come.
                await ws.send(json.dumps({"type": "synthesize", "id": "c2", "text": "Hi."}))
                after = await receive_until_end(ws)
                assert isinstance(after[0], dict) and after[0]["id"] == "c2"
        await r.realtime.wait_for_event("closed", session=0)
        [session] = r.realtime.sessions[:1]
        assert session.closed_at is not None
        delay = session.closed_at - cancelled_at
        cancel_at = session.responses[0].cancel_received_at if session.responses else None
        print(
            f"\n{door} cancel {where} → response.cancel "
            f"{'-' if cancel_at is None else f'{(cancel_at - cancelled_at) * 1000:.1f} ms'}, "
            f"session closed {delay * 1000:.1f} ms"
        )
        record_property("cancel_to_close_ms", round(delay * 1000, 2))
        assert delay <= CLOSE_BUDGET_S
        assert cancel_at is not None and cancel_at <= session.closed_at
        assert session.close_code == 1000  # closed by us, cleanly
        await r.settled()


async def test_random_cancels_leave_no_session_or_task_behind() -> None:
    latency = Latency(ttft_s=0.004, token_s=0.001, tts_first_byte_s=0.002, tts_rtf=0.02)
    async with rig(latency, reply="Hi there. How are you doing today? Bye for now.") as r:
        await synthesize(r.stub)
        await r.settled()
        baseline = len(asyncio.all_tasks())
        rng = random.Random(20261201)

        async def one() -> str:
            call = r.stub.Synthesize(request(), timeout=rng.choice([30, 0.03, 0.06]))
            stop_after = rng.randint(0, 12)
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for seen, _ in enumerate_async(call):
                    if seen >= stop_after:
                        call.cancel()
                        break
            return str((await call.code()).name)

        outcomes: dict[str, int] = {}
        for _ in range(10):
            for code in await asyncio.gather(*(one() for _ in range(6))):
                outcomes[code] = outcomes.get(code, 0) + 1
        await r.settled()
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: len(asyncio.all_tasks()) <= baseline, within=5)
        print(f"\n60 realtime requests with random cancels: {outcomes}")
        assert set(outcomes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
        assert outcomes.get("CANCELLED", 0) + outcomes.get("DEADLINE_EXCEEDED", 0) > 20
        assert len(asyncio.all_tasks()) <= baseline
        assert r.realtime.open_connections == 0 and r.realtime.responses_active == 0
        assert kinds(await synthesize(r.stub))[-1] == "finished"


async def enumerate_async(call: Any) -> AsyncIterator[tuple[int, Any]]:
    i = 0
    async for item in call:
        yield i, item
        i += 1


# Upstream failures map to typed errors, and the next request is served


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connect_refused_is_upstream_error_and_unavailable() -> None:
    async with rig(llm_base_url=f"http://127.0.0.1:{closed_port()}/v1") as r:
        error = await fail(r.stub)
    assert error.code() == UNAVAILABLE
    assert "realtime upstream connection failed" in str(error.details())


FAULTS: list[tuple[str, str, list[Fault], grpc.StatusCode, str]] = [
    ("handshake 500", "connect", [status(500)] * 3, UNAVAILABLE, "unavailable: 500"),
    ("handshake 401", "connect", [status(401)], UNAVAILABLE, "rejected the request: 401"),
    ("error event", "response", [error_event()] * 3, UNAVAILABLE, "failed: server_error"),
    (
        "invalid request",
        "response",
        [error_event("invalid_request_error", "invalid_value", "Bad voice")],
        UNAVAILABLE,
        "failed: invalid_request_error",
    ),
    ("error mid-response", "response", [error_event(after=3)], UNAVAILABLE, "failed"),
    ("closed mid-response", "response", [close_after(3)], UNAVAILABLE, "closed mid-response"),
    ("reset mid-response", "response", [reset_after(3)], UNAVAILABLE, "closed mid-response"),
    ("malformed event", "response", [malformed()], UNAVAILABLE, "malformed"),
    ("hang", "response", [hang()], grpc.StatusCode.DEADLINE_EXCEEDED, "sent nothing"),
    ("handshake hang", "connect", [hang()], grpc.StatusCode.DEADLINE_EXCEEDED, "sent nothing"),
    ("handshake reset", "connect", [reset_after(0)] * 3, UNAVAILABLE, "during the handshake"),
]


@pytest.mark.parametrize(
    ("name", "phase", "faults", "code", "message"), FAULTS, ids=[f[0] for f in FAULTS]
)
async def test_each_fault_is_a_typed_error_then_a_normal_request_works(
    name: str, phase: str, faults: list[Fault], code: grpc.StatusCode, message: str
) -> None:
    async with rig(breaker_failures=10) as r:  # the breaker has a test of its own
        queue = r.realtime.connect_faults if phase == "connect" else r.realtime.response_faults
        queue.extend(faults)
        error = await fail(r.stub)
        assert error.code() == code, error.details()
        assert message in str(error.details())
        assert REALTIME_KEY not in str(error.details())
        await r.settled()
        assert not len(queue), "the fault was not used as planned (retries?)"
        responses = await synthesize(r.stub)
        assert responses[-1].finished.reply_text == DEFAULT_REPLY


async def test_a_429_at_the_handshake_is_retried_then_reported_with_its_wait() -> None:
    async with rig() as r:
        r.realtime.connect_faults.append(status(429, retry_after=0.05))
        responses = await synthesize(r.stub)  # one retry, honouring Retry-After
        assert kinds(responses)[-1] == "finished"
        assert [s.status for s in r.realtime.sessions] == [429, 101]

        r.realtime.connect_faults.extend(
            [status(429, retry_after=0.05)] * 2 + [status(429, retry_after=7)]
        )
        error = await fail(r.stub)
        assert error.code() == UNAVAILABLE
        assert retry_delay_ms(error) == 7000


async def test_no_retry_after_audio_was_sent() -> None:
    async with rig() as r:
        r.realtime.response_faults.append(close_after(10))  # the first sentence is out
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            received = []
            async for response in r.stub.Synthesize(request(), timeout=30):
                received.append(response)
        assert caught.value.code() == UNAVAILABLE
        assert any(x.HasField("audio") for x in received)
        assert len(r.realtime.sessions) == 1


async def test_the_breaker_opens_for_a_dead_realtime_upstream_and_a_trial_closes_it() -> None:
    async with rig(upstream_retries=0) as r:
        r.realtime.connect_faults.always(status(503))
        for _ in range(3):
            assert (await fail(r.stub)).code() == UNAVAILABLE
        sessions = len(r.realtime.sessions)
        began = time.monotonic()
        error = await fail(r.stub)
        assert time.monotonic() - began < 0.5  # refused at once, not after a timeout
        assert "not calling it" in str(error.details()) and retry_delay_ms(error)
        assert len(r.realtime.sessions) == sessions
        r.realtime.connect_faults.always(None)
        await asyncio.sleep(0.5)  # the cool-down is the behaviour under test
        assert kinds(await synthesize(r.stub))[-1] == "finished"


async def test_realtime_metrics_use_stage_and_provider_realtime() -> None:
    def count(name: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            f"{name}_count", {"stage": "realtime", "provider": "realtime"}
        )
        return value or 0.0

    async with rig() as r:
        before = count("voxrelay_upstream_first_byte_seconds"), count("voxrelay_upstream_seconds")
        await synthesize(r.stub)
        after = count("voxrelay_upstream_first_byte_seconds"), count("voxrelay_upstream_seconds")
    assert after == (before[0] + 1, before[1] + 1)
