"""Tests for how the core calls an upstream: the circuit breaker and ``guarded_stream``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.unit.clock import Clock
from tests.waiting import eventually
from voxrelay.service import resilience
from voxrelay.service.errors import Unavailable, UpstreamError, UpstreamTimeout
from voxrelay.service.resilience import CircuitBreaker, Stage, backoff_s, guarded_stream


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep jittered backoff in the milliseconds so retries do not slow the suite."""
    monkeypatch.setattr(resilience, "BACKOFF_BASE_S", 0.005)


# The circuit breaker


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        trial = breaker.before_call("the speech upstream")
        breaker.record_failure(trial)
    assert breaker.is_open


def test_breaker_opens_at_the_threshold(clock: Clock) -> None:
    changes: list[bool] = []
    breaker = CircuitBreaker(failures=3, cooldown_s=10, clock=clock, on_change=changes.append)
    for _ in range(2):
        assert breaker.before_call("the speech upstream") is False
        breaker.record_failure(False)
    assert not breaker.is_open
    breaker.before_call("the speech upstream")
    breaker.record_failure(False)
    assert breaker.is_open
    assert changes == [True]


def test_success_resets_the_count(clock: Clock) -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    for outcome in ("fail", "fail", "ok", "fail", "fail", "ok", "fail", "fail"):
        trial = breaker.before_call("x")
        if outcome == "ok":
            breaker.record_success(trial)
        else:
            breaker.record_failure(trial)
    assert not breaker.is_open


def test_open_breaker_fails_fast_with_the_remaining_cooldown(clock: Clock) -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=clock)
    open_breaker(breaker)
    with pytest.raises(Unavailable) as caught:
        breaker.before_call("the speech upstream")
    assert caught.value.retryable
    assert caught.value.retry_after_s == pytest.approx(10)
    assert "the speech upstream" in caught.value.message
    clock.advance(6)
    with pytest.raises(Unavailable) as caught:
        breaker.before_call("the speech upstream")
    assert caught.value.retry_after_s == pytest.approx(4)


def test_half_open_lets_exactly_one_trial_through(clock: Clock) -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=clock)
    open_breaker(breaker)
    clock.advance(10)
    assert breaker.before_call("x") is True  # the trial
    assert breaker.trial_in_flight
    for _ in range(3):
        with pytest.raises(Unavailable) as caught:
            breaker.before_call("x")  # everyone else is refused (or waits for the verdict)
        assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0
        assert "trial" in caught.value.message


def test_successful_trial_closes(clock: Clock) -> None:
    changes: list[bool] = []
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=clock, on_change=changes.append)
    open_breaker(breaker)
    clock.advance(10)
    trial = breaker.before_call("x")
    breaker.record_success(trial)
    assert not breaker.is_open
    assert [breaker.before_call("x") for _ in range(3)] == [False] * 3
    assert changes == [True, False]
    # Closed means the count starts over: one failure does not reopen it.
    breaker.record_failure(False)
    assert not breaker.is_open


def test_failed_trial_reopens_for_a_full_cooldown(clock: Clock) -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=clock)
    open_breaker(breaker)
    clock.advance(12)
    trial = breaker.before_call("x")
    breaker.record_failure(trial)
    assert breaker.is_open
    with pytest.raises(Unavailable) as caught:
        breaker.before_call("x")
    assert caught.value.retry_after_s == pytest.approx(10)
    clock.advance(10)
    assert breaker.before_call("x") is True


def test_released_trial_lets_the_next_call_try(clock: Clock) -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    open_breaker(breaker)
    clock.advance(5)
    trial = breaker.before_call("x")
    breaker.release(trial)  # its caller went away: no verdict
    assert breaker.is_open
    assert breaker.before_call("x") is True


def test_zero_failures_disables_the_breaker(clock: Clock) -> None:
    changes: list[bool] = []
    breaker = CircuitBreaker(failures=0, cooldown_s=10, clock=clock, on_change=changes.append)
    for _ in range(100):
        assert breaker.before_call("x") is False
        breaker.record_failure(False)
    assert not breaker.is_open
    assert changes == []


# Backoff


def test_backoff_is_jittered_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilience, "BACKOFF_BASE_S", 0.2)
    random.seed(7)
    for attempt in range(8):
        cap = min(resilience.BACKOFF_MAX_S, 0.2 * 2**attempt)
        waits = [backoff_s(attempt) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert len(set(waits)) == len(waits)  # jitter: no two retries in step
        assert max(waits) > cap * 0.8  # and it uses the whole window


# guarded_stream


class Upstream:
    """One scripted upstream call: yields items, sleeps on floats, raises exceptions.

    A class rather than an async generator so a test can see ``aclose`` being called
    whatever state the iterator is in.
    """

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.taken: list[Any] = []
        self.closed = False

    def __aiter__(self) -> Upstream:
        return self

    async def __anext__(self) -> Any:
        while self.steps:
            step = self.steps.pop(0)
            if isinstance(step, float):
                await asyncio.sleep(step)
            elif isinstance(step, BaseException):
                raise step
            else:
                self.taken.append(step)
                return step
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


class Script:
    """The upstream calls ``guarded_stream`` makes, in order, and when it made them."""

    def __init__(self, *calls: Upstream) -> None:
        self.calls = list(calls)
        self.made: list[Upstream] = []
        self.times: list[float] = []

    def __call__(self) -> AsyncIterator[Any]:
        self.times.append(asyncio.get_running_loop().time())
        upstream = self.calls[len(self.made)]
        self.made.append(upstream)
        return upstream

    def all_closed(self) -> bool:
        return bool(self.made) and all(u.closed for u in self.made)


def make_stage(
    *,
    timeout_s: float = 1.0,
    retries: int = 2,
    failures: int = 0,
    cooldown_s: float = 10.0,
    clock: Callable[[], float] | None = None,
) -> Stage:
    breaker = CircuitBreaker(failures=failures, cooldown_s=cooldown_s, clock=clock or Clock())
    return Stage("tts", "openai", timeout_s, retries, breaker)


def server_error(retry_after_s: float | None = None, status: int = 500) -> UpstreamError:
    return UpstreamError(
        f"speech upstream is unavailable: {status}",
        retryable=True,
        status=status,
        retry_after_s=retry_after_s,
    )


def refusal(status: int = 400) -> UpstreamError:
    return UpstreamError(
        f"speech upstream rejected the request: {status}", retryable=False, status=status
    )


async def drain(stream: AsyncIterator[Any], into: list[Any] | None = None) -> list[Any]:
    items = [] if into is None else into
    async for item in stream:
        items.append(item)
    return items


async def test_yields_every_item_and_closes_the_upstream() -> None:
    script = Script(Upstream(b"a", b"b", b"c"))
    firsts: list[bool] = []
    stream = guarded_stream(make_stage(), script, on_first=lambda: firsts.append(True))
    assert await drain(stream) == [b"a", b"b", b"c"]
    assert firsts == [True]
    assert script.all_closed()


async def test_empty_stream_ends_quietly() -> None:
    script = Script(Upstream())
    assert await drain(guarded_stream(make_stage(), script)) == []
    assert script.all_closed()


async def test_retries_before_the_first_item() -> None:
    script = Script(Upstream(server_error()), Upstream(0.01, server_error()), Upstream(b"ok"))
    assert await drain(guarded_stream(make_stage(retries=2), script)) == [b"ok"]
    assert len(script.made) == 3
    assert script.all_closed()


async def test_gives_up_after_the_set_retries() -> None:
    errors = [server_error(status=500 + i) for i in range(4)]
    script = Script(*(Upstream(e) for e in errors))
    with pytest.raises(UpstreamError) as caught:
        await drain(guarded_stream(make_stage(retries=2), script))
    assert caught.value is errors[2]  # the last attempt's error
    assert len(script.made) == 3
    assert script.all_closed()


async def test_never_retries_after_the_first_item() -> None:
    error = server_error()
    script = Script(Upstream(b"a", error), Upstream(b"again"))
    received: list[Any] = []
    with pytest.raises(UpstreamError) as caught:
        await drain(guarded_stream(make_stage(retries=5), script), received)
    assert caught.value is error
    assert received == [b"a"]
    assert len(script.made) == 1
    assert script.all_closed()


async def test_retry_after_is_honoured() -> None:
    script = Script(Upstream(server_error(retry_after_s=0.2, status=429)), Upstream(b"ok"))
    assert await drain(guarded_stream(make_stage(timeout_s=2.0), script)) == [b"ok"]
    assert script.times[1] - script.times[0] >= 0.2


async def test_retry_after_that_does_not_fit_the_budget_raises_at_once() -> None:
    error = server_error(retry_after_s=5.0, status=429)
    script = Script(Upstream(error), Upstream(b"too late"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamError) as caught:
        await drain(guarded_stream(make_stage(timeout_s=1.0), script))
    assert loop.time() - started < 0.1
    assert caught.value is error
    assert caught.value.retry_after_s == 5.0  # the caller learns the upstream's wait
    assert len(script.made) == 1
    assert script.all_closed()


async def test_retry_after_that_outlasts_the_callers_deadline_raises_at_once() -> None:
    loop = asyncio.get_running_loop()
    script = Script(Upstream(server_error(retry_after_s=0.5, status=429)), Upstream(b"late"))
    started = loop.time()
    with pytest.raises(UpstreamError):
        await drain(guarded_stream(make_stage(timeout_s=0), script, deadline=started + 0.3))
    assert loop.time() - started < 0.1
    assert len(script.made) == 1


async def test_first_item_timeout() -> None:
    script = Script(Upstream(10.0, b"late"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout) as caught:
        await drain(guarded_stream(make_stage(timeout_s=0.1), script))
    assert 0.1 <= loop.time() - started < 0.3
    assert "the speech upstream" in caught.value.message
    assert script.all_closed()


async def test_the_first_item_budget_includes_retries() -> None:
    # 0.15 s lost to a Retry-After leaves 0.15 s of the 0.3 s budget for the second try.
    script = Script(Upstream(server_error(retry_after_s=0.15)), Upstream(10.0, b"late"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await drain(guarded_stream(make_stage(timeout_s=0.3), script))
    assert 0.3 <= loop.time() - started < 0.45
    assert len(script.made) == 2
    assert script.all_closed()


async def test_the_callers_deadline_caps_the_wait() -> None:
    script = Script(Upstream(10.0, b"late"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await drain(guarded_stream(make_stage(timeout_s=5.0), script, deadline=started + 0.1))
    assert loop.time() - started < 0.3


async def test_mid_stream_gap_timeout() -> None:
    script = Script(Upstream(b"a", 0.05, b"b", 10.0, b"never"), Upstream(b"retry"))
    received: list[Any] = []
    with pytest.raises(UpstreamTimeout) as caught:
        await drain(guarded_stream(make_stage(timeout_s=0.2), script), received)
    assert received == [b"a", b"b"]
    assert "stalled" in caught.value.message
    assert len(script.made) == 1  # not retried: audio was already taken
    assert script.all_closed()


async def test_each_gap_gets_the_whole_budget() -> None:
    # Ten gaps of 0.05 s are 0.5 s in all, over a 0.15 s budget: fine, no single gap is.
    steps: list[Any] = []
    for i in range(10):
        steps += [0.05, bytes([i])]
    script = Script(Upstream(*steps))
    assert len(await drain(guarded_stream(make_stage(timeout_s=0.15), script))) == 10


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_a_refusal_is_not_retried_and_not_held_against_the_upstream(status: int) -> None:
    stage = make_stage(retries=3, failures=1)
    error = refusal(status)
    script = Script(Upstream(error), Upstream(b"x"))
    with pytest.raises(UpstreamError) as caught:
        await drain(guarded_stream(stage, script))
    assert caught.value is error
    assert len(script.made) == 1
    assert not stage.breaker.is_open
    assert script.all_closed()


async def test_failed_calls_open_the_breaker_which_then_fails_fast() -> None:
    stage = make_stage(retries=0, failures=2)
    script = Script(Upstream(server_error()), Upstream(UpstreamTimeout("t")))
    for _ in range(2):
        with pytest.raises((UpstreamError, UpstreamTimeout)):
            await drain(guarded_stream(stage, script))
    assert stage.breaker.is_open
    with pytest.raises(Unavailable) as caught:
        await drain(guarded_stream(stage, script))
    assert caught.value.retry_after_s == pytest.approx(10)
    assert len(script.made) == 2  # no call while open


async def test_every_attempt_counts_towards_the_breaker() -> None:
    stage = make_stage(retries=2, failures=3)
    script = Script(*(Upstream(server_error()) for _ in range(3)))
    with pytest.raises(UpstreamError):
        await drain(guarded_stream(stage, script))
    assert stage.breaker.is_open


async def test_a_good_trial_closes_the_breaker(clock: Clock) -> None:
    stage = make_stage(retries=0, failures=1, cooldown_s=5, clock=clock)
    script = Script(Upstream(server_error()), Upstream(b"ok"), Upstream(b"ok again"))
    with pytest.raises(UpstreamError):
        await drain(guarded_stream(stage, script))
    assert stage.breaker.is_open
    clock.advance(5)
    assert await drain(guarded_stream(stage, script)) == [b"ok"]
    assert not stage.breaker.is_open
    assert await drain(guarded_stream(stage, script)) == [b"ok again"]


async def test_a_trial_whose_caller_left_frees_the_slot(clock: Clock) -> None:
    stage = make_stage(retries=0, failures=1, cooldown_s=5, clock=clock)
    script = Script(Upstream(server_error()), Upstream(10.0, b"slow"), Upstream(b"ok"))
    with pytest.raises(UpstreamError):
        await drain(guarded_stream(stage, script))
    clock.advance(5)
    trial = asyncio.create_task(drain(guarded_stream(stage, script)))
    await eventually(lambda: stage.breaker.trial_in_flight, every=0)
    waiter = asyncio.create_task(drain(guarded_stream(stage, script)))
    # Nothing marks the waiter parked on the trial's verdict: give it a few turns to get there.
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(script.made) == 2  # the waiter waits for the trial's verdict
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert await waiter == [b"ok"]  # no verdict: the waiter became the trial
    assert not stage.breaker.is_open


async def test_a_call_during_the_trial_waits_for_its_success(clock: Clock) -> None:
    # Half-open, a request of several segments must not be refused by its own trial.
    stage = make_stage(retries=0, failures=1, cooldown_s=5, clock=clock)
    script = Script(Upstream(server_error()), Upstream(0.1, b"trial"), Upstream(b"next"))
    with pytest.raises(UpstreamError):
        await drain(guarded_stream(stage, script))
    clock.advance(5)
    trial = asyncio.create_task(drain(guarded_stream(stage, script)))
    await eventually(lambda: stage.breaker.trial_in_flight, every=0)
    assert stage.breaker.trial_in_flight
    assert await drain(guarded_stream(stage, script)) == [b"next"]
    assert await trial == [b"trial"]
    assert not stage.breaker.is_open


async def test_a_call_during_the_trial_fails_with_it(clock: Clock) -> None:
    stage = make_stage(retries=0, failures=1, cooldown_s=5, clock=clock)
    script = Script(Upstream(server_error()), Upstream(0.1, server_error()), Upstream(b"no"))
    with pytest.raises(UpstreamError):
        await drain(guarded_stream(stage, script))
    clock.advance(5)
    trial = asyncio.create_task(drain(guarded_stream(stage, script)))
    await eventually(lambda: stage.breaker.trial_in_flight, every=0)
    with pytest.raises(Unavailable) as caught:
        await drain(guarded_stream(stage, script))
    assert caught.value.retry_after_s == pytest.approx(5)
    with pytest.raises(UpstreamError):
        await trial
    assert len(script.made) == 2


async def test_a_call_waits_for_the_trial_only_within_its_budget(clock: Clock) -> None:
    stage = make_stage(timeout_s=5.0, retries=0, failures=1, cooldown_s=5, clock=clock)
    script = Script(Upstream(server_error()), Upstream(10.0, b"slow trial"))
    with pytest.raises(UpstreamError):
        await drain(guarded_stream(stage, script))
    clock.advance(5)
    trial = asyncio.create_task(drain(guarded_stream(stage, script)))
    await eventually(lambda: stage.breaker.trial_in_flight, every=0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(Unavailable) as caught:
        await drain(guarded_stream(stage, script, deadline=began + 0.1))
    assert 0.1 <= loop.time() - began < 0.2
    assert "trial" in caught.value.message
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert len(script.made) == 2


async def test_the_callers_deadline_is_not_held_against_the_upstream() -> None:
    stage = make_stage(timeout_s=5.0, retries=0, failures=1)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        script = Script(Upstream(10.0, b"slow"))
        with pytest.raises(UpstreamTimeout):
            await drain(guarded_stream(stage, script, deadline=loop.time() + 0.05))
        assert script.all_closed()
    assert not stage.breaker.is_open
    # Its own budget running out is the upstream's failure.
    with pytest.raises(UpstreamTimeout):
        await drain(guarded_stream(make_stage(timeout_s=0.05), Script(Upstream(10.0))))
    stage = make_stage(timeout_s=0.05, retries=0, failures=1)
    with pytest.raises(UpstreamTimeout):
        await drain(guarded_stream(stage, Script(Upstream(10.0))))
    assert stage.breaker.is_open


# An upstream that first waits its turn (an embedded engine's worker)


class QueuedUpstream(Upstream):
    """An upstream call that is a QueuedStream: it holds nothing until :attr:`turn` is set."""

    def __init__(self, *steps: Any) -> None:
        super().__init__(*steps)
        self.turn = asyncio.Event()

    async def admitted(self) -> None:
        await self.turn.wait()


async def test_a_wait_for_a_turn_is_not_the_upstreams_time() -> None:
    stage = make_stage(timeout_s=0.05, retries=0, failures=1)
    upstream = QueuedUpstream(b"a", b"b")
    script = Script(upstream)
    stream = guarded_stream(stage, script)
    first = asyncio.create_task(anext(stream))
    done, _ = await asyncio.wait({first}, timeout=0.3)  # six budgets in the queue
    assert not done
    upstream.turn.set()
    assert await first == b"a"
    assert await drain(stream) == [b"b"]
    assert script.all_closed()
    assert not stage.breaker.is_open


async def test_a_turn_past_the_callers_deadline_is_not_held_against_the_upstream() -> None:
    stage = make_stage(timeout_s=5.0, retries=0, failures=1)
    loop = asyncio.get_running_loop()
    script = Script(QueuedUpstream(b"a"))
    with pytest.raises(UpstreamTimeout, match="busy"):
        await drain(guarded_stream(stage, script, deadline=loop.time() + 0.05))
    assert script.all_closed()
    assert not stage.breaker.is_open


async def test_the_first_item_budget_starts_with_the_turn() -> None:
    stage = make_stage(timeout_s=0.05, retries=0, failures=1)
    upstream = QueuedUpstream(10.0, b"late")
    upstream.turn.set()
    with pytest.raises(UpstreamTimeout, match="sent nothing"):
        await drain(guarded_stream(stage, Script(upstream)))
    assert stage.breaker.is_open


# The upstream iterator is closed on every path


async def test_closed_when_the_consumer_stops_early() -> None:
    script = Script(Upstream(b"a", b"b", b"c"))
    stream = guarded_stream(make_stage(), script)
    assert await anext(stream) == b"a"
    await stream.aclose()
    assert script.all_closed()
    assert script.made[0].taken == [b"a"]


async def test_closed_when_the_consumer_stops_mid_stream() -> None:
    script = Script(Upstream(b"a", b"b", b"c"))
    stream = guarded_stream(make_stage(), script)
    assert [await anext(stream), await anext(stream)] == [b"a", b"b"]
    await stream.aclose()
    assert script.all_closed()


def parked(script: Script) -> bool:
    """Whether the first call has reached its long sleep, or raised its error."""
    return bool(script.made) and not any(
        isinstance(step, float | BaseException) for step in script.made[0].steps
    )


CANCEL_POINTS: dict[str, Callable[[], Script]] = {
    "waiting for the first item": lambda: Script(Upstream(10.0, b"a")),
    "waiting for the next item": lambda: Script(Upstream(b"a", 10.0, b"b")),
    "between retries": lambda: Script(Upstream(server_error(retry_after_s=10.0)), Upstream(b"a")),
}


@pytest.mark.parametrize("where", list(CANCEL_POINTS))
async def test_closed_when_cancelled(where: str) -> None:
    script = CANCEL_POINTS[where]()
    stage = make_stage(timeout_s=30.0, failures=5)
    task = asyncio.create_task(drain(guarded_stream(stage, script)))
    await eventually(lambda: parked(script), every=0)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert script.all_closed()
    assert len(script.made) == 1


async def test_closed_on_every_failure() -> None:
    scripts = [
        Script(Upstream(server_error()), Upstream(server_error()), Upstream(server_error())),
        Script(Upstream(refusal())),
        Script(Upstream(b"a", server_error())),
        Script(Upstream(0.5)),
        Script(Upstream(b"a", 0.5)),
        Script(Upstream(RuntimeError("a bug in a provider"))),
    ]
    for script in scripts:
        with pytest.raises((UpstreamError, UpstreamTimeout, RuntimeError)):
            await drain(guarded_stream(make_stage(timeout_s=0.1, retries=2), script))
        assert script.all_closed(), script.calls


# GapTimer: one loop timer per stream, a timeout per wait


async def test_gap_timer_times_out_a_stalled_wait_and_the_next_wait_works() -> None:
    gaps = resilience.GapTimer(0.02, None)
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await gaps.wait(never)
    assert never.cancelled()
    assert await gaps.wait(asyncio.sleep(0, "next")) == "next"
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # nothing left to uncancel
    gaps.close()


async def test_gap_timer_gives_each_wait_the_whole_gap() -> None:
    gaps = resilience.GapTimer(0.05, None)
    for _ in range(6):  # 6 x 20 ms: over the gap in sum, never in one wait
        await gaps.wait(asyncio.sleep(0.02))
    gaps.close()


async def test_gap_timer_is_capped_by_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    gaps = resilience.GapTimer(10.0, loop.time() + 0.03)
    await gaps.wait(asyncio.sleep(0.01))
    with pytest.raises(TimeoutError):
        await gaps.wait(asyncio.sleep(1))
    gaps.close()


async def test_gap_timer_lets_a_cancellation_from_elsewhere_through() -> None:
    started = asyncio.Event()

    async def waiter() -> None:
        gaps = resilience.GapTimer(10.0, None)
        started.set()
        try:
            await gaps.wait(asyncio.sleep(1))
        finally:
            gaps.close()

    task = asyncio.create_task(waiter())
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_gap_timer_timeout_that_meets_an_outside_cancel_stays_a_cancel() -> None:
    async def waiter() -> None:
        gaps = resilience.GapTimer(0.01, None)
        await gaps.wait(asyncio.sleep(1))

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    # Expire the wait and cancel it from outside in the same loop iteration.
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.call_later(0.01, lambda: (task.cancel(), done.set()))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done.is_set()


async def test_gap_timer_does_nothing_while_not_waiting() -> None:
    gaps = resilience.GapTimer(0.01, None)
    await gaps.wait(asyncio.sleep(0))
    await asyncio.sleep(0.05)  # the consumer is busy: its timer fires, finds no wait
    assert await gaps.wait(asyncio.sleep(0, "fine")) == "fine"
    gaps.close()
