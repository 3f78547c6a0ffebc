"""The ordered end of a stream: its one encoder, its event numbering, its queue to a door.

Whatever shape produced the audio (chat → sentences → speech, or a speaking model), it
ends here: :class:`StreamOutput` announces segments, feeds PCM through the stream's one
:class:`~voxrelay.service.audio.StreamEncoder` (on the event loop while the listener is short
of audio, else in a worker thread of low priority) and puts the events on an
:class:`EventQueue`, which a door drains at its own pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .audio import StreamEncoder
from .errors import TooLarge, VoxrelayError
from .model import AudioChunk, Event, SegmentStarted, StreamFinished, WordTiming, WordTimings

__all__ = ["EncoderRunner", "EventQueue", "PcmFeed", "StreamEnd", "StreamOutput", "encoder_pool"]

# Limits
#: PCM of a segment relayed as one piece at most (~2.7 s at 24 kHz).
MAX_JOINED_PCM_BYTES = 128 * 1024
#: PCM a segment's feed holds before its engine waits (~5 s at 24 kHz).
MAX_FEED_BYTES = 256 * 1024
#: Once the listener has this much audio in hand beyond what has played, small chunks
#: may wait to go out together ...
HOLD_LEAD_MS = 150
#: ... but never longer than this.
MAX_HOLD_S = 0.5
#: The encoder threads' nice value: the lowest priority, below the event loop's.
ENCODER_NICENESS = 19
#: PCM encoded on the event loop at once at most (~0.5 s at 24 kHz, ~1 ms of opus).
MAX_LOOP_PCM_BYTES = 24 * 1024


def encoder_pool(threads: int) -> ThreadPoolExecutor:
    """Return the worker threads for encoders, each at the lowest CPU priority (Linux).

    They encode audio for listeners who have enough in hand, with the CPU the event loop
    leaves: at equal priority, each would take a share of a busy core from the loop, and
    every stream's relaying, first audio included, would wait for it.
    """
    return ThreadPoolExecutor(threads, thread_name_prefix="encode", initializer=_lower_priority)


def _lower_priority() -> None:
    # On Linux a thread's nice value is its own (elsewhere this would be the process's).
    # A sandbox that refuses it leaves the thread at the loop's priority, still working:
    # an initializer that raised would break the pool.
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENCODER_NICENESS)


class EncoderRunner:
    """Run one :class:`StreamEncoder`, one call at a time, in a worker thread or not.

    A call for a listener short of audio (*now*) runs on the event loop: a worker thread
    runs only when the loop leaves it the CPU, and the listener is waiting. With *inline*,
    every call does: for raw PCM at the engine's rate the encoder only copies bytes, and
    a thread hop per chunk would cost far more.
    """

    def __init__(
        self, encoder: StreamEncoder, executor: ThreadPoolExecutor, *, inline: bool = False
    ) -> None:
        self._encoder = encoder
        self._executor = executor
        self._inline = inline
        self._pending: Future[bytes] | None = None

    async def _run(self, now: bool, fn: Callable[..., bytes], *args: Any) -> bytes:
        if now or self._inline:
            return fn(*args)
        self._pending = self._executor.submit(fn, *args)
        return await asyncio.wrap_future(self._pending)

    async def encode(self, pcm: bytes, *, now: bool = False) -> bytes:
        return await self._run(now, self._encoder.encode, pcm)

    async def flush(self, *, now: bool = False) -> bytes:
        return await self._run(now, self._encoder.flush)

    def close(self) -> None:
        """Close now, or — if a worker is still encoding — right after it finishes.

        Closing a PyAV encoder while another thread encodes with it crashes the process.
        """
        pending = self._pending
        if pending is None or pending.done():
            self._encoder.close()
        else:
            pending.add_done_callback(lambda _: self._encoder.close())


class PcmFeed:
    """PCM of one segment on its way from the speech engine to the stream's output.

    The engine's task puts chunks as they come and ends the feed; the output takes what
    has gathered. The feed holds at most about *max_bytes*: past that, putting waits
    until the output has taken some, so an engine makes audio only as fast as the
    listener takes it. Taking waits for the first chunk, and — when the caller says the
    listener has audio enough in hand — a little longer, so that many small chunks go
    out as one (one encode call, one event, one gRPC message or WebSocket frame) while
    the listener notices nothing.
    """

    def __init__(self, max_bytes: int = MAX_FEED_BYTES) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._max = max_bytes
        self._ended = False
        self._ready = asyncio.Event()
        self._done = asyncio.Event()
        self._room = asyncio.Event()

    async def put(self, pcm: bytes) -> None:
        """Add *pcm*; then wait while the feed holds more than its bound."""
        if pcm:
            self._parts.append(pcm)
            self._size += len(pcm)
            self._ready.set()
        while self._size > self._max:
            self._room.clear()
            await self._room.wait()

    def end(self) -> None:
        self._ended = True
        self._ready.set()
        self._done.set()

    async def take(self, *, hold_s: float = 0.0) -> bytes | None:
        """Return the PCM gathered (waiting for some), or None once the segment is over.

        With *hold_s*, first wait that long for more, unless the segment ends sooner.
        """
        if hold_s > 0 and not self._ended:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(hold_s):
                    await self._done.wait()
        while not self._parts:
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        count = size = 0
        while count < len(self._parts) and size < MAX_JOINED_PCM_BYTES:
            size += len(self._parts[count])
            count += 1
        taken, self._parts = self._parts[:count], self._parts[count:]
        self._size -= size
        self._room.set()
        return taken[0] if count == 1 else b"".join(taken)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEnd:
    """Nothing follows in the queue: the stream ended, with *error* if it failed."""

    error: VoxrelayError | None = None


@dataclasses.dataclass(eq=False, slots=True)
class _Audio:
    """Audio of one segment not yet taken by the door: its pieces, joined when taken."""

    segment_index: int
    parts: list[bytes]
    size: int


class EventQueue:
    """A bounded queue of a stream's events that merges audio a busy door has not taken.

    While the door keeps up, every audio chunk goes out as it came. When it falls behind,
    a chunk joins the audio of the same segment still waiting at the tail (up to
    *max_audio_bytes*), so the door pays its per-message cost (a gRPC message, a
    WebSocket frame) once for many chunks, and never waits longer for it. ``seq`` is
    numbered as the door takes the chunks, so it counts up by one on the wire.
    Anything else (and merged audio past the bound) waits for room: the producer slows
    down to the door's pace.
    """

    def __init__(self, maxsize: int = 8, *, max_audio_bytes: int = 256 * 1024) -> None:
        self._items: deque[Event | StreamEnd | _Audio] = deque()
        self._maxsize = maxsize
        self._max_audio = max_audio_bytes
        self._seq = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        #: set while the door waits on an empty queue: all it took has gone out.
        self._idle = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Event | StreamEnd | _Audio) -> None:
        """Add an item; wait while the queue is full."""
        while len(self._items) >= self._maxsize:
            self._writable.clear()
            await self._writable.wait()
        self._append(item)

    async def put_audio(self, segment_index: int, data: bytes) -> None:
        """Add audio of *segment_index*, merged into the waiting tail when it fits."""
        if self._items:
            tail = self._items[-1]
            if (
                isinstance(tail, _Audio)
                and tail.segment_index == segment_index
                and tail.size + len(data) <= self._max_audio
            ):
                tail.parts.append(data)
                tail.size += len(data)
                return
        await self.put(_Audio(segment_index, [data], len(data)))

    def end(self, end: StreamEnd) -> None:
        """Drop everything waiting and make *end* the next thing taken."""
        self._items.clear()
        self._append(end)

    async def get(self) -> Event | StreamEnd:
        """Take the next item, waiting for one; merged audio comes out as one chunk."""
        while not self._items:
            self._idle.set()
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        if isinstance(item, _Audio):
            data = item.parts[0] if len(item.parts) == 1 else b"".join(item.parts)
            chunk = AudioChunk(item.segment_index, self._seq, data)
            self._seq += 1
            return chunk
        if isinstance(item, StreamEnd):
            self._items.appendleft(item)  # every later taker sees the end too
        return item

    async def delivered(self) -> None:
        """Wait until the door has sent everything put so far and asks for more."""
        await self._idle.wait()

    def _append(self, item: Event | StreamEnd | _Audio) -> None:
        self._items.append(item)
        self._idle.clear()
        self._readable.set()


class StreamOutput:
    """Announce segments and encode their audio, in order, onto the stream's queue."""

    def __init__(
        self,
        queue: EventQueue,
        encoder: EncoderRunner,
        *,
        input_rate: int,
        since: Callable[[], int],
        max_audio_s: float = 0.0,
    ) -> None:
        self.since = since
        self.finished = StreamFinished()
        self.index = -1
        #: the stream reached its audio cap: what was sent is whole once flushed.
        self.capped = False
        self._queue = queue
        self._encoder = encoder
        self._rate = input_rate
        self._samples = 0
        self._max_audio_s = max_audio_s
        self._max_samples = round(max_audio_s * input_rate) if max_audio_s else None
        self._carry = b""

    @property
    def audio_ms(self) -> int:
        return self._samples * 1000 // self._rate

    def hold_s(self) -> float:
        """Return how long the next audio may wait to go out with more.

        Zero until the listener is :data:`HOLD_LEAD_MS` ahead of playback (counted from
        the first audio byte, as if it played at once), then a share of the lead beyond
        that, up to :data:`MAX_HOLD_S`: the first audio and a listener short of audio
        never wait.
        """
        if not self.finished.audio_bytes:
            return 0.0
        played_ms = self.since() - self.finished.time_to_first_audio_ms
        spare_ms = self.audio_ms - played_ms - HOLD_LEAD_MS
        return 0.0 if spare_ms <= 0 else min(MAX_HOLD_S, spare_ms / 2000)

    def _short_of_audio(self) -> bool:
        """Whether the listener has had no audio yet or is less than the lead ahead."""
        return self.hold_s() == 0

    def figures(self, reply_text: str = "") -> StreamFinished:
        """Return the stream's figures as they stand."""
        return dataclasses.replace(
            self.finished,
            reply_text=reply_text,
            segments=self.index + 1,
            audio_ms=self.audio_ms,
            total_ms=self.since(),
        )

    async def emit(self, event: Event) -> None:
        """Put an event other than audio on the queue."""
        await self._queue.put(event)

    async def segment(self, text: str, *, spoken: str = "", text_offset: int = 0) -> None:
        """Announce the next segment; its audio starts where the stream's audio is now."""
        self.index += 1
        await self._queue.put(SegmentStarted(self.index, text, self.audio_ms, spoken, text_offset))

    async def words(self, timings: list[WordTiming], *, estimated: bool) -> None:
        """Send the current segment's words (after its audio)."""
        await self._queue.put(WordTimings(max(self.index, 0), tuple(timings), estimated))

    async def audio(self, pcm: bytes) -> None:
        """Encode PCM of the current segment and send what the encoder gives back."""
        pcm = self._carry + pcm
        if len(pcm) % 2:  # engines may split a sample across chunks
            pcm, self._carry = pcm[:-1], pcm[-1:]
        else:
            self._carry = b""
        if not pcm:
            return
        room = None if self._max_samples is None else self._max_samples - self._samples
        if room is not None and len(pcm) // 2 > room:
            self.capped = True
            pcm = pcm[: room * 2]
        while pcm:
            # The listener waits for this on the loop, but never long: once a piece is
            # out, the rest may go to a thread.
            now = self._short_of_audio()
            piece, pcm = (pcm[:MAX_LOOP_PCM_BYTES], pcm[MAX_LOOP_PCM_BYTES:]) if now else (pcm, b"")
            self._samples += len(piece) // 2
            await self._chunk(await self._encoder.encode(piece, now=now))
        if self.capped:
            raise TooLarge(
                f"the stream reached {self._max_audio_s:g} s of audio, its limit"
                " (VOXRELAY_MAX_STREAM_AUDIO_S): ask for less at once"
            )

    async def send(self, items: list[str | bytes]) -> None:
        """Send segment texts (``str``) and PCM (``bytes``) in the order given."""
        for item in items:
            if isinstance(item, str):
                await self.segment(item)
            else:
                await self.audio(item)

    async def delivered(self) -> None:
        """Wait until the door has sent every event put so far."""
        await self._queue.delivered()

    async def flush(self) -> None:
        """Send what the encoder still holds (the end of the file)."""
        await self._chunk(await self._encoder.flush(now=self._short_of_audio()))

    def close(self) -> None:
        self._encoder.close()

    async def _chunk(self, data: bytes) -> None:
        if not data:
            return
        if not self.finished.audio_bytes:
            self.finished.time_to_first_audio_ms = self.since()
        self.finished.audio_bytes += len(data)
        await self._queue.put_audio(max(self.index, 0), data)
