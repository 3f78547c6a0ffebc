"""Chat mode over the OpenAI providers, end to end: gRPC client → voxrelay → fake OpenAI.

Two :class:`FakeOpenAI` servers stand in for the chat and the speech upstream, each
refusing any key but its own, so every test also checks that each stage's URL and key
reach the right upstream. Timing assertions read the fakes' own event logs (the same
``time.monotonic`` clock as this process) rather than wall-clock thresholds, except
where a time budget is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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
)
from tests.servers import running_app
from tests.waiting import eventually
from voxrelay.gateways.app import App
from voxrelay.service.logs import JsonFormatter
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

CHAT_KEY = "sk-chat-7f3a9c2e5b1d40866e1f"
TTS_KEY = "sk-speech-2b8e6d4f0a9c13755d0e"
QUESTION = "How much is a ticket, and how often do trains run?"
#: DEFAULT_REPLY cut where a listener hears a sentence end ("$3.50" stays whole).
SENTENCES = re.split(r"(?<=[.!?]) ", DEFAULT_REPLY)
#: What the speech upstream is given: the sentences made speakable.
SPOKEN = [
    s.replace("$3.50", "three dollars fifty").replace("12 minutes", "twelve minutes")
    for s in SENTENCES
]
CLOSE_BUDGET_S = 0.1  # SPEC: upstream requests closed within 100 ms of a cancel
#: Small budgets so failures surface fast.
FAST: dict[str, Any] = dict(
    llm_timeout_s=1,
    tts_timeout_s=1,
    breaker_failures=3,
    breaker_cooldown_s=0.5,
    upstream_retries=2,
)
RecordProperty = Callable[[str, object], None]


@dataclass
class Rig:
    """The app, a gRPC stub on it, and its two upstreams."""

    app: App
    stub: pb_grpc.SynthesizerStub
    chat: FakeOpenAI
    tts: FakeOpenAI

    @property
    def upstream_requests(self) -> list[RecordedRequest]:
        return self.chat.requests + self.tts.requests

    async def settled(self) -> None:
        """Wait until no stream is in flight and both fakes have ended every response."""
        await eventually(lambda: self.app.runtime.active_streams == 0)
        for fake in (self.chat, self.tts):
            await fake.wait_for(lambda f=fake: all(r.finished_at is not None for r in f.requests))


@asynccontextmanager
async def rig(
    latency: Latency | None = None, *, reply: str = DEFAULT_REPLY, **overrides: Any
) -> AsyncIterator[Rig]:
    """Start both fakes and the app wired to them, with FAST budgets unless overridden."""
    latency = latency or Latency.zero()
    async with (
        FakeOpenAI(latency=latency, reply=reply, api_key=CHAT_KEY) as chat,
        FakeOpenAI(latency=latency, api_key=TTS_KEY) as tts,
    ):
        settings: dict[str, Any] = dict(
            llm="openai",
            tts="openai",
            llm_base_url=chat.base_url,
            llm_api_key=CHAT_KEY,
            tts_base_url=tts.base_url,
            tts_api_key=TTS_KEY,
            **FAST,
        )
        settings.update(overrides)
        async with (
            running_app(**settings) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            yield Rig(app, pb_grpc.SynthesizerStub(channel), chat, tts)


def request(text: str = QUESTION, *, speak: bool = False) -> pb.SynthesizeRequest:
    mode = pb.MODE_SPEAK if speak else pb.MODE_CHAT
    return pb.SynthesizeRequest(text=text, mode=mode, format=pb.AUDIO_FORMAT_PCM)


async def synthesize(
    stub: pb_grpc.SynthesizerStub, text: str = QUESTION, *, speak: bool = False
) -> list[pb.SynthesizeResponse]:
    return [r async for r in stub.Synthesize(request(text, speak=speak), timeout=30)]


async def fail(
    stub: pb_grpc.SynthesizerStub, text: str = QUESTION, *, speak: bool = False
) -> tuple[grpc.aio.AioRpcError, list[pb.SynthesizeResponse]]:
    """Run a request that must fail; return its error and what arrived before it."""
    received: list[pb.SynthesizeResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in stub.Synthesize(request(text, speak=speak), timeout=30):
            received.append(response)
    return caught.value, received


def retry_delay_ms(error: grpc.aio.AioRpcError) -> int | None:
    status_proto = rpc_status.from_call(error)
    if status_proto is None:
        return None
    for detail in status_proto.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return int(info.retry_delay.ToMilliseconds())
    return None


def audio_of(responses: list[pb.SynthesizeResponse]) -> bytes:
    return b"".join(r.audio.data for r in responses if r.HasField("audio"))


def completed(responses: list[pb.SynthesizeResponse]) -> bool:
    return bool(responses) and responses[-1].HasField("finished")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# Chat mode end to end


async def test_chat_mode_speaks_the_reply_while_it_is_written(
    record_property: RecordProperty,
) -> None:
    latency = Latency()  # the fake's defaults: 200 ms to the first token, 20 ms a token, …
    async with rig(latency) as r:
        # The first request of a process pays for the SDK's lazy imports and new
        # connections; the second shows the steady state. Both must pipeline.
        for run in ("cold", "warm"):
            responses: list[pb.SynthesizeResponse] = []
            first_audio_at: float | None = None
            chat_done_before_first_audio = True
            sent_at = time.monotonic()
            async for response in r.stub.Synthesize(request(), timeout=30):
                if response.HasField("audio") and first_audio_at is None:
                    first_audio_at = time.monotonic()
                    chat_done_before_first_audio = (
                        r.chat.chat_requests[-1].first("chat_done") is not None
                    )
                responses.append(response)

            assert first_audio_at is not None
            chat = r.chat.chat_requests[-1]
            speech = [q for q in r.tts.speech_requests if q.started_at > sent_at]
            chat_done = chat.first("chat_done")
            assert chat_done is not None
            # The first audio reached the client while the fake was still streaming the reply.
            assert not chat_done_before_first_audio
            assert first_audio_at < chat_done
            check_reply(responses, chat, speech)
            report_ttfa(
                run,
                latency,
                responses[-1].finished,
                chat,
                speech[0],
                sent_at,
                first_audio_at,
                record_property,
            )


def check_reply(
    responses: list[pb.SynthesizeResponse], chat: RecordedRequest, speech: list[RecordedRequest]
) -> None:
    """Check a chat-mode stream of DEFAULT_REPLY against what the fakes were asked and sent."""
    started, finished = responses[0].started, responses[-1].finished
    assert started.llm_model == "gpt-4o-mini" and started.tts_model == "gpt-4o-mini-tts"
    segments = [r.segment for r in responses if r.HasField("segment")]
    assert [s.text for s in segments] == SENTENCES
    assert [q.body["input"] for q in speech] == SPOKEN
    assert finished.reply_text == DEFAULT_REPLY
    assert finished.segments == len(SENTENCES)

    # Each segment's audio is the speech upstream's PCM for it, whole and in order.
    per_segment = [b""] * len(SENTENCES)
    for response in responses:
        if response.HasField("audio"):
            per_segment[response.audio.segment_index] += response.audio.data
    assert [len(a) for a in per_segment] == [expected_pcm_bytes(s) for s in SPOKEN]
    assert finished.audio_bytes == sum(len(a) for a in per_segment)

    # Usage as the upstream reported it.
    sent_messages = chat.body["messages"]
    assert sent_messages[-1] == {"role": "user", "content": QUESTION}
    assert finished.prompt_tokens == sum(len(tokenize(m["content"])) for m in sent_messages)
    assert finished.completion_tokens == len(tokenize(DEFAULT_REPLY))
    assert chat.body["max_tokens"] == 512 and chat.body["stream"] is True


def report_ttfa(
    run: str,
    latency: Latency,
    finished: pb.StreamFinished,
    chat: RecordedRequest,
    speech: RecordedRequest,
    sent_at: float,
    first_audio_at: float,
    record_property: RecordProperty,
) -> None:
    """Print time to first audio against the least the fake allows, and where it went.

    The floor: the first sentence's tokens (the chunker also needs the next token to be
    sure the sentence ended) plus the speech upstream's first byte.
    """
    first_tokens = len(tokenize(SENTENCES[0]))
    floor = latency.ttft_s + first_tokens * latency.token_s + latency.tts_first_byte_s
    client_ttfa = first_audio_at - sent_at
    tts_first_byte = speech.first("tts_first_byte")
    assert tts_first_byte is not None and tts_first_byte < first_audio_at
    record_property(f"ttfa_{run}_client_ms", round(client_ttfa * 1000, 1))
    record_property(f"ttfa_{run}_server_ms", finished.time_to_first_audio_ms)
    record_property("ttfa_fake_floor_ms", round(floor * 1000, 1))
    token_times = [at for at, kind in chat.events if kind.startswith("chat_") and "token" in kind]
    steps = {
        "chat request received": chat.started_at,
        "first token sent": token_times[0],
        f"token {first_tokens + 1} sent (sentence 0 certain)": token_times[first_tokens],
        "speech request received": speech.started_at,
        "speech first byte sent": tts_first_byte,
    }
    print(
        f"\nchat mode ({run}), default Latency: time to first audio {ms(client_ttfa)} at the"
        f" client, {finished.time_to_first_audio_ms} ms reported; the fake's floor is"
        f" {ms(floor)} (ttft {ms(latency.ttft_s)} + {first_tokens} × {ms(latency.token_s)}"
        f" + TTS first byte {ms(latency.tts_first_byte_s)}): {ms(client_ttfa - floor)} over it"
        "\n  on the fakes' clock from the send: "
        + "; ".join(f"{name} {ms(at - sent_at)}" for name, at in steps.items())
    )


@pytest.mark.parametrize("lookahead", [1, 2, 3])
async def test_next_segment_is_synthesised_while_one_streams(lookahead: int) -> None:
    # Speech slow enough that `lookahead` segments are surely in flight at once.
    rtf = 0.1 if lookahead == 1 else 0.3
    latency = Latency(ttft_s=0.05, token_s=0.01, tts_first_byte_s=0.05, tts_rtf=rtf)
    async with rig(latency, lookahead_segments=lookahead) as r:
        assert completed(await synthesize(r.stub))
    speech = r.tts.speech_requests
    assert [q.body["input"] for q in speech] == SPOKEN
    ended = [q.first("tts_done") for q in speech]
    assert all(at is not None for at in ended)
    if lookahead >= 2:
        assert speech[1].started_at < (ended[0] or 0)
    else:
        assert speech[1].started_at > (ended[0] or 0)
    # Never more than `lookahead` speech requests at once, and exactly that many at times.
    overlap = max(
        sum(1 for other in speech if other.started_at <= q.started_at < (other.finished_at or 0))
        for q in speech
    )
    assert overlap == lookahead


# Faults: a typed error each, and the service goes on


@dataclass(frozen=True)
class FaultCase:
    faults: list[Fault]
    code: grpc.StatusCode
    calls: int  # upstream requests the failing stream makes
    retry_delay_ms: int | None = None


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
FAULTS = {
    "429 outlasting the retries": FaultCase(
        [status(429, retry_after=0.05)] * 3, UNAVAILABLE, 3, 50
    ),
    "429 waiting past the budget": FaultCase([status(429, retry_after=5)], UNAVAILABLE, 1, 5000),
    "429 retry-after-ms": FaultCase([status(429, retry_after_ms=80)] * 3, UNAVAILABLE, 3, 80),
    "500 every try": FaultCase([status(500)] * 3, UNAVAILABLE, 3),
    "reset before any byte": FaultCase([reset_after(0)] * 3, UNAVAILABLE, 3),
    "reset after the first bytes": FaultCase([reset_after(9)], UNAVAILABLE, 1),
    "malformed": FaultCase([malformed()], UNAVAILABLE, 1),
    "refused (400)": FaultCase([status(400, message="bad request")], UNAVAILABLE, 1),
    "hang": FaultCase([hang()], DEADLINE, 1),
    "slow first byte": FaultCase([slow_first_byte(3)], DEADLINE, 1),
}
ONE_SENTENCE = "Trains leave every twelve minutes until midnight."


@pytest.mark.parametrize("stage", ["chat", "speech"])
@pytest.mark.parametrize("name", list(FAULTS))
async def test_each_fault_gives_its_typed_error_and_the_next_request_succeeds(
    stage: str, name: str
) -> None:
    case = FAULTS[name]
    async with rig(breaker_failures=0) as r:
        fake = r.chat if stage == "chat" else r.tts
        faults = r.chat.chat_faults if stage == "chat" else r.tts.speech_faults
        faults.extend(case.faults)
        # Chat faults in chat mode; speech faults on one spoken sentence (one TTS call).
        speak = stage == "speech"
        error, received = await fail(r.stub, ONE_SENTENCE if speak else QUESTION, speak=speak)

        assert error.code() == case.code, error.details()
        assert f"{stage} upstream" in (error.details() or "")
        assert retry_delay_ms(error) == case.retry_delay_ms
        assert len(fake.requests) == case.calls
        assert received[0].HasField("started")
        assert not any(r.HasField("finished") for r in received)
        await r.settled()
        assert all(q.fault is not None for q in fake.requests)

        # The next normal request is served in full.
        before = len(fake.requests)
        responses = await synthesize(r.stub, ONE_SENTENCE if speak else QUESTION, speak=speak)
        assert completed(responses)
        assert len(fake.requests) == before + 1


@pytest.mark.parametrize("stage", ["chat", "speech"])
async def test_the_first_byte_budget_includes_retries(stage: str) -> None:
    async with rig() as r:  # a budget of 1 s per stage
        fake = r.chat if stage == "chat" else r.tts
        faults = r.chat.chat_faults if stage == "chat" else r.tts.speech_faults
        faults.extend([status(503, retry_after=0.4), hang()])
        loop = asyncio.get_running_loop()
        began = loop.time()
        error, _ = await fail(r.stub, ONE_SENTENCE, speak=stage == "speech")
        elapsed = loop.time() - began
        await r.settled()
        first, second = fake.requests
        timeline = [(round(at - began, 3), kind) for at, kind, _ in fake.events]
        assert error.code() == DEADLINE, (error.details(), timeline)
        assert f"{stage} upstream" in (error.details() or "")
        assert second.started_at - first.started_at >= 0.4
        # Closed 1 s after the first call began, not 1 s after the retry (0.4 s in).
        assert second.client_gone_at is not None
        assert second.client_gone_at - first.started_at < 1.1, (error.details(), timeline)
        assert 1.0 <= elapsed < 2.0, (error.details(), timeline)


async def test_a_stall_mid_audio_is_deadline_exceeded() -> None:
    async with rig(tts_timeout_s=0.3) as r:
        r.tts.latency = Latency(tts_first_byte_s=0, tts_rtf=50.0)  # 20 ms of audio a second
        error, received = await fail(r.stub, ONE_SENTENCE, speak=True)
        assert error.code() == DEADLINE
        assert "speech upstream" in (error.details() or "")
        assert audio_of(received)  # it had started speaking
        await r.settled()
        assert len(r.tts.speech_requests) == 1  # audio had been sent: no retry


async def test_a_later_segment_failing_ends_the_stream_after_the_audio_before_it() -> None:
    latency = Latency(ttft_s=0.02, token_s=0.01, tts_first_byte_s=0.02, tts_rtf=0.05)
    reply = " ".join(SENTENCES[:3])
    async with rig(latency, reply=reply, breaker_failures=0) as r:
        # Segments 0 and 1 are spoken; the last one, segment 2, fails on every try.
        r.tts.speech_faults.extend([slow_first_byte(0)] * 2)
        r.tts.speech_faults.always(status(500))
        error, received = await fail(r.stub)
        r.tts.speech_faults.clear()
        assert error.code() == UNAVAILABLE
        assert "speech upstream" in (error.details() or "")
        first = b"".join(
            x.audio.data for x in received if x.HasField("audio") and x.audio.segment_index == 0
        )
        assert len(first) == expected_pcm_bytes(SENTENCES[0])
        await r.settled()
        inputs = [q.body["input"] for q in r.tts.speech_requests]
        assert inputs == SPOKEN[:3] + [SPOKEN[2]] * 2
        [chat] = r.chat.requests
        assert chat.finished_at is not None  # done or closed: nothing left streaming
        responses = await synthesize(r.stub)
        assert completed(responses) and responses[-1].finished.reply_text == reply


# Retries: before a segment's first audio byte only


@pytest.mark.parametrize(
    ("fault", "least_wait_s"),
    [
        (status(429, retry_after=0.3), 0.3),
        (status(503, retry_after_ms=250), 0.25),
        (status(500), 0.0),  # jittered backoff
        (reset_after(0), 0.0),
    ],
    ids=["retry-after", "retry-after-ms", "500", "reset"],
)
@pytest.mark.parametrize("stage", ["chat", "speech"])
async def test_a_failure_before_the_first_byte_is_retried_unseen(
    stage: str, fault: Fault, least_wait_s: float
) -> None:
    async with rig() as r:
        fake = r.chat if stage == "chat" else r.tts
        (r.chat.chat_faults if stage == "chat" else r.tts.speech_faults).append(fault)
        responses = await synthesize(r.stub, ONE_SENTENCE, speak=stage == "speech")
        assert completed(responses)
        first, second = fake.requests[:2]
        assert first.fault == fault and second.fault is None
        assert second.body == first.body
        assert first.finished_at is not None
        assert least_wait_s <= second.started_at - first.finished_at < least_wait_s + 0.5
    if stage == "speech":
        assert len(audio_of(responses)) == expected_pcm_bytes(ONE_SENTENCE)
    else:
        assert responses[-1].finished.reply_text == DEFAULT_REPLY


# The circuit breaker


async def test_breaker_opens_answers_fast_and_closes_after_a_good_trial() -> None:
    async with rig(upstream_retries=0, breaker_failures=3, breaker_cooldown_s=0.5) as r:
        r.chat.chat_faults.extend([status(500)] * 3)
        for _ in range(3):
            error, _ = await fail(r.stub)
            assert error.code() == UNAVAILABLE and "chat upstream" in (error.details() or "")
        assert len(r.chat.requests) == 3

        # Open: refused at once, the upstream is not called, the wait is the cool-down left.
        loop = asyncio.get_running_loop()
        began = loop.time()
        error, _ = await fail(r.stub)
        fast = loop.time() - began
        assert error.code() == UNAVAILABLE
        assert "failing" in (error.details() or "")
        delay = retry_delay_ms(error)
        assert delay is not None and 0 < delay <= 500
        assert len(r.chat.requests) == 3
        assert fast < 0.2
        # Speak mode does not need the chat upstream: it goes on working.
        assert completed(await synthesize(r.stub, ONE_SENTENCE, speak=True))

        # After the cool-down one trial goes through; its success closes the breaker.
        await asyncio.sleep(delay / 1000 + 0.05)  # the cool-down is the behaviour under test
        assert completed(await synthesize(r.stub))
        assert completed(await synthesize(r.stub))
        assert len(r.chat.requests) == 5


async def test_breaker_reopens_when_the_trial_fails() -> None:
    async with rig(upstream_retries=0, breaker_failures=2, breaker_cooldown_s=0.3) as r:
        r.tts.speech_faults.extend([status(502)] * 3)
        for _ in range(2):
            error, _ = await fail(r.stub, ONE_SENTENCE, speak=True)
            assert error.code() == UNAVAILABLE
        error, _ = await fail(r.stub, ONE_SENTENCE, speak=True)
        delay = retry_delay_ms(error)
        assert delay is not None
        assert len(r.tts.requests) == 2
        await asyncio.sleep(delay / 1000 + 0.05)  # the cool-down is the behaviour under test
        error, _ = await fail(r.stub, ONE_SENTENCE, speak=True)  # the trial: a 502
        assert "speech upstream is unavailable: 502" in (error.details() or "")
        error, _ = await fail(r.stub, ONE_SENTENCE, speak=True)  # open again
        delay = retry_delay_ms(error)
        assert delay is not None and delay > 200
        assert len(r.tts.requests) == 3
        await asyncio.sleep(delay / 1000 + 0.05)  # the cool-down is the behaviour under test
        assert completed(await synthesize(r.stub, ONE_SENTENCE, speak=True))


# Cancellation closes the upstream requests at once


CANCEL_POINTS = [
    "before the response headers",
    "before the first token",
    "after the first audio",
    "between segments",
    "at the client's deadline",
]
DEADLINE_S = 0.4
SEED = 20240611


@pytest.mark.parametrize("where", CANCEL_POINTS)
async def test_cancel_closes_the_upstream_requests(
    where: str, record_property: RecordProperty
) -> None:
    latency = Latency(ttft_s=0.05, token_s=0.02, tts_first_byte_s=0.05, tts_rtf=0.5)
    async with rig(latency, reply=f"{DEFAULT_REPLY} {DEFAULT_REPLY}") as r:
        if where == "before the response headers":
            r.chat.chat_faults.append(hang())
        elif where == "before the first token":
            r.chat.latency = Latency(ttft_s=10)  # headers sent, the first token never comes
        elif where == "between segments":
            # Segment 0 is spoken quickly; segment 1's speech waits for its first byte.
            r.tts.latency = Latency(tts_first_byte_s=0.05, tts_rtf=0.1)
            r.tts.speech_faults.extend([slow_first_byte(0), slow_first_byte(10)])
        sent_at = time.monotonic()
        call = r.stub.Synthesize(request(), timeout=DEADLINE_S if "deadline" in where else 30)
        if where == "before the response headers":
            await r.chat.wait_for_event("hanging")
        elif where == "before the first token":
            await r.chat.wait_for_event("first_byte")
            # Aims the cancel at the SDK's body read, which nothing marks; a cancel a little
            # sooner or later must close the request as fast.
            await asyncio.sleep(0.02)
        elif "deadline" in where:  # speaking, with the reply still being written
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == DEADLINE
        else:
            wanted = "audio" if where == "after the first audio" else "segment"
            async for response in call:
                if response.WhichOneof("event") == wanted and (
                    wanted == "audio" or response.segment.index == 1
                ):
                    break
        if "deadline" in where:
            cancelled_at = sent_at + DEADLINE_S  # no later than the deadline grpc set
        else:
            cancelled_at = time.monotonic()
            call.cancel()
        await r.settled()

        delays = {}
        for q in r.upstream_requests:
            assert q.finished_at is not None
            if q.client_gone_at is not None:
                delays[f"{q.path.rsplit('/', 1)[-1]}#{q.index}"] = q.client_gone_at - cancelled_at
            else:  # it had ended on its own, not streamed on past the cancel
                assert q.finished_at <= cancelled_at + CLOSE_BUDGET_S
        print(
            f"\ncancel {where} → upstream closed: "
            + ", ".join(f"{name} {ms(d)}" for name, d in delays.items())
        )
        record_property("cancel_to_close_ms", {k: round(v * 1000, 2) for k, v in delays.items()})
        assert max(delays.values()) <= CLOSE_BUDGET_S
        paths = {q.path for q in r.upstream_requests if q.client_gone_at is not None}
        if where.startswith("before"):
            assert paths == {"/v1/chat/completions"}
            assert not r.tts.requests
        else:
            assert paths == {"/v1/chat/completions", "/v1/audio/speech"}
        assert r.app.runtime.active_streams == 0


def open_sockets() -> int:
    """Count this process's file descriptors that are sockets."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass  # closed while we looked
    return count


class Pool:
    """The SDK's connection pool: AsyncOpenAI → httpx2 → aiohttp's connector."""

    def __init__(self, provider: object) -> None:
        self._transport = provider._client._client._transport  # type: ignore[attr-defined]

    @property
    def _connector(self) -> Any:
        return self._transport.client.connector

    @property
    def idle(self) -> int:
        return sum(len(idle) for idle in self._connector._conns.values())

    @property
    def in_use(self) -> int:
        return len(self._connector._acquired)


async def test_random_cancels_leave_nothing_behind(record_property: RecordProperty) -> None:
    latency = Latency(ttft_s=0.004, token_s=0.001, tts_first_byte_s=0.002, tts_rtf=0.02)
    reply = "Hi there. How are you doing today? Bye for now."
    async with rig(latency, reply=reply, llm_timeout_s=5, tts_timeout_s=5) as r:
        synth = r.app.synthesizer
        chat_pool, speech_pool = Pool(synth.engines.chat), Pool(synth.engines.speech)

        def idle() -> int:
            # An idle keep-alive connection is two sockets here (both ends are in this
            # process) and one task in the fake; the pools may keep them, nothing else.
            return chat_pool.idle + speech_pool.idle

        async def quiet() -> None:
            await r.settled()
            await eventually(lambda: r.chat.open_connections + r.tts.open_connections == idle())
            assert chat_pool.in_use == speech_pool.in_use == 0

        def snapshot() -> dict[str, int]:
            n = idle()
            return {
                "tasks": len(asyncio.all_tasks()) - n,
                "sockets": open_sockets() - 2 * n,
                "fake_connections": r.chat.open_connections + r.tts.open_connections - n,
            }

        workers = 4
        await asyncio.gather(*(synthesize(r.stub) for _ in range(workers)))  # warm up
        await quiet()
        baseline = snapshot()
        baseline_pools = (chat_pool.idle, speech_pool.idle)
        outcomes: dict[str, int] = {}

        async def one(i: int) -> None:
            rng = random.Random(SEED + i)  # the same choices whatever the interleaving
            how = rng.choice(["none", "started", "audio", "nth", "timer", "deadline"])
            timeout = rng.uniform(0.01, 0.06) if how == "deadline" else 30
            call = r.stub.Synthesize(request(), timeout=timeout)
            if how == "timer":
                await asyncio.sleep(rng.uniform(0, 0.03))  # a cancel at any moment: the test
                call.cancel()
            else:
                n = rng.randint(0, 60)
                seen = 0
                with contextlib.suppress(grpc.aio.AioRpcError):  # the deadline
                    async for response in call:
                        seen += 1
                        if (
                            (how == "started")
                            or (how == "audio" and response.HasField("audio"))
                            or (how == "nth" and seen > n)
                        ):
                            call.cancel()
                            break
            code = await call.code()
            outcomes[code.name] = outcomes.get(code.name, 0) + 1

        async def worker(w: int) -> None:
            for i in range(w, 200, workers):
                await one(i)

        began = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(workers)))
        elapsed = time.monotonic() - began
        await quiet()
        # grpc.aio reaps a finished call's tasks a moment after its stream ends.
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: snapshot() == baseline, within=5)
        after = snapshot()
        pools = (chat_pool.idle, speech_pool.idle)
        gone = sum(q.client_gone_at is not None for q in r.upstream_requests)
        print(
            f"\n200 requests with random cancels in {elapsed:.1f} s ({outcomes}); "
            f"{len(r.upstream_requests)} upstream requests, {gone} closed by a cancel; "
            f"baseline {baseline}, after {after} (idle pooled connections excluded); "
            f"pools (chat, speech): {baseline_pools} → {pools}"
        )
        record_property("leak_baseline", baseline)
        record_property("leak_after", after)
        assert sum(outcomes.values()) == 200
        # Impatient callers are no upstream failure: the breaker stays closed.
        assert set(outcomes) == {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
        assert outcomes["CANCELLED"] + outcomes["DEADLINE_EXCEEDED"] > 100
        assert gone > 50
        assert after == baseline, [t.get_coro() for t in asyncio.all_tasks()]
        # Pools hold no more than the concurrency ever needed: per stream, one chat
        # connection and `lookahead` speech connections.
        assert pools[0] <= workers and pools[1] <= workers * 2

        # And everything still works.
        responses = await synthesize(r.stub)
        assert completed(responses) and responses[-1].finished.reply_text == reply


# Settings: per-stage URLs and keys; secrets stay secret


async def test_per_stage_urls_and_keys_reach_their_upstream() -> None:
    async with rig(llm_model="chat-model-x", tts_model="speech-model-y") as r:
        assert completed(await synthesize(r.stub))
    assert r.chat.requests and r.tts.requests
    assert {q.path for q in r.chat.requests} == {"/v1/chat/completions"}
    assert {q.path for q in r.tts.requests} == {"/v1/audio/speech"}
    assert {q.api_key for q in r.chat.requests} == {CHAT_KEY}
    assert {q.api_key for q in r.tts.requests} == {TTS_KEY}
    assert {q.body["model"] for q in r.chat.requests} == {"chat-model-x"}
    assert {q.body["model"] for q in r.tts.requests} == {"speech-model-y"}


@pytest.mark.parametrize("cap", [7, 0])
async def test_max_reply_tokens_reaches_the_chat_upstream(cap: int) -> None:
    async with rig(max_reply_tokens=cap) as r:
        responses = await synthesize(r.stub)
    [chat] = r.chat.requests
    tokens = tokenize(DEFAULT_REPLY)
    if cap:
        assert chat.body["max_tokens"] == cap
        assert responses[-1].finished.reply_text == "".join(tokens[:cap])
    else:  # 0 turns the limit off
        assert "max_tokens" not in chat.body and "max_completion_tokens" not in chat.body
        assert responses[-1].finished.reply_text == DEFAULT_REPLY


async def test_openai_settings_are_the_fallback_for_a_stage() -> None:
    shared = "sk-shared-5e4d3c2b1a09f8e7"
    async with (
        FakeOpenAI(latency=Latency.zero(), api_key=CHAT_KEY) as chat,
        FakeOpenAI(latency=Latency.zero(), api_key=shared) as tts,
        running_app(
            llm="openai",
            tts="openai",
            openai_api_key=shared,
            openai_base_url=tts.base_url,
            llm_base_url=chat.base_url,
            llm_api_key=CHAT_KEY,
        ) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        assert completed(await synthesize(pb_grpc.SynthesizerStub(channel)))
    assert {(q.path, q.api_key) for q in chat.requests} == {("/v1/chat/completions", CHAT_KEY)}
    assert {(q.path, q.api_key) for q in tts.requests} == {("/v1/audio/speech", shared)}


def masked(key: str) -> str:
    return f"{key[:3]}***{key[-2:]}"  # how OpenAI echoes a wrong key in a 401


async def test_keys_never_appear_in_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    details: list[str] = []
    async with rig(breaker_failures=0) as r:
        assert completed(await synthesize(r.stub))
        # Upstreams that echo the key back, in every way a client could then see it.
        r.chat.chat_faults.extend([status(500, message=f"key {CHAT_KEY} is broken")] * 3)
        r.tts.speech_faults.append(status(400, message=f"no such key: {TTS_KEY}"))
        for speak in (False, True):
            error, _ = await fail(r.stub, ONE_SENTENCE, speak=speak)
            details.append(error.details() or "")
        r.chat.api_key = "sk-another-one-0000"  # our key is now wrong: a 401 echoes it masked
        error, _ = await fail(r.stub)
        details.append(error.details() or "")
    assert details[2].endswith("rejected the request: 401")

    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any('"stream_end"' in line for line in lines)
    assert any("retrying the chat upstream" in line for line in lines)
    for text in [*lines, *details]:
        for key in (CHAT_KEY, TTS_KEY):
            assert key not in text
            assert key[3:] not in text
            assert masked(key) not in text


async def test_half_open_breaker_serves_a_request_of_many_segments() -> None:
    text = "One sentence first. Then a second one. And a third to end."
    async with rig(upstream_retries=0, breaker_failures=2, breaker_cooldown_s=0.3) as r:
        r.tts.speech_faults.extend([status(500)] * 2)
        for _ in range(2):
            await fail(r.stub, ONE_SENTENCE, speak=True)
        error, _ = await fail(r.stub, text, speak=True)
        delay = retry_delay_ms(error)
        assert delay is not None
        await asyncio.sleep(delay / 1000 + 0.05)  # the cool-down is the behaviour under test
        responses = await synthesize(r.stub, text, speak=True)
        assert completed(responses), responses[-1]


async def test_impatient_callers_do_not_open_the_breaker() -> None:
    async with rig(upstream_retries=0, breaker_failures=2, llm_timeout_s=5) as r:
        r.chat.latency = Latency(ttft_s=0.5, token_s=0.001)  # slow to start, but healthy
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in r.stub.Synthesize(request(), timeout=0.2):
                    pass
            assert caught.value.code() == DEADLINE
        await r.settled()
        assert completed(await synthesize(r.stub))


async def test_retry_after_past_the_callers_deadline_is_not_awaited() -> None:
    async with rig(llm_timeout_s=30) as r:
        r.chat.chat_faults.append(status(429, retry_after=2))
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in r.stub.Synthesize(request(), timeout=1):
                pass
        assert caught.value.code() == UNAVAILABLE
        assert retry_delay_ms(caught.value) == 2000
        assert loop.time() - began < 0.5
        assert len(r.chat.requests) == 1
