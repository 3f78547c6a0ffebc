"""Speak text with libespeak-ng, the embedded speech engine, in worker processes.

The processes, their fair queue and their credit are :mod:`.espeak_pool`'s. A job's wait
for a worker is not the engine's time: the stream a job is spoken through has
:meth:`_Speech.admitted`, which the core's guard awaits before it starts the first-byte
clock (:class:`~.base.QueuedStream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Coroutine
from types import TracebackType
from typing import Any

from ..errors import InvalidRequest, Unavailable, UpstreamTimeout
from ..model import Voice
from ..words import WordMark
from .base import ReadHold
from .espeak_pool import WINDOW, Job, JobState, WorkerPool, default_workers
from .espeak_worker import CREDIT, SAMPLE_RATE, job_payload

__all__ = ["EspeakEngine"]

_REFILL_AT = WINDOW // 2  # credit is topped up once this little is left
_BASE_RATE = 175  # words per minute at speed 1.0
_MIN_RATE, _MAX_RATE = 80, 450


def _rate(speed: float) -> int:
    """Turn a speed factor (0 meaning 1.0) into espeak's words per minute."""
    if speed == 0:
        speed = 1.0
    if not math.isfinite(speed) or speed < 0:
        raise InvalidRequest(f"speed must be a positive number, got {speed}")
    return min(_MAX_RATE, max(_MIN_RATE, round(_BASE_RATE * speed)))


class _Speech(AsyncGenerator[bytes, None]):
    """PCM for one text: first a turn in the pool's queue, then a worker's chunks."""

    def __init__(
        self,
        pool: WorkerPool,
        text: str,
        *,
        voice: str,
        speed: float,
        caller: str | None,
        chunk_timeout: float,
        marks: list[WordMark] | None,
    ) -> None:
        self._pool = pool
        self._marks = marks
        self._text = text
        self._voice = voice
        self._speed = speed
        self._caller = caller
        self._chunk_timeout = chunk_timeout if chunk_timeout > 0 else None
        self._job: Job | None = None
        self._closed = False

    async def admitted(self) -> None:
        """Wait for a worker to take this job: the queue's time, not the engine's."""
        if self._closed:
            raise StopAsyncIteration
        if self._job is None:
            rate = _rate(self._speed)
            identifier = await self._pool.identifier(self._voice)
            payload = job_payload(rate, WINDOW, identifier, self._text)
            self._job = self._pool.new_job(self._caller, payload)
            self._job.marks = self._marks
            self._pool.enqueue(self._job)
        if self._job.admitted.done() and not self._job.admitted.cancelled():
            self._job.admitted.result()  # a failure to start is raised here
            return
        try:
            await asyncio.shield(self._job.admitted)
        except BaseException:
            await self.aclose()
            raise

    def __anext__(self) -> Coroutine[Any, Any, bytes]:
        return self.asend(None)

    async def asend(self, value: None) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        job = self._job
        if job is None or job.state is JobState.QUEUED:
            await self.admitted()
            job = self._job
            assert job is not None
        if job.state is JobState.RUNNING and job.granted - job.taken <= _REFILL_AT:
            assert job.worker is not None
            more = job.taken + WINDOW - job.granted
            job.worker.send(CREDIT, job.id, more.to_bytes(4, "little"))
            job.granted += more
        if job.items:
            item = job.items.popleft()
        else:
            try:
                item = await job.take(self._chunk_timeout)
            except TimeoutError:
                await self.aclose()
                raise UpstreamTimeout(
                    f"espeak produced no audio for {self._chunk_timeout:g} s"
                ) from None
            except BaseException:
                await self.aclose()
                raise
        if item is None:
            self._closed = True
            raise StopAsyncIteration
        if isinstance(item, Exception):
            await self.aclose()
            raise item
        job.taken += 1
        return item

    async def athrow(
        self,
        typ: Any,
        val: Any = None,
        tb: TracebackType | None = None,
    ) -> bytes:
        await self.aclose()
        if isinstance(typ, BaseException):
            raise typ
        raise typ if val is None else val

    async def aclose(self) -> None:
        """Stop: leave the queue, or make the worker abort this job."""
        self._closed = True
        if self._job is not None:
            self._pool.close_job(self._job)

    def __del__(self) -> None:
        # Dropped without aclose(): the worker must not wait for this consumer forever.
        job = self._job
        if job is not None and job.state is not JobState.OVER:
            # The loop may be closed already, its workers gone with it.
            with contextlib.suppress(Exception):
                self._pool.close_job(job)


class EspeakEngine:
    """Speak with libespeak-ng in worker processes, off the event loop.

    *workers* processes at most (default: one per core), started when first needed
    (one at once with *prestart*, if a loop runs); each engine must be closed with
    :meth:`aclose`, which stops and reaps them.
    """

    name: str = "espeak"
    model: str = "espeak-ng"
    sample_rate: int = SAMPLE_RATE
    max_speed: float = 4.0
    validates_voices: bool = True
    reports_words: bool = True

    def __init__(
        self, default_voice: str = "en-us", *, workers: int | None = None, prestart: bool = False
    ) -> None:
        self.default_voice = default_voice
        self._pool: WorkerPool | None = WorkerPool(workers or default_workers())
        self._voices: list[Voice] | None = None
        if prestart:
            # One worker starts now, in the background, so that the first request does
            # not wait for an interpreter to start; the others start when needed.
            self._pool.prestart()

    @property
    def workers(self) -> int:
        """The most worker processes this engine runs at once."""
        return self._require_pool().size

    def _require_pool(self) -> WorkerPool:
        if self._pool is None:
            raise Unavailable("the espeak engine is closed")
        return self._pool

    async def voices(self) -> list[Voice]:
        """List espeak's voices; a voice's ``name`` is what ``voice`` accepts."""
        if self._voices is None:
            entries = await self._require_pool().voices()
            self._voices = [Voice(entry.name, entry.language) for entry in entries]
        return list(self._voices)

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
        """Yield PCM for *text* as espeak produces it, about 100 ms per chunk.

        With *marks*, espeak's word events are appended to it as their audio comes.

        *voice* is a name from :meth:`voices`, an espeak voice title or a language code
        ("" means the default voice). *instructions* has no meaning for espeak. *timeout*
        caps the wait for each chunk once a worker speaks the text; the wait for a
        worker is :meth:`~_Speech.admitted`'s, in turn with *caller*'s other jobs and
        other callers'. Closing the iterator early makes the worker abort at once.
        """
        del instructions
        return _Speech(
            self._require_pool(),
            text,
            voice=voice or self.default_voice,
            speed=speed,
            caller=caller,
            chunk_timeout=timeout,
            marks=marks,
        )

    async def aclose(self) -> None:
        """Stop the workers and reap them; streams still open fail as closed."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()
