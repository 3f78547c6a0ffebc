"""How the core calls an upstream: time budgets, retries, and a circuit breaker.

This is the one retry mechanism in voxrelay (SDK clients are built with
``max_retries=0``): it must know things the SDK cannot — the caller's deadline, and
that a retry is only allowed before the first byte of a call has been taken.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import metrics
from .descriptors import out_of_descriptors
from .errors import Unavailable, UpstreamError, UpstreamTimeout, VoxrelayError

__all__ = ["CircuitBreaker", "GapTimer", "Stage", "guarded_stream"]

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0


class CircuitBreaker:
    """Fail fast while an upstream keeps failing; let one trial call through after a pause.

    Closed: calls go through; *failures* consecutive failed calls open it. Open: calls
    fail at once with :class:`Unavailable` until *cooldown_s* has passed. Then one trial
    call goes through (half-open); its success closes the breaker, its failure opens it
    again. Calls made meanwhile are refused too, but may :meth:`wait_for_trial` instead.
    ``failures=0`` disables the breaker.
    """

    def __init__(
        self,
        *,
        failures: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self._trial_ended: asyncio.Event | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    @property
    def trial_in_flight(self) -> bool:
        return self._trial_in_flight

    def check(self, what: str) -> None:
        """Raise :class:`Unavailable` while open and cooling down; a call would fail fast."""
        if self._opened_at is None:
            return
        remaining = self._opened_at + self.cooldown_s - self._clock()
        if remaining > 0:
            raise Unavailable(
                f"{what} is failing; not calling it for {remaining:.1f} s",
                retry_after_s=remaining,
            )

    def before_call(self, what: str) -> bool:
        """Admit a call, or raise :class:`Unavailable`; return True for a trial call."""
        if self._opened_at is None:
            return False
        self.check(what)
        if self._trial_in_flight:
            raise Unavailable(f"{what} is failing; a trial call is testing it", retry_after_s=0.5)
        self._trial_in_flight = True
        self._trial_ended = asyncio.Event()
        return True

    async def wait_for_trial(self) -> None:
        """Wait until the trial call in flight (if any) has ended, whatever its verdict."""
        if self._trial_ended is not None:
            await self._trial_ended.wait()

    def record_success(self, trial: bool) -> None:
        """Note a call that worked; close the breaker."""
        self._consecutive = 0
        if self._opened_at is not None:
            self._opened_at = None
            if self._on_change:
                self._on_change(False)
        if trial:
            self._end_trial()

    def record_failure(self, trial: bool) -> None:
        """Note a failed call; open the breaker at the threshold (or on a failed trial)."""
        self._consecutive += 1
        if self.threshold and (trial or self._consecutive >= self.threshold):
            was_open = self._opened_at is not None
            self._opened_at = self._clock()
            if not was_open and self._on_change:
                self._on_change(True)
        if trial:
            self._end_trial()

    def release(self, trial: bool) -> None:
        """Forget a call that ended without a verdict (cancelled by its caller)."""
        if trial:
            self._end_trial()

    def _end_trial(self) -> None:
        self._trial_in_flight = False
        if self._trial_ended is not None:
            self._trial_ended.set()
            self._trial_ended = None


@dataclass
class Stage:
    """One upstream as the pipeline sees it: which stage, which provider, its budgets."""

    stage: str  # "llm", "tts" or "realtime"
    provider: str
    timeout_s: float
    retries: int
    breaker: CircuitBreaker = field(repr=False)

    @classmethod
    def build(
        cls,
        stage: str,
        provider: str,
        *,
        timeout_s: float,
        retries: int,
        breaker_failures: int,
        breaker_cooldown_s: float,
    ) -> Stage:
        gauge = metrics.BREAKER_OPEN.labels(stage, provider)
        gauge.set(0)

        def on_change(is_open: bool) -> None:
            gauge.set(1 if is_open else 0)
            log.warning(
                "circuit breaker %s",
                "opened" if is_open else "closed",
                extra={"stage": stage, "provider": provider},
            )

        breaker = CircuitBreaker(
            failures=breaker_failures, cooldown_s=breaker_cooldown_s, on_change=on_change
        )
        return cls(stage, provider, timeout_s, retries, breaker)

    @property
    def label(self) -> str:
        return {"llm": "the chat upstream", "tts": "the speech upstream"}.get(
            self.stage, f"the {self.stage} upstream"
        )


def backoff_s(attempt: int) -> float:
    """Full-jitter exponential backoff for retry number *attempt* (0-based)."""
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt))


def _is_failure(exc: BaseException) -> bool:
    if out_of_descriptors(exc):
        return False  # our shortage of file descriptors says nothing of the upstream
    if isinstance(exc, UpstreamError):
        # A 4xx other than 429 is our request's fault, not the upstream's health.
        return exc.retryable or exc.status is None or exc.status >= 500
    return isinstance(exc, UpstreamTimeout)


class GapTimer:
    """Bound each wait for an upstream's next item by *gap_s* and by *deadline*.

    The same as ``asyncio.timeout_at(...)`` around every wait, for much less: a stream
    relays hundreds of chunks a second, and a timeout context per chunk (and a loop timer
    for each) costs more than the chunk. One timer per stream looks in at the earliest
    moment a wait could be over its bound; if a wait is, the timer cancels the waiting
    task, and the wait turns that cancellation into :class:`TimeoutError` — exactly as
    :class:`asyncio.Timeout` does, so a cancellation from anywhere else still wins.
    """

    def __init__(self, gap_s: float, deadline: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._gap = gap_s if gap_s > 0 else None
        self._deadline = deadline
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._waiting = False
        self._expired = False
        self._since = 0.0

    def _limit(self) -> float | None:
        end = self._since + self._gap if self._gap is not None else None
        if self._deadline is not None:
            end = self._deadline if end is None else min(end, self._deadline)
        return end

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """Await *awaitable*; raise :class:`TimeoutError` if it outlasts its bound."""
        task = self._task = asyncio.current_task()
        self._since = self._loop.time()
        limit = self._limit()
        if limit is None or task is None:
            return await awaitable
        if self._handle is None or self._armed_for > limit:
            self._arm(limit)
        cancelling = task.cancelling()
        self._waiting = True
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._waiting = self._expired = False

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        self.close()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._handle = None
        if not self._waiting or self._task is None:
            return  # not waiting now: the next wait arms the timer again
        limit = self._limit()
        now = self._loop.time()
        if limit is not None and now >= limit:
            if not self._expired:
                self._expired = True
                self._task.cancel()  # end the wait in progress
        elif limit is not None:
            self._arm(limit)


async def _trial_ended(breaker: CircuitBreaker, limit: float | None) -> bool:
    """Wait for the breaker's trial call to end; return False if *limit* comes first."""
    try:
        async with asyncio.timeout_at(limit):
            await breaker.wait_for_trial()
    except TimeoutError:
        return False
    return True


async def _enter(stage: Stage, limit: float | None) -> bool:
    """Pass the stage's breaker (True for its trial call), or raise :class:`Unavailable`."""
    while True:
        try:
            return stage.breaker.before_call(stage.label)
        except Unavailable:
            # Half-open: the trial in flight is often this request's own previous segment;
            # its verdict, due within our budget, decides this call too.
            if not stage.breaker.trial_in_flight or not await _trial_ended(stage.breaker, limit):
                raise


def _retry_wait(
    stage: Stage, exc: VoxrelayError, attempt: int, limit: float | None
) -> float | None:
    """Return how long to wait before retrying after *exc*, or None to give up."""
    if not (isinstance(exc, UpstreamError) and exc.retryable and attempt < stage.retries):
        return None
    wait = exc.retry_after_s if exc.retry_after_s is not None else backoff_s(attempt)
    if limit is not None and asyncio.get_running_loop().time() + wait >= limit:
        return None
    return wait


async def _admitted(
    admitted: Callable[[], Awaitable[None]], stage: Stage, deadline: float | None
) -> None:
    """Wait for a stream's turn; past the caller's *deadline*, it is the caller's timeout."""
    try:
        async with asyncio.timeout_at(deadline):
            await admitted()
    except TimeoutError:
        raise UpstreamTimeout(f"{stage.label} was busy until the request's deadline") from None


async def guarded_stream(
    stage: Stage,
    call: Callable[[], AsyncGenerator[T, None]],
    *,
    deadline: float | None = None,
    on_first: Callable[[], None] | None = None,
) -> AsyncGenerator[T, None]:
    """Yield the items of ``call()``, within the stage's budgets.

    The wait for the first item — retries included — and every later gap are each
    capped by ``stage.timeout_s`` and by *deadline* (a ``loop.time()``); a
    :class:`~.providers.base.QueuedStream`'s wait for its turn is not counted, being no
    upstream's time, and only *deadline* bounds it. Retryable
    failures are tried again with jittered backoff (or the upstream's ``Retry-After``)
    only before the first item and only if the wait fits the budget. While the breaker's
    trial call is in flight, a call waits for its verdict within the same budget. The
    upstream iterator is always closed before this one returns, so no request outlives it.
    """
    loop = asyncio.get_running_loop()
    labels = (stage.stage, stage.provider)
    started = loop.time()
    limit = started + stage.timeout_s if stage.timeout_s > 0 else None
    if deadline is not None:
        limit = deadline if limit is None else min(limit, deadline)
    attempt = 0
    while True:
        trial = await _enter(stage, limit)
        call_started = loop.time()
        got_first = False
        try:
            async with aclosing(call()) as upstream:
                # A QueuedStream, duck-typed: a runtime Protocol check is slow, and this
                # runs for every call.
                admitted: Callable[[], Awaitable[None]] | None = getattr(upstream, "admitted", None)
                if admitted is not None:
                    await _admitted(admitted, stage, deadline)
                    # The turn waited for is the caller's time, not the upstream's.
                    queued = loop.time() - call_started
                    call_started += queued
                    if limit is not None:
                        limit += queued
                        if deadline is not None:
                            limit = min(limit, deadline)
                try:
                    async with asyncio.timeout_at(limit):
                        first = await anext(upstream)
                except StopAsyncIteration:
                    stage.breaker.record_success(trial)
                    trial = False
                    return
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"{stage.label} sent nothing within "
                        f"{(limit or loop.time()) - started:.1f} s"
                    ) from None
                got_first = True
                stage.breaker.record_success(trial)
                trial = False
                metrics.UPSTREAM_FIRST_BYTE.labels(*labels).observe(loop.time() - call_started)
                if on_first is not None:
                    on_first()
                yield first
                gaps = GapTimer(stage.timeout_s, deadline)
                try:
                    while True:
                        try:
                            item = await gaps.wait(anext(upstream))
                        except StopAsyncIteration:
                            break
                        except TimeoutError:
                            raise UpstreamTimeout(f"{stage.label} stalled mid-stream") from None
                        yield item
                finally:
                    gaps.close()
                metrics.UPSTREAM_SECONDS.labels(*labels).observe(loop.time() - call_started)
                return
        except VoxrelayError as exc:
            # The caller's own deadline running out says nothing of the upstream's health.
            impatient = deadline is not None and loop.time() >= deadline
            if _is_failure(exc) and not (impatient and isinstance(exc, UpstreamTimeout)):
                stage.breaker.record_failure(trial)
                metrics.UPSTREAM_FAILURES.labels(*labels, exc.code).inc()
                trial = False
            # Never retried after the first item was taken: the caller has it already.
            wait = None if got_first else _retry_wait(stage, exc, attempt, limit)
            if wait is None:
                raise
            log.warning(
                "retrying %s in %.2f s: %s",
                stage.label,
                wait,
                exc.message,
                extra={"stage": stage.stage, "provider": stage.provider, "attempt": attempt + 1},
            )
            metrics.UPSTREAM_RETRIES.labels(*labels).inc()
            attempt += 1
            await asyncio.sleep(wait)
        finally:
            if trial:
                stage.breaker.release(trial)
