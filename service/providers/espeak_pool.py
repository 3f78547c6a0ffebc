"""The espeak engine's worker processes: a fair queue of jobs, credit, crashes, cancels.

libespeak-ng keeps global state, is not thread-safe, and has had out-of-bounds reads on
crafted text. So it runs in worker processes (:mod:`.espeak_worker`), each loading the
library once and speaking one job at a time; a worker that dies fails only the job it
was speaking and is replaced. Workers are fresh interpreters (fork and exec, never a bare
fork of this process, which may run grpc: vfork and exec, as ``subprocess`` does), started
when first needed.

Jobs wait for a worker in a queue that is fair across callers: a free worker takes the
oldest job of the next caller in turn, so one caller's many segments never delay
another's one behind all of them.

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
import json
import logging
import os
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from ..errors import Internal, InvalidRequest, Unavailable, UpstreamError
from ..words import WordMark
from .espeak_worker import (
    AUDIO,
    CANCEL,
    CREDIT,
    END,
    HEADER,
    HELLO,
    JOB,
    WORD,
    WORDS,
    frame,
)

__all__ = ["WINDOW", "Job", "JobState", "VoiceEntry", "Worker", "WorkerPool", "default_workers"]

log = logging.getLogger(__name__)

#: Chunks (~100 ms each) a job may have made beyond what its consumer has taken.
WINDOW = 64
_UNBOUNDED = 2**32 - 1  # the credit of a job let run to its end
_WORKER_MODULE = f"{__package__}.espeak_worker"
_BOOT_TIMEOUT_S = 30.0
#: How long a cancelled job's worker may take to stop: it looks for the cancel every few
#: chunks, so one that has not stopped by then is stuck inside the library.
_CANCEL_GRACE_S = 5.0
_STOP_TIMEOUT_S = 5.0


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class VoiceEntry:
    """One voice as espeak lists it, with the name voxrelay offers for it."""

    name: str  # the identifier's last part, lower case: "en-us", "fr", "de"
    language: str  # its main language: "en-us", "fr-fr", "de"
    identifier: str  # the voice file: "gmw/en-US"
    title: str  # espeak's display name: "English (America)"
    languages: tuple[tuple[int, str], ...]  # (priority, language); lower priority wins


def _resolve(entries: list[VoiceEntry], voice: str) -> str:
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


class JobState(Enum):
    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # a worker speaks it
    OVER = "over"  # ended, failed or closed: nothing more goes to its consumer


class Job:
    """One synthesis as the parent sees it: queued, then spoken by one worker."""

    def __init__(self, job_id: int, caller: str | None, payload: bytes) -> None:
        self.id = job_id
        self.caller = caller
        self.payload = payload
        self.state = JobState.QUEUED
        self.admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # What the consumer has yet to take; ``waiter`` wakes it when it waits for more.
        self.items: deque[bytes | Exception | None] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.worker: Worker | None = None
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
        return self.state is JobState.RUNNING and self.received >= self.granted

    def end(self, item: Exception | None) -> None:
        """Give the consumer its last item: the end, or why the job failed."""
        if self.state is not JobState.OVER:
            self.state = JobState.OVER
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


class Worker(asyncio.Protocol):
    """The parent's side of one worker process: its socket, its process, its job."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.process: subprocess.Popen[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.job: Job | None = None  # the job it speaks, until that job's END arrives
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
            if job is not None and job.id == job_id and job.state is JobState.RUNNING:
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

    def cancel(self, job: Job) -> None:
        """Make this worker abort *job*; kill it if it has not stopped within the grace."""
        self.send(CANCEL, job.id)
        if self._watchdog is None:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(_CANCEL_GRACE_S, self._stuck, job)

    def _stuck(self, job: Job) -> None:
        self._watchdog = None
        if self.job is job and self.process is not None:
            log.warning("an espeak worker did not stop a cancelled job; killing it")
            self.process.kill()  # its socket closes: connection_lost replaces it

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def start(self, job: Job) -> None:
        """Give *job* to this (free) worker."""
        self.job = job
        job.worker = self
        job.state = JobState.RUNNING
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


class WorkerPool:
    """Worker processes, started on demand up to *size*, and the fair queue before them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers: set[Worker] = set()  # started and greeted
        self._idle: deque[Worker] = deque()
        self._booting: set[asyncio.Task[Worker]] = set()
        self._reaping: set[asyncio.Task[None]] = set()
        # Waiting jobs by caller. A free worker serves the caller whose last turn is the
        # oldest (never served first; ties in order of arrival), so that one caller's
        # many jobs take turns with another's one.
        self._waiting: dict[str | None, deque[Job]] = {}
        self._queued = 0
        self._turns = 0
        self._last_turn: dict[str | None, int] = {}  # of callers with a job waiting or running
        self._running: dict[str | None, int] = {}
        self._voices: list[VoiceEntry] | None = None
        self._identifiers: dict[str, str] = {}  # voice as asked → identifier
        self._next_id = 0
        self.closed = False

    # The queue

    def new_job(self, caller: str | None, payload: bytes) -> Job:
        self._next_id = (self._next_id + 1) % 2**32
        return Job(self._next_id, caller, payload)

    def enqueue(self, job: Job) -> None:
        if self.closed:
            raise Unavailable("the espeak engine is closed")
        self._waiting.setdefault(job.caller, deque()).append(job)
        self._queued += 1
        self._dispatch()

    def close_job(self, job: Job) -> None:
        """Forget *job*: out of the queue, or cancelled on its worker. Idempotent."""
        if job.state is JobState.QUEUED:
            jobs = self._waiting.get(job.caller)
            if jobs is not None and job in jobs:
                jobs.remove(job)
                self._queued -= 1
                if not jobs:
                    del self._waiting[job.caller]
                    self._forget_if_idle(job.caller)
        elif job.state is JobState.RUNNING and job.worker is not None:
            # The worker stays this job's until its END: it aborts within a few chunks.
            job.worker.cancel(job)
        job.state = JobState.OVER
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

    def _finished(self, job: Job) -> None:
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

    def on_free(self, worker: Worker, job: Job) -> None:
        self._finished(job)
        if worker in self.workers:
            self._idle.append(worker)
            self._dispatch()

    def on_lost(self, worker: Worker) -> None:
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

    def _boot(self) -> asyncio.Task[Worker]:
        task = asyncio.get_running_loop().create_task(self._start_worker())
        self._booting.add(task)
        task.add_done_callback(self._booted)
        return task

    def _booted(self, task: asyncio.Task[Worker]) -> None:
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

    async def _start_worker(self) -> Worker:
        loop = asyncio.get_running_loop()
        worker = Worker(self)
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
                VoiceEntry(
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

    async def voices(self) -> list[VoiceEntry]:
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
        workers = self.workers | {w for w in booted if isinstance(w, Worker)}
        self.workers.clear()
        self._idle.clear()
        for worker in workers:
            if worker.job is not None:
                worker.job.end(closed)
        await asyncio.gather(*(worker.stop() for worker in workers), *self._reaping)
