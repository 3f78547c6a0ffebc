"""The core alone: a stream driven through the Synthesizer (and the Relay) with no door.

As pipecat's ``run_test`` drives one processor, these tests hand the core the Protocol
fakes of :mod:`fakes.providers`, run a request and look at the events it yields: their
order, the segments and their audio, what the providers were asked, what a cancel closes
and which typed error a failure becomes. No socket, no process: the audio is the fakes'
tone, passed through as PCM at its own rate, so every byte count is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from fakes.providers import (
    GatedChat,
    ScriptedChat,
    SpyChat,
    ToneSpeaker,
    ToneSpeech,
    pcm_bytes,
)
from tests.servers import make_settings
from voxrelay.service import metrics
from voxrelay.service.chunker import SentenceChunker
from voxrelay.service.errors import (
    Internal,
    InvalidRequest,
    TooLarge,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
    VoxrelayError,
)
from voxrelay.service.model import (
    AudioChunk,
    AudioFormat,
    ChatMessage,
    Event,
    Mode,
    SegmentStarted,
    StreamFinished,
    StreamStarted,
    SynthesisRequest,
    WordTimings,
)
from voxrelay.service.providers.base import ChatProvider, SpeakingModel
from voxrelay.service.relay import ClientGone, Relay
from voxrelay.service.synthesizer import Synthesizer

TEXT = "Hello world. This is the core, speaking one sentence at a time. Goodbye for now."
WAIT = 10.0  # safety net for every await


@pytest.fixture
def speech() -> ToneSpeech:
    return ToneSpeech()


def core_with(
    chat: ChatProvider | SpeakingModel, speech: ToneSpeech, **settings: Any
) -> Synthesizer:
    return Synthesizer(make_settings(**settings), chat, speech)


@pytest.fixture
async def core(speech: ToneSpeech) -> AsyncIterator[Synthesizer]:
    synthesizer = core_with(SpyChat(), speech)
    yield synthesizer
    await synthesizer.aclose()


def speak(text: str = TEXT, **fields: Any) -> SynthesisRequest:
    return SynthesisRequest(text=text, mode=Mode.SPEAK, format=AudioFormat.PCM, **fields)


def chat(text: str, **fields: Any) -> SynthesisRequest:
    return SynthesisRequest(text=text, mode=Mode.CHAT, format=AudioFormat.PCM, **fields)


async def run(core: Synthesizer, request: SynthesisRequest) -> list[Event]:
    """Run *request* to its end; return every event it yielded."""
    async with asyncio.timeout(WAIT), core.stream(request) as events:
        return [event async for event in events]


async def run_until_error(core: Synthesizer, request: SynthesisRequest) -> tuple[list[Event], Any]:
    """Run *request*; return the events before its error, and the error."""
    seen: list[Event] = []
    with pytest.raises(VoxrelayError) as caught:
        async with asyncio.timeout(WAIT), core.stream(request) as events:
            async for event in events:
                seen.append(event)
    return seen, caught.value


def segments_of(text: str) -> list[str]:
    chunker = SentenceChunker()
    return chunker.feed(text) + chunker.flush()


def check_order(events: Sequence[Event]) -> None:
    """Started first; each segment, then its audio, then its words; seq counting up by one;
    finished last."""
    assert isinstance(events[0], StreamStarted)
    index, seq, worded = -1, 0, -1
    with_words = any(isinstance(event, WordTimings) for event in events)
    for event in events[1:-1]:
        match event:
            case SegmentStarted():
                assert not with_words or worded == index  # the one before had its words
                index += 1
                assert event.index == index
            case AudioChunk():
                assert worded < index
                assert (event.segment_index, event.seq) == (index, seq)
                seq += 1
            case WordTimings():
                assert event.segment_index == index == worded + 1
                worded = index
            case _:
                raise AssertionError(f"unexpected {event!r} mid-stream")
    assert isinstance(events[-1], StreamFinished)


def audio_by_segment(events: Sequence[Event]) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for event in events:
        if isinstance(event, AudioChunk):
            sizes[event.segment_index] = sizes.get(event.segment_index, 0) + len(event.data)
    return sizes


# A stream's events


async def test_speak_mode_speaks_each_segment_in_order(
    core: Synthesizer, speech: ToneSpeech
) -> None:
    events = await run(core, speak(request_id="r1"))
    check_order(events)
    expected = segments_of(TEXT)
    assert len(expected) == 3
    started, finished = events[0], events[-1]
    assert isinstance(started, StreamStarted) and isinstance(finished, StreamFinished)
    assert (started.request_id, started.format, started.sample_rate_hz) == ("r1", "pcm", 24000)
    assert (started.llm_model, started.tts_model, started.voice) == ("", "tone", "tone")

    segments = [e for e in events if isinstance(e, SegmentStarted)]
    assert [s.text for s in segments] == expected == speech.calls
    # The tone lasts 10 ms a character: each segment starts where the audio before it ends.
    assert [s.start_ms for s in segments] == [
        0,
        len(expected[0]) * 10,
        len("".join(expected[:2])) * 10,
    ]
    assert audio_by_segment(events) == {i: pcm_bytes(t) for i, t in enumerate(expected)}
    assert finished.reply_text == TEXT
    assert finished.segments == 3
    assert finished.audio_bytes == sum(pcm_bytes(t) for t in expected)
    assert finished.audio_ms == len("".join(expected)) * 10
    assert finished.llm_first_token_ms == 0 and finished.tts_first_byte_ms >= 0


async def test_chat_mode_sends_the_conversation_and_speaks_the_reply(speech: ToneSpeech) -> None:
    spy = SpyChat()
    core = core_with(spy, speech)
    history = (ChatMessage("user", "Hi."), ChatMessage("assistant", "Hello! How can I help?"))
    try:
        events = await run(
            core, chat("Tell me. Then stop", history=history, instructions="Be brief.")
        )
    finally:
        await core.aclose()
    check_order(events)
    assert spy.calls == [
        [ChatMessage("system", "Be brief."), *history, ChatMessage("user", "Tell me. Then stop")]
    ]
    started, finished = events[0], events[-1]
    assert isinstance(started, StreamStarted) and isinstance(finished, StreamFinished)
    assert (started.llm_model, started.tts_model) == ("spy", "tone")
    reply = "You said: Tell me. Then stop "
    assert finished.reply_text == reply
    assert [e.text for e in events if isinstance(e, SegmentStarted)] == segments_of(reply)
    assert speech.calls == segments_of(reply)
    # The usage the provider reported at the end.
    assert (finished.prompt_tokens, finished.completion_tokens) == (4, 3)


async def test_a_speaking_model_answers_chat_mode_and_the_engine_speak_mode(
    speech: ToneSpeech,
) -> None:
    speaker = ToneSpeaker()
    core = core_with(speaker, speech)
    try:
        events = await run(core, chat("Say something."))
        check_order(events)
        started, finished = events[0], events[-1]
        assert isinstance(started, StreamStarted) and isinstance(finished, StreamFinished)
        assert started.llm_model == started.tts_model == "tone-speaker"
        assert finished.reply_text == speaker.reply
        texts = [e.text for e in events if isinstance(e, SegmentStarted)]
        assert " ".join(texts) == speaker.reply
        assert finished.audio_bytes == pcm_bytes(speaker.reply)
        assert speaker.calls[0][-1] == ChatMessage("user", "Say something.")
        assert speech.calls == []

        spoken = await run(core, speak("Read this out."))
        check_order(spoken)
        assert speech.calls == ["Read this out."] and len(speaker.calls) == 1
    finally:
        await core.aclose()


# Cancel: whoever stops listening closes the upstream calls


async def test_leaving_a_stream_early_closes_the_chat_reply(speech: ToneSpeech) -> None:
    gated = GatedChat()
    core = core_with(gated, speech)
    baseline = len(asyncio.all_tasks())
    try:
        async with asyncio.timeout(WAIT), core.stream(chat("Talk.")) as events:
            async for event in events:
                if isinstance(event, AudioChunk):
                    break  # the reply is held at its gate: the core is waiting on it
        assert gated.closed.is_set()
        assert core.runtime.active_streams == 0
        assert len(asyncio.all_tasks()) == baseline
    finally:
        await core.aclose()


async def test_leaving_early_closes_the_speaking_models_reply(speech: ToneSpeech) -> None:
    speaker = ToneSpeaker(gate=asyncio.Event())
    core = core_with(speaker, speech)
    try:
        async with asyncio.timeout(WAIT), core.stream(chat("Talk.")) as events:
            async for event in events:
                if isinstance(event, AudioChunk):
                    break
        assert speaker.closed.is_set()
        assert core.runtime.active_streams == 0
    finally:
        await core.aclose()


async def test_a_cancelled_consumer_closes_the_speech_call() -> None:
    held = ToneSpeech(gate=asyncio.Event())
    core = core_with(SpyChat(), held)
    first_audio = asyncio.Event()

    async def consume() -> None:
        async with core.stream(
            speak("One long sentence that is held after its first chunk.")
        ) as events:
            async for event in events:
                if isinstance(event, AudioChunk):
                    first_audio.set()

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_audio.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert held.closed.is_set()
        assert core.runtime.active_streams == 0
    finally:
        await core.aclose()


# Errors: typed, and after them nothing


async def test_a_chat_upstream_failure_ends_the_stream_with_its_error(speech: ToneSpeech) -> None:
    broken = ScriptedChat("The first sentence is out. And", UpstreamError("boom", retryable=False))
    core = core_with(broken, speech, upstream_retries=0)
    try:
        seen, error = await run_until_error(core, chat("Talk."))
    finally:
        await core.aclose()
    assert isinstance(error, UpstreamError) and error.code == "upstream_error"
    assert isinstance(seen[0], StreamStarted)
    assert not any(isinstance(e, StreamFinished) for e in seen)
    assert core.runtime.active_streams == 0


async def test_a_speech_failure_ends_the_stream_with_its_error() -> None:
    failing = ToneSpeech(fail_on="second")
    core = core_with(SpyChat(), failing, upstream_retries=0)
    try:
        seen, error = await run_until_error(core, speak(TEXT.replace("core", "second")))
    finally:
        await core.aclose()
    assert isinstance(error, UpstreamError) and error.code == "upstream_error"
    assert failing.calls[:2] == segments_of(TEXT.replace("core", "second"))[:2]
    assert not any(isinstance(e, StreamFinished) for e in seen)
    assert core.runtime.active_streams == 0


async def test_an_unexpected_exception_becomes_internal(speech: ToneSpeech) -> None:
    core = core_with(ScriptedChat("Hi. ", RuntimeError("a bug")), speech, upstream_retries=0)
    try:
        _, error = await run_until_error(core, chat("Talk."))
    finally:
        await core.aclose()
    assert isinstance(error, Internal) and error.code == "internal"
    assert "a bug" not in str(error)  # the caller gets the request id, not our internals


@pytest.mark.parametrize(
    ("request_", "kind"),
    [
        (speak("   "), InvalidRequest),
        (speak("x" * 101), TooLarge),
        (speak(voice="nobody"), InvalidRequest),
        (speak(speed=9.0), InvalidRequest),
        (chat("Hi", history=(ChatMessage("robot", "beep"),)), InvalidRequest),
        (speak("bell \x07"), InvalidRequest),
    ],
    ids=["empty", "too long", "unknown voice", "too fast", "history role", "control character"],
)
async def test_a_bad_request_is_refused_before_any_upstream_call(
    speech: ToneSpeech, request_: SynthesisRequest, kind: type[VoxrelayError]
) -> None:
    spy = SpyChat()
    core = core_with(spy, speech, max_input_chars=100)
    try:
        with pytest.raises(kind):
            async with core.stream(request_):
                pass
    finally:
        await core.aclose()
    assert spy.calls == [] and speech.calls == []
    assert core.runtime.active_streams == 0


async def test_a_draining_core_refuses_new_streams(core: Synthesizer) -> None:
    await core.runtime.begin_drain()
    with pytest.raises(Unavailable) as caught:
        async with core.stream(speak()):
            pass
    assert caught.value.retryable


# The first audio comes before the rest of the reply


class FirstAudioSink:
    """A door whose send of the stream's first audio takes a while (many loop turns)."""

    def __init__(self, shaped: list[str]) -> None:
        self.shaped = shaped
        #: the segments made speakable by the time the first audio had gone out.
        self.shaped_by_first_audio: list[str] | None = None

    async def send(self, event: StreamStarted | SegmentStarted | AudioChunk) -> None:
        if isinstance(event, AudioChunk) and self.shaped_by_first_audio is None:
            for _ in range(50):
                await asyncio.sleep(0)
            self.shaped_by_first_audio = list(self.shaped)


@pytest.mark.parametrize("cached", [False, True])
async def test_the_rest_of_the_reply_waits_until_the_first_audio_is_sent(
    speech: ToneSpeech, cached: bool
) -> None:
    core = core_with(SpyChat(), speech, cache_mb=64 if cached else 0)
    shaped: list[str] = []
    shaper = core.speakable.shaper

    def spying(**options: Any) -> Any:
        shape = shaper(**options)

        def spy(text: str) -> Any:
            shaped.append(text)
            return shape(text)

        return spy

    core.speakable.shaper = spying  # type: ignore[method-assign]
    try:
        if cached:
            await run(core, speak())
            shaped.clear()
        sink = FirstAudioSink(shaped)
        finished = await asyncio.wait_for(
            Relay(core).open("ws", "127.0.0.1:1", speak()).relay(sink), WAIT
        )
    finally:
        await core.aclose()
    expected = segments_of(TEXT)
    # Only the segments within the look-ahead were begun before the first audio went out.
    assert sink.shaped_by_first_audio == expected[:2]
    assert shaped == expected
    assert finished.segments == 3


# The relay: the outcome rules every door shares


class ListSink:
    """A door's sink that keeps what it is sent; it can lose its client after *limit*."""

    def __init__(self, limit: int | None = None) -> None:
        self.events: list[Event] = []
        self.limit = limit

    async def send(self, event: StreamStarted | SegmentStarted | AudioChunk) -> None:
        if self.limit is not None and len(self.events) >= self.limit:
            raise ClientGone()
        self.events.append(event)


def outcomes(protocol: str, mode: str, outcome: str) -> float:
    labels = {"protocol": protocol, "mode": mode, "outcome": outcome}
    return metrics.REGISTRY.get_sample_value("voxrelay_requests_total", labels) or 0.0


async def test_the_relay_sends_every_event_but_the_last_and_counts_the_outcome(
    core: Synthesizer,
) -> None:
    before = outcomes("ws", "speak", "ok")
    sink = ListSink()
    finished = await Relay(core).open("ws", "127.0.0.1:1", speak()).relay(sink)
    check_order([*sink.events, finished])
    assert finished.reply_text == TEXT
    assert outcomes("ws", "speak", "ok") == before + 1


async def test_the_relay_closes_upstream_when_the_client_goes(speech: ToneSpeech) -> None:
    gated = GatedChat()
    core = core_with(gated, speech)
    before = outcomes("grpc", "chat", "cancelled")
    try:
        relayed = Relay(core).open("grpc", "127.0.0.1:1", chat("Talk."))
        with pytest.raises(ClientGone):
            await asyncio.wait_for(relayed.relay(ListSink(limit=2)), WAIT)
    finally:
        await core.aclose()
    assert gated.closed.is_set()
    assert outcomes("grpc", "chat", "cancelled") == before + 1
    assert core.runtime.active_streams == 0


async def test_the_relay_counts_an_expired_deadline_as_the_callers_cancel(
    speech: ToneSpeech,
) -> None:
    gated = GatedChat()
    core = core_with(gated, speech)
    before = outcomes("grpc", "chat", "cancelled")
    try:
        # The deadline running out is the behaviour under test: the reply waits at its gate.
        deadline = asyncio.get_running_loop().time() + 0.2
        relayed = Relay(core).open("grpc", "127.0.0.1:1", chat("Talk."), deadline=deadline)
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(relayed.relay(ListSink()), WAIT)
    finally:
        await core.aclose()
    assert gated.closed.is_set()
    assert outcomes("grpc", "chat", "cancelled") == before + 1
