"""The small interfaces every upstream implements.

A chat provider streams text deltas of a reply; a speech engine streams PCM for one
segment of text; a speaking model (OpenAI's Realtime API) does both at once, streaming
the reply's transcript and its audio. Retries, timeouts, the circuit breaker and metrics
live in the core around these calls, so a provider only translates between its upstream
and these types and raises :mod:`voxrelay.service.errors` for failures.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..model import ChatMessage, Voice
from ..words import WordMark

__all__ = [
    "MAX_TOKEN_COUNT",
    "ChatDelta",
    "ChatProvider",
    "QueuedStream",
    "ReadHold",
    "SpeakingModel",
    "SpeechEngine",
    "SpokenDelta",
    "token_count",
    "valid_text",
]

#: A surrogate code point: in a str, always a lone one (JSON decodes a pair as one).
_SURROGATE = re.compile("[\ud800-\udfff]")
#: The largest token count passed on: what ``StreamFinished``'s uint32 fields can carry.
MAX_TOKEN_COUNT = 2**32 - 1


def valid_text(text: str) -> str:
    """Return upstream *text* with any lone surrogate replaced by U+FFFD.

    JSON may escape one that no UTF-8 can carry; passed on, it would fail the frame
    and the log line that carry the reply, not just this piece of it.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def token_count(value: object) -> int | None:
    """Read a usage figure an upstream reported: a whole number clamped to ≥ 0, else None.

    Counters only go up and the gRPC figures are unsigned: a negative or huge count from
    a faulty upstream must not fail the stream that reports it.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return min(max(value, 0), MAX_TOKEN_COUNT)


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """A piece of the reply text, or (at the end) the usage the upstream reported."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ChatProvider(Protocol):
    """Stream a reply to a conversation."""

    #: closed-set provider name used in metrics and logs: "openai", "echo", …
    name: str
    #: model reported to callers in ``started``.
    model: str

    def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, timeout: float
    ) -> AsyncGenerator[ChatDelta, None]:
        """Yield the reply as it is written.

        *messages* is the whole conversation (system, history, user). *timeout*
        caps one network wait. The iterator must release its upstream request when
        it is closed early (``aclose``) or cancelled.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


class SpeechEngine(Protocol):
    """Turn one segment of text into PCM."""

    #: closed-set provider name used in metrics and logs: "openai", "espeak", …
    name: str
    #: model reported to callers in ``started``.
    model: str
    #: native rate of the PCM it yields (signed 16-bit little-endian mono).
    sample_rate: int
    #: the voice used when the caller names none.
    default_voice: str
    #: the fastest ``speed`` it accepts.
    max_speed: float
    #: whether :meth:`voices` is the whole list (else unknown names go to the upstream).
    validates_voices: bool
    #: whether it reports where each word starts (see :meth:`synthesize`'s *marks*).
    reports_words: bool

    async def voices(self) -> list[Voice]:
        """List the voices this engine offers."""
        ...

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
        """Yield PCM (s16le mono at :attr:`sample_rate`) for *text* as it is produced.

        Chunks may have any length, including odd byte counts. The iterator must stop
        its upstream work when closed early or cancelled. *caller* (an API key id or a
        client address; None for an anonymous internal caller) is whom an engine that
        queues jobs takes turns between; others ignore it. Such an engine's iterator is
        a :class:`QueuedStream`. An engine that :attr:`reports_words` appends its word
        events to *marks*, each before the audio it starts in; others leave it alone.
        An engine that reads a socket names it to *hold* while it reads the segment's
        audio from it; others leave it alone.
        """
        ...

    async def aclose(self) -> None:
        """Release the engine."""
        ...


class ReadHold:
    """Let a segment's audio gather at its socket while its reader waits.

    The reader calls :meth:`hold` between reads when the listener has audio in hand. An
    engine that reads a socket names it with :meth:`reading`; while held, that socket is
    not read, so the kernel gathers what arrives and one wake-up takes it all, where each
    chunk would wake the event loop and pass through the HTTP parser on its own.
    """

    __slots__ = ("_socket", "held")

    def __init__(self) -> None:
        self._socket: Callable[[], asyncio.Transport | None] | None = None
        #: whether a hold has the socket paused now.
        self.held = False

    def reading(self, socket: Callable[[], asyncio.Transport | None] | None) -> None:
        """Say how to find the socket the segment is read from; it returns None once
        the socket is no longer this segment's (its body is in, the connection pooled)."""
        self._socket = socket

    async def hold(self, seconds: float) -> None:
        """Wait *seconds*, the named socket unread meanwhile."""
        transport = self._socket() if self._socket is not None else None
        # A socket already paused is someone else's to resume (aiohttp's flow control).
        if transport is None or transport.is_closing() or not transport.is_reading():
            await asyncio.sleep(seconds)
            return
        transport.pause_reading()
        self.held = True
        try:
            await asyncio.sleep(seconds)
        finally:
            self.held = False
            if not transport.is_closing():
                transport.resume_reading()


@runtime_checkable
class QueuedStream(Protocol):
    """An upstream stream that first waits its turn for a local resource.

    An embedded engine's worker is such a resource: the wait for one says nothing of the
    engine's health. The core awaits :meth:`admitted` (bounded by the caller's own
    deadline only) before it starts the stream's first-byte clock, so that time counts
    toward no upstream timeout and is never an upstream failure.
    """

    async def admitted(self) -> None:
        """Return once the stream holds its resource; the first item follows."""
        ...


@dataclass(frozen=True, slots=True)
class SpokenDelta:
    """A piece of a spoken reply: transcript text, PCM, or (at the end) the usage."""

    text: str = ""
    pcm: bytes = b""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@runtime_checkable
class SpeakingModel(Protocol):
    """Write and speak a reply to a conversation in one upstream call."""

    #: closed-set provider name used in metrics and logs: "realtime".
    name: str
    #: model reported to callers in ``started`` (as both the LLM and the TTS model).
    model: str
    #: native rate of the PCM it yields (signed 16-bit little-endian mono).
    sample_rate: int
    #: the voice used when the caller names none.
    default_voice: str
    #: the fastest ``speed`` it accepts.
    max_speed: float
    #: whether :meth:`voices` is the whole list (else unknown names go to the upstream).
    validates_voices: bool

    async def voices(self) -> list[Voice]:
        """List the voices this model speaks with."""
        ...

    def respond(
        self,
        messages: Sequence[ChatMessage],
        *,
        voice: str,
        speed: float,
        max_output_tokens: int,
        timeout: float,
    ) -> AsyncGenerator[SpokenDelta, None]:
        """Yield the reply's transcript and PCM as they are produced, then the usage.

        *messages* is the whole conversation (system, history, user). Transcript deltas
        come a little ahead of the audio that speaks them. *max_output_tokens* 0 means no
        cap; *timeout* caps one network wait. The iterator must stop the upstream response
        and release its session when it is closed early (``aclose``) or cancelled.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...
