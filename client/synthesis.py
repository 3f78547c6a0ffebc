"""One call's events, and what the listener heard when it is interrupted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from voxrelay.service import model
from voxrelay.service.words import heard_in

__all__ = ["Interruption", "Synthesis"]


@dataclass(slots=True)
class Interruption:
    """What a call's end is told: the playback position, and the server's answer."""

    played_ms: int | None = None
    heard_text: str | None = None


class Synthesis(AsyncIterator[model.Event]):
    """The events of one call, as the transport yields them.

    Iterate it with ``async for``; :meth:`interrupt` stops it at the listener's playback
    position and returns what was heard.
    """

    def __init__(self, events: AsyncIterator[model.Event], interruption: Interruption) -> None:
        self._events = events
        self._interruption = interruption
        self._segments: list[model.SegmentStarted] = []
        self._words: list[model.WordTiming] = []

    def __aiter__(self) -> Synthesis:
        return self

    async def __anext__(self) -> model.Event:
        event = await anext(self._events)
        if isinstance(event, model.SegmentStarted):
            self._segments.append(event)
        elif isinstance(event, model.WordTimings):
            self._words.extend(event.words)
        return event

    async def aclose(self) -> None:
        """Stop the call (on the server too) if it is still running."""
        closing = getattr(self._events, "aclose", None)
        if closing is not None:
            await closing()

    async def interrupt(self, played_ms: int) -> str:
        """Stop the call at *played_ms* of its audio; return the reply's text heard by then.

        Over WebSocket the server answers (and, in chat mode, remembers only that much of
        the reply for the next turn); over gRPC the text is read off the word timings
        received, so ask for ``word_timestamps``.
        """
        self._interruption.played_ms = played_ms
        await self.aclose()
        if self._interruption.heard_text is not None:
            return self._interruption.heard_text
        return heard_in(self._segments, self._words, played_ms)
