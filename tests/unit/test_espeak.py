"""The embedded espeak-ng engine: real synthesis through libespeak-ng in worker processes."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Callable

import pytest

from voxrelay.service.errors import InvalidRequest, Unavailable, UpstreamError, UpstreamTimeout
from voxrelay.service.providers import espeak, espeak_pool, espeak_worker
from voxrelay.service.providers.base import QueuedStream, SpeechEngine
from voxrelay.service.providers.espeak import WINDOW, EspeakEngine

HELLO = "Hello world. This is voxrelay."
LONG = (
    "The quick brown fox jumps over the lazy dog, while the gateway streams speech "
    "sentence by sentence to every caller that asked for it. "
) * 6
WAIT = 30.0  # safety net for awaits on a worker


@pytest.fixture
async def engine() -> AsyncIterator[EspeakEngine]:
    engine = EspeakEngine(workers=2)
    yield engine
    await engine.aclose()


@pytest.fixture
async def one_worker() -> AsyncIterator[EspeakEngine]:
    engine = EspeakEngine(workers=1)
    await engine.voices()  # its one worker is up
    yield engine
    await engine.aclose()


def speak(
    engine: EspeakEngine, text: str, *, voice: str = "", speed: float = 1.0, caller: str = ""
) -> espeak._Speech:
    stream = engine.synthesize(
        text, voice=voice, speed=speed, instructions="", timeout=WAIT, caller=caller or None
    )
    assert isinstance(stream, espeak._Speech)
    return stream


async def chunks_of(
    engine: EspeakEngine, text: str, *, voice: str = "", speed: float = 1.0, caller: str = ""
) -> list[bytes]:
    return [chunk async for chunk in speak(engine, text, voice=voice, speed=speed, caller=caller)]


def seconds(engine: EspeakEngine, pcm: bytes) -> float:
    return len(pcm) / 2 / engine.sample_rate


def peak(pcm: bytes) -> int:
    return max(abs(sample) for sample in array.array("h", pcm))


def worker_pid(stream: espeak._Speech) -> int:
    job = stream._job
    assert job is not None and job.worker is not None and job.worker.pid is not None
    return job.worker.pid


def reaped(pid: int) -> bool:
    """Whether *pid* is gone for good (a zombie still answers signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Watch:
    """What the parent hears from its workers: chunks and END summaries, by job."""

    def __init__(self) -> None:
        self.chunks: dict[int, int] = {}
        self.ends: dict[int, dict[str, object]] = {}
        self._heard = asyncio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await self._heard.wait()

    def hear(self, kind: int, job_id: int, payload: bytes) -> None:
        if kind == espeak_worker.AUDIO:
            self.chunks[job_id] = self.chunks.get(job_id, 0) + 1
        elif kind == espeak_worker.END:
            self.ends[job_id] = json.loads(payload)
        self._heard.set()
        self._heard = asyncio.Event()


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Watch:
    watch = Watch()
    original = espeak_pool.Worker._on_message

    def on_message(worker: espeak_pool.Worker, kind: int, job_id: int, payload: bytes) -> None:
        watch.hear(kind, job_id, payload)
        original(worker, kind, job_id, payload)

    monkeypatch.setattr(espeak_pool.Worker, "_on_message", on_message)
    return watch


def job_id(stream: espeak._Speech) -> int:
    assert stream._job is not None
    return stream._job.id


async def test_engine_is_a_speech_engine() -> None:
    engine: SpeechEngine = EspeakEngine()
    assert (engine.name, engine.sample_rate, engine.default_voice) == ("espeak", 22050, "en-us")
    assert engine.model.startswith("espeak-ng")
    assert isinstance(
        engine.synthesize("x", voice="", speed=1, instructions="", timeout=1), QueuedStream
    )
    await engine.aclose()


async def test_speaks_a_sentence_in_several_chunks_in_another_process(
    engine: EspeakEngine,
) -> None:
    stream = speak(engine, HELLO)
    chunks = [await anext(stream)]
    assert worker_pid(stream) != os.getpid()
    chunks += [chunk async for chunk in stream]
    pcm = b"".join(chunks)
    assert len(chunks) > 1
    assert 1.0 < seconds(engine, pcm) < 4.0
    assert peak(pcm) > 1000


async def test_voices_are_named_as_voice_accepts_them(engine: EspeakEngine) -> None:
    voices = await engine.voices()
    names = {voice.name for voice in voices}
    assert {"en-us", "en", "de", "fr", "es"} <= names
    assert len(names) == len(voices) > 50
    assert len({voice.language.split("-")[0] for voice in voices}) > 30
    assert next(v for v in voices if v.name == "en-us").language == "en-us"
    for name in ("de", "fr", "EN-US"):
        assert seconds(engine, b"".join(await chunks_of(engine, "Bonjour", voice=name))) > 0.3
    assert await engine.voices() == voices


async def test_a_language_code_finds_its_voice(engine: EspeakEngine) -> None:
    for code in ("fr-fr", "en-gb", "pt-br", "zh"):
        assert b"".join(await chunks_of(engine, "one", voice=code))


async def test_unknown_voice_is_an_invalid_request(engine: EspeakEngine) -> None:
    # espeak's own language match would pick Norwegian for this one.
    with pytest.raises(InvalidRequest, match="voxrelay voices"):
        await chunks_of(engine, HELLO, voice="no-such-voice")
    assert await chunks_of(engine, HELLO)


async def test_double_speed_is_clearly_shorter(engine: EspeakEngine) -> None:
    normal = seconds(engine, b"".join(await chunks_of(engine, HELLO, speed=1.0)))
    fast = seconds(engine, b"".join(await chunks_of(engine, HELLO, speed=2.0)))
    default = seconds(engine, b"".join(await chunks_of(engine, HELLO, speed=0)))
    assert fast < 0.7 * normal
    assert default == pytest.approx(normal, rel=0.05)
    with pytest.raises(InvalidRequest):
        await chunks_of(engine, HELLO, speed=-1)


async def test_markup_is_spoken_as_text(engine: EspeakEngine) -> None:
    plain = seconds(engine, b"".join(await chunks_of(engine, "hello")))
    tagged = seconds(engine, b"".join(await chunks_of(engine, "<speak>hello</speak>")))
    assert tagged > 1.5 * plain


async def test_concurrent_streams_both_complete(engine: EspeakEngine) -> None:
    solo_a = seconds(engine, b"".join(await chunks_of(engine, HELLO)))
    solo_b = seconds(engine, b"".join(await chunks_of(engine, LONG, voice="de")))
    a, b = await asyncio.gather(chunks_of(engine, HELLO), chunks_of(engine, LONG, voice="de"))
    assert seconds(engine, b"".join(a)) == pytest.approx(solo_a, rel=0.02)
    assert seconds(engine, b"".join(b)) == pytest.approx(solo_b, rel=0.02)


async def test_a_listener_that_stops_reading_stops_its_worker(
    one_worker: EspeakEngine, watch: Watch
) -> None:
    whole = len(await chunks_of(one_worker, LONG))
    assert whole > 2 * WINDOW
    stream = speak(one_worker, LONG)
    await anext(stream)
    job = job_id(stream)
    await watch.until(lambda: watch.chunks.get(job, 0) >= WINDOW)  # all its credit used
    # Time for a worker without backpressure to run on; this one waits for credit.
    await asyncio.sleep(0.3)
    assert watch.chunks[job] == WINDOW
    assert job not in watch.ends
    # Reading again lets it go on, to the whole text.
    rest = [chunk async for chunk in stream]
    assert 1 + len(rest) == pytest.approx(whole, rel=0.02)
    await watch.until(lambda: job in watch.ends)
    assert watch.ends[job] == {"chunks": 1 + len(rest), "cancelled": False, "error": None}


async def test_a_listener_that_stops_reading_keeps_no_worker_from_others(
    one_worker: EspeakEngine, watch: Watch
) -> None:
    whole = await chunks_of(one_worker, LONG)
    idle = speak(one_worker, LONG, caller="idle")
    first = await anext(idle)
    stalled = job_id(idle)
    await watch.until(lambda: watch.chunks.get(stalled, 0) >= WINDOW)
    # Another caller's job needs the one worker: the stalled job is let run to its end.
    assert await asyncio.wait_for(chunks_of(one_worker, HELLO, caller="busy"), WAIT)
    assert watch.ends[stalled]["cancelled"] is False
    rest = [chunk async for chunk in idle]
    assert watch.ends[stalled]["chunks"] == 1 + len(rest) > 2 * WINDOW
    assert seconds(one_worker, first + b"".join(rest)) == pytest.approx(
        seconds(one_worker, b"".join(whole)), rel=0.02
    )


async def test_closing_mid_job_makes_the_worker_abort(
    one_worker: EspeakEngine, watch: Watch
) -> None:
    whole = await chunks_of(one_worker, LONG)
    stream = speak(one_worker, LONG)
    for _ in range(3):
        await anext(stream)
    cut = job_id(stream)
    await stream.aclose()
    # The worker's END says it stopped early; nothing waits for a consumer that left.
    await watch.until(lambda: cut in watch.ends)
    assert watch.ends[cut]["cancelled"] is True
    assert watch.chunks[cut] <= 3 + WINDOW < len(whole)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    # The one worker is free, and speaks the next text whole.
    again = await chunks_of(one_worker, LONG)
    assert seconds(one_worker, b"".join(again)) == pytest.approx(
        seconds(one_worker, b"".join(whole)), rel=0.02
    )


async def test_a_cancelled_consumer_stops_its_job(one_worker: EspeakEngine, watch: Watch) -> None:
    got_one = asyncio.Event()
    ids: list[int] = []

    async def consume() -> None:
        stream = speak(one_worker, LONG * 4)
        async for _ in stream:
            ids.append(job_id(stream))
            got_one.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await watch.until(lambda: ids[0] in watch.ends)
    assert watch.ends[ids[0]]["cancelled"] is True
    assert 1.0 < seconds(one_worker, b"".join(await chunks_of(one_worker, HELLO))) < 4.0


async def test_jobs_are_served_in_turn_across_callers(one_worker: EspeakEngine) -> None:
    served: list[str] = []

    async def job(caller: str, name: str) -> int:
        stream = speak(one_worker, HELLO, caller=caller)
        await stream.admitted()
        served.append(name)
        return len([chunk async for chunk in stream])

    a_jobs = [asyncio.create_task(job("a", f"a{n}")) for n in range(10)]
    await asyncio.sleep(0)  # all ten are in the queue before b's one
    b_job = asyncio.create_task(job("b", "b"))
    await asyncio.wait_for(asyncio.gather(*a_jobs, b_job), WAIT)
    assert sorted(served) == sorted([f"a{n}" for n in range(10)] + ["b"])
    # b waits only for the job a has running: a has had its turn.
    assert served.index("b") == 1, served
    pool = one_worker._require_pool()
    assert not pool._last_turn and not pool._running  # nothing kept of callers gone


async def test_a_worker_crash_fails_only_the_stream_it_was_speaking(
    engine: EspeakEngine,
) -> None:
    solo = seconds(engine, b"".join(await chunks_of(engine, LONG)))
    victim, bystander = speak(engine, LONG, caller="a"), speak(engine, LONG, caller="b")
    await anext(victim)
    first = await anext(bystander)
    pid = worker_pid(victim)
    assert pid != worker_pid(bystander)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(UpstreamError, match="stopped unexpectedly") as caught:
        async for _ in victim:
            pass
    assert caught.value.retryable
    rest = [chunk async for chunk in bystander]
    assert seconds(engine, first + b"".join(rest)) == pytest.approx(solo, rel=0.02)
    # The dead worker is reaped, and a new one speaks the next request.
    await asyncio.wait_for(asyncio.gather(*engine._require_pool()._reaping), WAIT)
    assert reaped(pid)
    after = [speak(engine, HELLO), speak(engine, HELLO)]
    chunks = [await anext(stream) for stream in after]
    assert pid not in {worker_pid(stream) for stream in after}
    for stream, chunk in zip(after, chunks, strict=True):
        pcm = chunk + b"".join([c async for c in stream])
        assert 1.0 < seconds(engine, pcm) < 4.0


async def test_a_stalled_worker_times_out_and_is_not_waited_for(one_worker: EspeakEngine) -> None:
    stream = one_worker.synthesize(LONG, voice="", speed=1.0, instructions="", timeout=0.2)
    assert isinstance(stream, espeak._Speech)
    await anext(stream)
    pid = worker_pid(stream)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(UpstreamTimeout):
            async for _ in stream:
                pass
    finally:
        os.kill(pid, signal.SIGCONT)
    # The worker aborts the job it was given up on, and speaks the next one.
    assert 1.0 < seconds(one_worker, b"".join(await chunks_of(one_worker, HELLO))) < 4.0


async def test_a_worker_stuck_in_a_cancelled_job_is_killed_and_replaced(
    one_worker: EspeakEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(espeak_pool, "_CANCEL_GRACE_S", 0.2)
    stream = speak(one_worker, LONG)
    await anext(stream)
    pid = worker_pid(stream)
    os.kill(pid, signal.SIGSTOP)  # as if caught in a loop inside the library
    try:
        await stream.aclose()
        # The next job gets a new worker once the stuck one is killed.
        spoken = await asyncio.wait_for(chunks_of(one_worker, HELLO), WAIT)
        assert 1.0 < seconds(one_worker, b"".join(spoken)) < 4.0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(asyncio.gather(*one_worker._require_pool()._reaping), WAIT)
    assert reaped(pid)


async def test_close_stops_and_reaps_every_worker() -> None:
    engine = EspeakEngine(workers=2)
    held = speak(engine, LONG)
    await anext(held)
    spoken = await chunks_of(engine, HELLO)
    assert spoken
    pids = {worker.pid for worker in engine._require_pool().workers}
    assert len(pids) == 2
    await engine.aclose()
    await engine.aclose()
    assert all(pid is not None and reaped(pid) for pid in pids)
    with pytest.raises(Unavailable):
        async for _ in held:
            pass
    with pytest.raises(Unavailable):
        await chunks_of(engine, HELLO)
    with pytest.raises(Unavailable):
        await engine.voices()
    # A new engine after the close starts afresh.
    again = EspeakEngine(workers=1)
    assert 1.0 < seconds(again, b"".join(await chunks_of(again, HELLO))) < 4.0
    await again.aclose()


def children() -> set[int]:
    """This process's child processes, zombies included."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                found.add(int(entry))
    return found


@pytest.mark.parametrize("after", [0, 1, 3])
async def test_a_close_while_workers_start_leaves_no_process(after: int) -> None:
    before = children()
    engine = EspeakEngine(workers=2, prestart=True)
    for _ in range(after):  # catch the start at different points
        await asyncio.sleep(0)
    await engine.aclose()
    # A spawn under way in a thread has finished: its process, if any, must be reaped.
    await asyncio.get_running_loop().shutdown_default_executor()
    assert children() == before


async def test_a_job_closed_while_queued_leaves_the_queue(one_worker: EspeakEngine) -> None:
    running = speak(one_worker, LONG)
    await anext(running)
    queued = speak(one_worker, HELLO, caller="q")
    waiting = asyncio.create_task(queued.admitted())
    await asyncio.sleep(0)  # in the queue: the worker is still speaking the long text
    pool = one_worker._require_pool()
    assert pool._queued == 1 and not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool._queued == 0 and not pool._waiting
    await running.aclose()
    assert await chunks_of(one_worker, HELLO)


async def test_a_worker_that_cannot_start_fails_what_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(espeak_pool, "_WORKER_MODULE", "voxrelay.no_such_module")
    engine = EspeakEngine(workers=2)
    try:
        with pytest.raises(Unavailable, match="exited while starting"):
            await engine.voices()
        results = await asyncio.gather(
            chunks_of(engine, HELLO), chunks_of(engine, HELLO, caller="b"), return_exceptions=True
        )
        assert all(isinstance(result, Unavailable) for result in results), results
        assert not engine._require_pool().workers
        # Once workers can start again, the engine speaks.
        monkeypatch.undo()
        assert 1.0 < seconds(engine, b"".join(await chunks_of(engine, HELLO))) < 4.0
    finally:
        await engine.aclose()
