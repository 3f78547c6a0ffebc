"""In-process providers for driving voxrelay's core with no network at all.

Each class implements one Protocol of :mod:`voxrelay.service.providers.base` and nothing
more, as httpx's ``MockTransport`` implements its transport: hand one to the core in place
of a real provider (``Synthesizer(settings, chat=SpyChat(), speech=ToneSpeech())``, or
``app.synthesizer.chat = GatedChat()`` on a running app) and watch or steer it from the test.

- chat providers (:class:`~voxrelay.service.providers.base.ChatProvider`):
  :class:`SpyChat` answers and records every conversation; :class:`ScriptedChat` replays
  given deltas and errors; :class:`GatedChat` says one sentence, then holds the rest until
  the test opens its gate; :class:`EndlessChat` never stops talking;
- speech engines (:class:`~voxrelay.service.providers.base.SpeechEngine`):
  :class:`ToneSpeech` speaks any text as a tone whose length follows the text;
  :class:`EndlessSpeech` speaks as long as it is told, as fast as it is read;
- a speaking model (:class:`~voxrelay.service.providers.base.SpeakingModel`):
  :class:`ToneSpeaker` writes a reply and speaks it in one call.

Every one records what it was asked in ``calls`` and sets its ``closed`` event when the core
closes one of its iterators before the end (a cancel or an error reaching upstream), so a
test awaits the thing rather than sleeping. Their ``name`` is one of the closed set of
provider names metrics accept (``echo``, ``espeak``, ``realtime``), as the embedded ones are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from voxrelay.service.errors import UpstreamError
from voxrelay.service.model import ChatMessage, Voice
from voxrelay.service.providers.base import (
    ChatDelta,
    ChatProvider,
    ReadHold,
    SpeakingModel,
    SpeechEngine,
    SpokenDelta,
)
from voxrelay.service.words import WordMark

from .openai_upstream import SAMPLE_RATE, tokenize, voice_pcm

__all__ = [
    "EndlessChat",
    "EndlessSpeech",
    "GatedChat",
    "ScriptedChat",
    "SpyChat",
    "ToneSpeaker",
    "ToneSpeech",
    "pcm_bytes",
]

#: How long the tone fakes speak per character of text (at speed 1.0).
MS_PER_CHAR = 10
#: Audio per chunk the tone fakes yield.
CHUNK_MS = 20
_VOICES = (Voice("tone", "en-us"), Voice("low", "en-gb"))


def pcm_bytes(text: str, speed: float = 1.0, sample_rate: int = SAMPLE_RATE) -> int:
    """Return how many PCM bytes :class:`ToneSpeech` yields for *text*."""
    return round(len(text) * MS_PER_CHAR / 1000 / (speed or 1.0) * sample_rate) * 2


def _chunks(pcm: bytes, sample_rate: int) -> list[bytes]:
    step = sample_rate * CHUNK_MS // 1000 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


# Chat providers


@dataclass
class SpyChat:
    """Reply "You said: …" (the last user turn) word by word; record every conversation."""

    name: str = "echo"
    model: str = "spy"
    #: every conversation the core sent, in order.
    calls: list[list[ChatMessage]] = field(default_factory=list)

    async def _reply(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[ChatDelta, None]:
        self.calls.append(list(messages))
        user = messages[-1].content
        for word in f"You said: {user}".split(" "):
            await asyncio.sleep(0)  # one delta per turn of the loop, as from a socket
            yield ChatDelta(text=word + " ")
        yield ChatDelta(prompt_tokens=len(messages), completion_tokens=3)

    def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, timeout: float
    ) -> AsyncGenerator[ChatDelta, None]:
        return self._reply(messages)

    async def aclose(self) -> None:
        pass


class ScriptedChat:
    """Replay *steps* for every conversation: text deltas, usage, then perhaps an error.

    A ``str`` step is a text delta, a :class:`ChatDelta` goes out as it is, and an
    exception is raised where it stands (``ScriptedChat("Hi. ", UpstreamError(...))``).
    """

    name = "echo"

    def __init__(self, *steps: str | ChatDelta | BaseException, model: str = "scripted") -> None:
        self.model = model
        self.steps = steps
        self.calls: list[list[ChatMessage]] = []
        #: set when the core closes a reply before its last step.
        self.closed = asyncio.Event()

    async def _reply(self) -> AsyncGenerator[ChatDelta, None]:
        done = False
        try:
            for step in self.steps:
                await asyncio.sleep(0)
                if isinstance(step, BaseException):
                    done = True  # the fake ended it, not the core
                    raise step
                yield ChatDelta(text=step) if isinstance(step, str) else step
            done = True
        finally:
            if not done:
                self.closed.set()

    def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, timeout: float
    ) -> AsyncGenerator[ChatDelta, None]:
        self.calls.append(list(messages))
        return self._reply()

    async def aclose(self) -> None:
        pass


@dataclass
class GatedChat:
    """Say one sentence, then hold the rest of the reply until ``gate`` is set.

    Once the gate opens, the reply ends with a second sentence, or with ``fail`` raised
    when the test set one. ``closed`` is set when the core closes the reply while it is
    held (a cancel reaching upstream).
    """

    name: str = "echo"
    model: str = "gated"
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: raised after the gate opens, instead of the second sentence.
    fail: BaseException | None = None
    calls: list[list[ChatMessage]] = field(default_factory=list)

    async def _reply(self) -> AsyncGenerator[ChatDelta, None]:
        finished = False
        try:
            # The chunker cuts after "." once it sees the next word begin.
            yield ChatDelta(text="The first sentence is out. And")
            await self.gate.wait()
            finished = True
            if self.fail is not None:
                raise self.fail
            yield ChatDelta(text=" the second one follows.")
        finally:
            if not finished:
                self.closed.set()

    def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, timeout: float
    ) -> AsyncGenerator[ChatDelta, None]:
        self.calls.append(list(messages))
        return self._reply()

    async def aclose(self) -> None:
        pass


@dataclass
class EndlessChat:
    """Talk forever, a sentence every few milliseconds.

    ``started`` is set once a reply begins, ``closed`` when the core stops listening.
    """

    name: str = "echo"
    model: str = "endless"
    started: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _reply(self) -> AsyncGenerator[ChatDelta, None]:
        self.started.set()
        try:
            n = 0
            while True:
                n += 1
                # A pace, not a wait: the reply must not outrun the test's reader by much.
                await asyncio.sleep(0.005)
                yield ChatDelta(text=f"This is sentence number {n} of a reply without end. ")
        finally:
            self.closed.set()

    def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, timeout: float
    ) -> AsyncGenerator[ChatDelta, None]:
        return self._reply()

    async def aclose(self) -> None:
        pass


# A speech engine


@dataclass
class ToneSpeech:
    """Speak any text as a tone: :data:`MS_PER_CHAR` ms a character, :data:`CHUNK_MS` chunks.

    The signal is the fake upstream's gliding, pulsing tone (never silent, so trimming
    leaves it whole); :func:`pcm_bytes` says how much of it a text gets. ``fail_on``: a
    segment containing that text fails with :class:`UpstreamError` after its first chunk.
    ``gate``, when given, holds every segment after its first chunk until it is set.
    """

    name: str = "espeak"
    model: str = "tone"
    sample_rate: int = SAMPLE_RATE
    default_voice: str = "tone"
    max_speed: float = 4.0
    validates_voices: bool = True
    reports_words: bool = False
    #: every segment asked for, in order.
    calls: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event | None = None
    fail_on: str | None = None

    async def voices(self) -> list[Voice]:
        return list(_VOICES)

    async def _speak(self, text: str, speed: float) -> AsyncGenerator[bytes, None]:
        self.calls.append(text)
        samples = pcm_bytes(text, speed, self.sample_rate) // 2
        done = False
        try:
            for i, chunk in enumerate(_chunks(voice_pcm(samples), self.sample_rate)):
                await asyncio.sleep(0)
                yield chunk
                if i == 0 and self.fail_on is not None and self.fail_on in text:
                    done = True
                    raise UpstreamError("the tone broke", retryable=False)
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
            done = True
        finally:
            if not done:
                self.closed.set()

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
        return self._speak(text, speed)

    async def aclose(self) -> None:
        pass


@dataclass
class EndlessSpeech:
    """Speak any text as *seconds* of silence, in *chunk_ms* chunks, as fast as it is read.

    ``pulled`` counts the bytes the core has taken so far: how far ahead of its listener
    the core lets an engine run. Change ``seconds`` mid-test to end the next segments sooner.
    """

    seconds: float = 600.0
    chunk_ms: int = 100
    name: str = "espeak"
    model: str = "endless"
    sample_rate: int = SAMPLE_RATE
    default_voice: str = "plain"
    max_speed: float = 4.0
    validates_voices: bool = False
    reports_words: bool = False
    #: every segment asked for, in order.
    calls: list[str] = field(default_factory=list)
    pulled: int = 0

    @property
    def pulled_s(self) -> float:
        return self.pulled / 2 / self.sample_rate

    async def voices(self) -> list[Voice]:
        return [Voice("plain", "en")]

    async def _speak(self, text: str) -> AsyncGenerator[bytes, None]:
        self.calls.append(text)
        chunk = bytes(self.sample_rate * self.chunk_ms // 1000 * 2)
        for _ in range(round(self.seconds * 1000 / self.chunk_ms)):
            self.pulled += len(chunk)
            yield chunk
            await asyncio.sleep(0)

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
        return self._speak(text)

    async def aclose(self) -> None:
        pass


# A speaking model


@dataclass
class ToneSpeaker:
    """Write *reply* and speak it in one call: each token's text, then its tone, then usage.

    Transcript deltas come just ahead of the audio that speaks them, as from a realtime
    model; each token lasts :data:`MS_PER_CHAR` ms a character. ``gate``, when given,
    holds the reply after its first sentence until it is set.
    """

    reply: str = "Hello from the speaking model. It talks and writes at once."
    name: str = "realtime"
    model: str = "tone-speaker"
    sample_rate: int = SAMPLE_RATE
    default_voice: str = "tone"
    max_speed: float = 1.5
    validates_voices: bool = True
    reports_words: bool = False
    calls: list[list[ChatMessage]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event | None = None

    async def voices(self) -> list[Voice]:
        return list(_VOICES)

    async def _respond(self, speed: float) -> AsyncGenerator[SpokenDelta, None]:
        tokens = tokenize(self.reply)
        gate = self.gate
        done = False
        try:
            for token in tokens:
                await asyncio.sleep(0)
                yield SpokenDelta(text=token)
                samples = pcm_bytes(token, speed, self.sample_rate) // 2
                for chunk in _chunks(voice_pcm(samples), self.sample_rate):
                    yield SpokenDelta(pcm=chunk)
                if gate is not None and token.rstrip().endswith((".", "!", "?")):
                    await gate.wait()
                    gate = None
            yield SpokenDelta(prompt_tokens=7, completion_tokens=len(tokens))
            done = True
        finally:
            if not done:
                self.closed.set()

    def respond(
        self,
        messages: Sequence[ChatMessage],
        *,
        voice: str,
        speed: float,
        max_output_tokens: int,
        timeout: float,
    ) -> AsyncGenerator[SpokenDelta, None]:
        self.calls.append(list(messages))
        return self._respond(speed)

    async def aclose(self) -> None:
        pass


if TYPE_CHECKING:  # mypy holds each fake to its Protocol (make types)
    _chats: tuple[ChatProvider, ...] = (SpyChat(), ScriptedChat(), GatedChat(), EndlessChat())
    _speech: tuple[SpeechEngine, ...] = (ToneSpeech(), EndlessSpeech())
    _speaking: SpeakingModel = ToneSpeaker()
