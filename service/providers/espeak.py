"""Speak text with libespeak-ng, the embedded speech engine, in worker processes.

libespeak-ng keeps global state, is not thread-safe, and has had out-of-bounds reads on
crafted text. So it runs in worker processes (:mod:`.espeak_worker`), each loading the
library once and speaking one job at a time; a worker that dies fails only the job it
was speaking and is replaced. Workers are fresh interpreters (fork and exec, never a bare
fork of this process, which may run grpc: vfork and exec, as ``subprocess`` does), started
when first needed.

Jobs wait for a worker in a queue that is fair across callers: a free worker takes the
oldest job of the next caller in turn, so one caller's many segments never delay
another's one behind all of them. That wait is not the engine's time: the stream a job
is spoken through has :meth:`_Speech.admitted`, which the core's guard awaits before
it starts the first-byte clock (:class:`~.base.QueuedStream`).

A job runs at most :data:`WINDOW` chunks ahead of its consumer: the worker sends a chunk
only against credit, and credit comes back as the consumer takes chunks. A stream whose
listener stops reading therefore stops its worker, and closing it mid-way makes the
worker abort (espeak's synth callback returns 1). A worker so stopped is idle but not
free; when another job waits for it, its job is let run to its end (one segment, whose
rest is then held here) so that a listener who does not read never keeps a worker from
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, cast

from ..errors import Internal, InvalidRequest, Unavailable, UpstreamError, UpstreamTimeout
from ..model import Voice
from ..words import WordMark
from .espeak_worker import (
    AUDIO,
    CANCEL,
    CREDIT,
    END,
    HEADER,
    HELLO,
    JOB,
    SAMPLE_RATE,
    WORD,
    WORDS,
    frame,
    job_payload,
)

__all__ = ["WINDOW", "EspeakEngine", "default_workers"]

log = logging.getLogger(__name__)

#: Chunks (~100 ms each) a job may have made beyond what its consumer has taken.
WINDOW = 64
_UNBOUNDED = 2**32 - 1  # the credit of a job let run to its end
_REFILL_AT = WINDOW // 2  # credit is topped up once this little is left
_WORKER_MODULE = f"{__package__}.espeak_worker"
_BOOT_TIMEOUT_S = 30.0
#: How long a cancelled job's worker may take to stop: it looks for the cancel every few
#: chunks, so one that has not stopped by then is stuck inside the library.
_CANCEL_GRACE_S = 5.0
_STOP_TIMEOUT_S = 5.0
_BASE_RATE = 175  # words per minute at speed 1.0
_MIN_RATE, _MAX_RATE = 80, 450


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class _VoiceEntry:
    """One voice as espeak lists it, with the name voxrelay offers for it."""

    name: str  # the identifier's last part, lower case: "en-us", "fr", "de"
    language: str  # its main language: "en-us", "fr-fr", "de"
    identifier: str  # the voice file: "gmw/en-US"
    title: str  # espeak's display name: "English (America)"
    languages: tuple[tuple[int, str], ...]  # (priority, language); lower priority wins


def _resolve(entries: list[_VoiceEntry], voice: str) -> str:
    """Return the identifier of the voice named *voice*: a name, title or language."""
    key = voice.strip().lower().replace("_", "-")
    for entry in entries:
        if key in (entry.name, entry.identifier.lower(), entry.title.lower()):
            return entry.identifier
    # espeak's own match by language is too loose ("no-such-voice" finds Norwegian),
    # so match exact language codes here, best priority first.
    by_language = [
        (priority, entry.identifier)
        for entry in entries
        for priority, language in entry.languages
        if language.lower() == key
    ]
    if by_language:
        return min(by_language, key=lambda pair: pair[0])[1]
    raise InvalidRequest(
        f"unknown espeak voice {voice!r}; see `voxrelay voices` (or the ListVoices RPC) "
        "for the voices espeak offers"
    )


def _rate(speed: float) -> int:
    """Turn a speed factor (0 meaning 1.0) into espeak's words per minute."""
    if speed == 0:
        speed = 1.0
    if not math.isfinite(speed) or speed < 0:
        raise InvalidRequest(f"speed must be a positive number, got {speed}")
    return min(_MAX_RATE, max(_MIN_RATE, round(_BASE_RATE * speed)))


class _State(Enum):
    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # a worker speaks it
    OVER = "over"  # ended, failed or closed: nothing more goes to its consumer


class _Job:
    """One synthesis as the parent sees it: queued, then spoken by one worker."""

    def __init__(self, job_id: int, caller: str | None, payload: bytes) -> None:
        self.id = job_id
        self.caller = caller
        self.payload = payload
        self.state = _State.QUEUED
        self.admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # What the consumer has yet to take; ``waiter`` wakes it when it waits for more.
        self.items: deque[bytes | Exception | None] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.worker: _Worker | None = None
        #: the engine's word events, as they come (a consumer's list, or None).
        self.marks: list[WordMark] | None = None
        self.granted = WINDOW  # chunks the worker may make in all, so far
        self.received = 0  # chunks the worker has sent
        self.taken = 0  # chunks the consumer has taken

    def put(self, item: bytes | Exception | None) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, within_s: float | None) -> bytes | Exception | None:
        """Return the next item, waiting up to *within_s* for it; else TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = None if within_s is None else loop.time() + within_s
        while not self.items:
            waiter = self.waiter = loop.create_future()
            # One timer on the waiter, cheaper than a timeout context on the task: a
            # stream waits for hundreds of chunks a second.
            timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
        return self.items.popleft()

    @property
    def stalled(self) -> bool:
        """Whether its worker waits for credit: the consumer has not taken enough."""
        return self.state is _State.RUNNING and self.received >= self.granted

    def end(self, item: Exception | None) -> None:
        """Give the consumer its last item: the end, or why the job failed."""
        if self.state is not _State.OVER:
            self.state = _State.OVER
            self.put(item)
        if not self.admitted.done():
            if item is None:
                self.admitted.set_result(None)
            else:
                self.admitted.set_exception(item)
                self.admitted.exception()  # the consumer may have gone; never "unretrieved"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Worker(asyncio.Protocol):
    """The parent's side of one worker process: its socket, its process, its job."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.process: subprocess.Popen[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.job: _Job | None = None  # the job it speaks, until that job's END arrives
        self._buffer = bytearray()
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they write the same.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER.size:
            kind, job_id, size = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            payload = bytes(buffer[start + HEADER.size : end])
            start = end
            self._on_message(kind, job_id, payload)
        del buffer[:start]

    def _on_message(self, kind: int, job_id: int, payload: bytes) -> None:
        job = self.job
        if kind == AUDIO:
            if job is not None and job.id == job_id and job.state is _State.RUNNING:
                job.put(payload)
                job.received += 1
                if job.stalled:
                    self.pool.on_stalled()
        elif kind == WORDS:
            if job is not None and job.id == job_id and job.marks is not None:
                job.marks.extend(WordMark(*fields) for fields in WORD.iter_unpack(payload))
        elif kind == END:
            if job is not None and job.id == job_id:
                self._disarm()
                error = json.loads(payload)["error"]
                job.end(Internal(f"espeak-ng: {error}") if error else None)
                self.job = None
                self.pool.on_free(self, job)
        elif kind == HELLO and not self.hello.done():
            self.hello.set_result(json.loads(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self.hello.done():
            self.hello.set_exception(Unavailable("an espeak worker exited while starting"))
            self.hello.exception()
        self.pool.on_lost(self)

    def send(self, kind: int, job_id: int, payload: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(kind, job_id, payload))

    def cancel(self, job: _Job) -> None:
        """Make this worker abort *job*; kill it if it has not stopped within the grace."""
        self.send(CANCEL, job.id)
        if self._watchdog is None:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(_CANCEL_GRACE_S, self._stuck, job)

    def _stuck(self, job: _Job) -> None:
        self._watchdog = None
        if self.job is job and self.process is not None:
            log.warning("an espeak worker did not stop a cancelled job; killing it")
            self.process.kill()  # its socket closes: connection_lost replaces it

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def start(self, job: _Job) -> None:
        """Give *job* to this (free) worker."""
        self.job = job
        job.worker = self
        job.state = _State.RUNNING
        self.send(JOB, job.id, job.payload)
        job.admitted.set_result(None)

    async def stop(self) -> None:
        """Close the socket (the worker exits on its end), then reap the process."""
        if self.transport is not None:
            self.transport.close()
        process = self.process
        if process is None:
            return
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                await _exited(process)
        except TimeoutError:
            process.kill()
            await _exited(process)


async def _exited(process: subprocess.Popen[bytes]) -> None:
    """Wait for *process* to exit, and reap it, without blocking the loop."""
    if process.poll() is not None:
        return
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux 5.3+: a thread waits instead
        await asyncio.to_thread(process.wait)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:  # a pidfd turns readable once, for good, when the process exits
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    process.wait()  # it has exited: this reaps it at once


class _Pool:
    """Worker processes, started on demand up to *size*, and the fair queue before them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers: set[_Worker] = set()  # started and greeted
        self._idle: deque[_Worker] = deque()
        self._booting: set[asyncio.Task[_Worker]] = set()
        self._reaping: set[asyncio.Task[None]] = set()
        # Waiting jobs by caller. A free worker serves the caller whose last turn is the
        # oldest (never served first; ties in order of arrival), so that one caller's
        # many jobs take turns with another's one.
        self._waiting: dict[str | None, deque[_Job]] = {}
        self._queued = 0
        self._turns = 0
        self._last_turn: dict[str | None, int] = {}  # of callers with a job waiting or running
        self._running: dict[str | None, int] = {}
        self._voices: list[_VoiceEntry] | None = None
        self._identifiers: dict[str, str] = {}  # voice as asked → identifier
        self._next_id = 0
        self.closed = False

    # The queue

    def new_job(self, caller: str | None, payload: bytes) -> _Job:
        self._next_id = (self._next_id + 1) % 2**32
        return _Job(self._next_id, caller, payload)

    def enqueue(self, job: _Job) -> None:
        if self.closed:
            raise Unavailable("the espeak engine is closed")
        self._waiting.setdefault(job.caller, deque()).append(job)
        self._queued += 1
        self._dispatch()

    def close_job(self, job: _Job) -> None:
        """Forget *job*: out of the queue, or cancelled on its worker. Idempotent."""
        if job.state is _State.QUEUED:
            jobs = self._waiting.get(job.caller)
            if jobs is not None and job in jobs:
                jobs.remove(job)
                self._queued -= 1
                if not jobs:
                    del self._waiting[job.caller]
                    self._forget_if_idle(job.caller)
        elif job.state is _State.RUNNING and job.worker is not None:
            # The worker stays this job's until its END: it aborts within a few chunks.
            job.worker.cancel(job)
        job.state = _State.OVER
        if not job.admitted.done():
            job.admitted.cancel()

    def _dispatch(self) -> None:
        while self._idle and self._waiting:
            last_turn = self._last_turn
            caller = min(self._waiting, key=lambda c: last_turn.get(c, -1))
            jobs = self._waiting[caller]
            job = jobs.popleft()
            self._queued -= 1
            if not jobs:
                del self._waiting[caller]
            self._turns += 1
            last_turn[caller] = self._turns
            self._running[caller] = self._running.get(caller, 0) + 1
            self._idle.popleft().start(job)
        missing = self._queued - len(self._booting)
        while missing > 0 and len(self.workers) + len(self._booting) < self.size:
            self._boot()
            missing -= 1
        if missing > 0:
            self.on_stalled()

    def on_stalled(self) -> None:
        """Let stalled jobs run to their end while jobs wait that no worker will take."""
        missing = self._queued - len(self._booting)
        if missing <= 0:
            return
        for worker in self.workers:
            job = worker.job
            if job is not None and job.stalled:
                worker.send(CREDIT, job.id, (_UNBOUNDED - job.granted).to_bytes(4, "little"))
                job.granted = _UNBOUNDED
                missing -= 1
                if missing == 0:
                    return

    def _finished(self, job: _Job) -> None:
        """Note that *job*'s worker is done with it; forget callers with nothing left."""
        caller = job.caller
        running = self._running.get(caller, 0) - 1
        if running > 0:
            self._running[caller] = running
            return
        self._running.pop(caller, None)
        self._forget_if_idle(caller)

    def _forget_if_idle(self, caller: str | None) -> None:
        if caller not in self._waiting and caller not in self._running:
            self._last_turn.pop(caller, None)

    def on_free(self, worker: _Worker, job: _Job) -> None:
        self._finished(job)
        if worker in self.workers:
            self._idle.append(worker)
            self._dispatch()

    def on_lost(self, worker: _Worker) -> None:
        """A worker's socket closed: it exited, crashed or was killed."""
        was_ours = worker in self.workers
        self.workers.discard(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        job, worker.job = worker.job, None
        if job is not None:
            self._finished(job)
            job.end(
                UpstreamError(
                    "the espeak worker speaking this text stopped unexpectedly",
                    retryable=True,
                )
            )
        if was_ours and not self.closed:
            log.warning(
                "an espeak worker died; another starts when needed", extra={"pid": worker.pid}
            )
            task = asyncio.get_running_loop().create_task(worker.stop())
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)
            self._dispatch()  # a replacement, if jobs wait

    # Workers

    def _boot(self) -> asyncio.Task[_Worker]:
        task = asyncio.get_running_loop().create_task(self._start_worker())
        self._booting.add(task)
        task.add_done_callback(self._booted)
        return task

    def _booted(self, task: asyncio.Task[_Worker]) -> None:
        self._booting.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            worker = task.result()
            if self.closed:
                return  # aclose() stops it
            self.workers.add(worker)
            self._idle.append(worker)
            self._dispatch()
            return
        log.error("an espeak worker failed to start: %s", error)
        if not self.workers and not self._booting:
            # Nothing can speak the jobs that wait: fail them, rather than wait forever.
            failure = error if isinstance(error, Unavailable) else Unavailable(str(error))
            for jobs in self._waiting.values():
                for job in jobs:
                    job.end(failure)
            self._waiting.clear()
            self._queued = 0
            self._last_turn = {c: t for c, t in self._last_turn.items() if c in self._running}

    async def _start_worker(self) -> _Worker:
        loop = asyncio.get_running_loop()
        worker = _Worker(self)
        ours, theirs = socket.socketpair()
        try:
            # In a thread: vfork and exec pause only the thread that calls them.
            spawning = asyncio.ensure_future(
                asyncio.to_thread(
                    subprocess.Popen,
                    [sys.executable, "-m", _WORKER_MODULE, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    # Out of the server's process group: a signal to the group (Ctrl-C,
                    # a supervisor's SIGTERM) is the server's to handle, and the worker
                    # exits when the server closes its socket.
                    start_new_session=True,
                )
            )
            try:
                worker.process = await asyncio.shield(spawning)
            except asyncio.CancelledError:
                # The thread goes on and spawns the process: own it, to reap it.
                worker.process = await spawning
                raise
            finally:
                theirs.close()  # once the spawn is over: the child has its copy
            await loop.create_unix_connection(lambda: worker, sock=ours)
        except BaseException:
            ours.close()
            await worker.stop()
            raise
        try:
            async with asyncio.timeout(_BOOT_TIMEOUT_S):
                hello = await worker.hello
            if "error" in hello:
                raise Unavailable(str(hello["error"]))
        except BaseException:
            await worker.stop()
            raise
        if self._voices is None:
            self._voices = [
                _VoiceEntry(
                    name,
                    language,
                    identifier,
                    title,
                    tuple((int(priority), str(code)) for priority, code in languages),
                )
                for name, language, identifier, title, languages in hello["voices"]
            ]
        return worker

    async def identifier(self, voice: str) -> str:
        """Return the identifier of the voice *voice* names, or raise InvalidRequest."""
        identifier = self._identifiers.get(voice)
        if identifier is None:
            identifier = _resolve(await self.voices(), voice)
            if len(self._identifiers) < 4096:  # callers choose the names: keep it bounded
                self._identifiers[voice] = identifier
        return identifier

    def prestart(self) -> None:
        """Start one worker in the background, if a loop runs and none is up or starting."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if not self.workers and not self._booting:
            self._boot()

    async def voices(self) -> list[_VoiceEntry]:
        """Return the voices, starting a worker to list them if none has yet."""
        while self._voices is None:
            if self.closed:
                raise Unavailable("the espeak engine is closed")
            booting = next(iter(self._booting), None) or self._boot()
            await asyncio.shield(booting)
        return self._voices

    async def aclose(self) -> None:
        """Fail what waits, stop every worker and reap it."""
        self.closed = True
        closed = Unavailable("the espeak engine is closed")
        for jobs in self._waiting.values():
            for job in jobs:
                job.end(closed)
        self._waiting.clear()
        self._queued = 0
        for task in self._booting:
            task.cancel()
        booted = await asyncio.gather(*self._booting, return_exceptions=True)
        workers = self.workers | {w for w in booted if isinstance(w, _Worker)}
        self.workers.clear()
        self._idle.clear()
        for worker in workers:
            if worker.job is not None:
                worker.job.end(closed)
        await asyncio.gather(*(worker.stop() for worker in workers), *self._reaping)


class _Speech(AsyncGenerator[bytes, None]):
    """PCM for one text: first a turn in the pool's queue, then a worker's chunks."""

    def __init__(
        self,
        pool: _Pool,
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
        self._job: _Job | None = None
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
        if job is None or job.state is _State.QUEUED:
            await self.admitted()
            job = self._job
            assert job is not None
        if job.state is _State.RUNNING and job.granted - job.taken <= _REFILL_AT:
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
        if job is not None and job.state is not _State.OVER:
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
        self._pool: _Pool | None = _Pool(workers or default_workers())
        self._voices: list[Voice] | None = None
        if prestart:
            # One worker starts now, in the background, so that the first request does
            # not wait for an interpreter to start; the others start when needed.
            self._pool.prestart()

    @property
    def workers(self) -> int:
        """The most worker processes this engine runs at once."""
        return self._require_pool().size

    def _require_pool(self) -> _Pool:
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
