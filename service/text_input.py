"""Text a caller streams in while it is still writing it (speak mode).

A door puts what its client sends into a :class:`TextInput` (:meth:`~TextInput.append`,
:meth:`~TextInput.flush`, :meth:`~TextInput.end`, :meth:`~TextInput.fail`), without
waiting; the stream's pipeline takes it out with :meth:`~TextInput.pieces` as the third
source of text beside the caller's whole text and the LLM's reply. The rules of a
streamed input live here: the cap on its whole text, the characters charged to the
caller as each piece arrives, control characters refused, and an input left idle ending
as if its caller had ended it.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from .errors import InvalidRequest, TooLarge, VoxrelayError
from .planner import check_text

__all__ = ["FLUSH", "Flush", "TextInput"]


class Flush(enum.Enum):
    """A marker among the pieces: speak what is buffered now, even mid-sentence."""

    FLUSH = "flush"


FLUSH = Flush.FLUSH


class _End(enum.Enum):
    END = "end"


_Item = str | Flush | _End | VoxrelayError


class TextInput:
    """The pieces of one streamed text, from the door that reads them to the pipeline.

    *max_chars* caps the whole text (``0``: no cap): the piece that crosses it ends the
    stream with :class:`~.errors.TooLarge`. *idle_s* (``0``: never) ends the input when
    no text or flush came for that long, as :meth:`end` would.
    """

    def __init__(self, *, max_chars: int = 0, idle_s: float = 0.0) -> None:
        self.max_chars = max_chars
        self.idle_s = idle_s
        #: characters appended so far (all of them, even past the cap).
        self.chars = 0
        self._items: deque[_Item] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._last = asyncio.get_running_loop().time()

    @property
    def closed(self) -> bool:
        """Whether the input takes no more (it ended, failed or went idle)."""
        return self._closed

    def append(self, text: str) -> None:
        """Add the next piece of the text (any size: it may end mid-word)."""
        if self._closed or not text:
            self._touch()
            return
        self.chars += len(text)
        if self.max_chars and self.chars > self.max_chars:
            self.fail(
                TooLarge(
                    f"the streamed text reached {self.chars} characters; the limit is"
                    f" {self.max_chars} (VOXRELAY_MAX_STREAM_INPUT_CHARS): end this stream"
                    " and start another"
                )
            )
            return
        try:
            check_text(text, "text")
        except InvalidRequest as exc:
            self.fail(exc)
            return
        self._put(text)

    def flush(self) -> None:
        """Have what is buffered spoken now, without ending the text."""
        if not self._closed:
            self._put(FLUSH)

    def end(self) -> None:
        """End the text: what is buffered is spoken, then the stream finishes."""
        if not self._closed:
            self._put(_End.END)
            self._closed = True

    def fail(self, error: VoxrelayError) -> None:
        """End the stream with *error* once the pieces before it are taken."""
        if not self._closed:
            self._put(error)
            self._closed = True

    def _put(self, item: _Item) -> None:
        self._items.append(item)
        self._touch()
        self._ready.set()

    def _touch(self) -> None:
        self._last = asyncio.get_running_loop().time()

    async def pieces(
        self, charge: Callable[[int], Awaitable[None]] | None = None
    ) -> AsyncIterator[str | Flush]:
        """Yield the pieces and flush markers until the input ends; raise its error.

        Each piece is passed to *charge* (its length) before it is yielded: a refusal
        ends the stream with it.
        """
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                self._ready.clear()
                deadline = self._last + self.idle_s if self.idle_s else None
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._ready.wait()
                except TimeoutError:
                    if loop.time() < self._last + self.idle_s:
                        continue  # touched by an empty piece meanwhile
                    self._closed = True
                    return
            item = self._items.popleft()
            if isinstance(item, _End):
                return
            if isinstance(item, VoxrelayError):
                raise item
            if isinstance(item, str) and charge is not None:
                try:
                    await charge(len(item))
                except VoxrelayError:
                    self._closed = True
                    raise
            yield item
