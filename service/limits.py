"""voxrelay's own limits on its callers: request and character rates, concurrent streams.

Sans-I/O token buckets behind a small async interface (:class:`AdmissionControl`);
:class:`Admission` is the in-process implementation and
:class:`~voxrelay.service.limits_redis.RedisAdmission` the shared one for several
processes and replicas (``VOXRELAY_REDIS_URL``); :func:`make_admission` picks one.
A refused request consumes nothing; every refusal carries the wait that would help.
:class:`ConnectionLimits` counts a door's open connections, in total and per address.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .errors import Busy, RateLimited, TooLarge
from .settings import Settings

__all__ = [
    "Admission",
    "AdmissionControl",
    "ConnectionLimits",
    "Lease",
    "TokenBucket",
    "make_admission",
]

#: Forget the buckets of callers that have been quiet this long (they are full again).
IDLE_FORGET_S = 120.0
PRUNE_EVERY = 1024
#: Refills are floating point: a bucket this close to enough has enough.
EPSILON = 1e-9


class TokenBucket:
    """A bucket of *capacity* tokens refilled at *rate* tokens per second."""

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, n: float, now: float) -> float:
        """Return 0 if *n* tokens are there now, else the seconds until they will be."""
        self._refill(now)
        if self.tokens + EPSILON >= n:
            return 0.0
        return _whole_ms((n - self.tokens) / self.rate)

    def take(self, n: float, now: float) -> None:
        """Remove *n* tokens (the caller has checked :meth:`wait_for`)."""
        self._refill(now)
        self.tokens -= n

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


def _whole_ms(seconds: float) -> float:
    """Round a wait up to whole milliseconds: a client that waits that long gets in."""
    return math.ceil(seconds * 1000 - 1e-6) / 1000


@dataclass
class _Caller:
    requests: TokenBucket | None
    chars: TokenBucket | None
    streams: int = 0
    last_seen: float = 0.0


@dataclass
class Lease:
    """A granted stream slot; :meth:`release` it when the stream ends (idempotent)."""

    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


class AdmissionControl(Protocol):
    """Grant streams to callers within their limits.

    ``start`` before the first ``admit`` (it may check a backend), ``aclose`` at the end.
    """

    async def start(self) -> None:
        """Get ready to admit (connect to a backend, start its upkeep)."""
        ...

    async def admit(self, key: str | None, chars: int) -> Lease:
        """Grant a stream to *key* for *chars* input characters, or raise a typed refusal."""
        ...

    async def charge(self, key: str | None, chars: int) -> None:
        """Take *chars* more input characters from *key*'s budget, or raise a refusal."""
        ...

    async def aclose(self) -> None:
        """Stop the upkeep and give back what this process holds (idempotent)."""
        ...


def make_admission(settings: Settings) -> AdmissionControl:
    """Return the admission control the settings ask for: shared in Redis, or in-process."""
    if not settings.redis_url:
        return Admission.from_settings(settings)
    # Imported here: limits_redis builds on this module.
    from .limits_redis import RedisAdmission

    return RedisAdmission.from_settings(settings)


class Admission:
    """Decide whether a caller may start a stream now, in this process."""

    def __init__(
        self,
        *,
        requests_per_min: int,
        chars_per_min: int,
        streams_per_key: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests_per_min = requests_per_min
        self.chars_per_min = chars_per_min
        self.streams_per_key = streams_per_key
        self._clock = clock
        self._callers: dict[str, _Caller] = {}
        self._admitted = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic
    ) -> Admission:
        return cls(
            requests_per_min=settings.rate_limit_per_min,
            chars_per_min=settings.chars_per_min,
            streams_per_key=settings.max_streams_per_key,
            clock=clock,
        )

    def _caller(self, key: str, now: float) -> _Caller:
        caller = self._callers.get(key)
        if caller is None:
            rpm, cpm = self.requests_per_min, self.chars_per_min
            caller = _Caller(
                requests=TokenBucket(rpm, rpm / 60, now) if rpm else None,
                chars=TokenBucket(cpm, cpm / 60, now) if cpm else None,
            )
            self._callers[key] = caller
        caller.last_seen = now
        return caller

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def admit(self, key: str | None, chars: int) -> Lease:
        """Grant a stream to *key* for *chars* input characters, or raise a typed refusal.

        ``key`` None means an anonymous internal caller: no per-key limits apply. The
        decision is all in memory: nothing here awaits.
        """
        if key is None:
            return Lease()
        now = self._clock()
        self._admitted += 1
        if self._admitted % PRUNE_EVERY == 0:
            self._prune(now)
        caller = self._caller(key, now)
        if self.streams_per_key and caller.streams >= self.streams_per_key:
            raise RateLimited(
                f"this caller already has {caller.streams} streams in flight"
                f" (limit {self.streams_per_key}): wait for one to end",
                retry_after_s=1.0,
            )
        if caller.chars is not None and chars > caller.chars.capacity:
            raise TooLarge(
                f"{chars} characters exceed this caller's budget of {self.chars_per_min} per minute"
            )
        waits = []
        if caller.requests is not None:
            waits.append(("requests", caller.requests.wait_for(1, now)))
        if caller.chars is not None:
            waits.append(("characters", caller.chars.wait_for(chars, now)))
        blocked = [(what, wait) for what, wait in waits if wait > 0]
        if blocked:
            what, wait = max(blocked, key=lambda item: item[1])
            limit = self.requests_per_min if what == "requests" else self.chars_per_min
            raise RateLimited(
                f"rate limit of {limit} {what} per minute reached: retry in {wait:.1f} s",
                retry_after_s=wait,
            )
        if caller.requests is not None:
            caller.requests.take(1, now)
        if caller.chars is not None:
            caller.chars.take(chars, now)
        caller.streams += 1

        def release() -> None:
            caller.streams -= 1
            caller.last_seen = self._clock()

        return Lease(release)

    async def charge(self, key: str | None, chars: int) -> None:
        """Take *chars* more input characters from *key*'s budget, or raise a refusal.

        A streamed input pays for each piece as it arrives; a refused piece costs nothing.
        The decision is all in memory: nothing here awaits.
        """
        if key is None or chars <= 0:
            return
        now = self._clock()
        bucket = self._caller(key, now).chars
        if bucket is None:
            return
        if chars > bucket.capacity:
            raise TooLarge(
                f"a piece of {chars} characters exceeds this caller's budget of"
                f" {self.chars_per_min} per minute"
            )
        wait = bucket.wait_for(chars, now)
        if wait > 0:
            raise RateLimited(
                f"rate limit of {self.chars_per_min} characters per minute reached:"
                f" retry in {wait:.1f} s",
                retry_after_s=wait,
            )
        bucket.take(chars, now)

    def _prune(self, now: float) -> None:
        """Forget quiet callers with full buckets and no streams (bounded memory)."""
        for key in [
            k
            for k, c in self._callers.items()
            if c.streams == 0
            and now - c.last_seen > IDLE_FORGET_S
            and (c.requests is None or c.requests.is_full(now))
            and (c.chars is None or c.chars.is_full(now))
        ]:
            del self._callers[key]


class ConnectionLimits:
    """Count open connections, in total and per client address; ``0`` is no limit."""

    #: The wait a refused connection is told: connections come and go quickly.
    RETRY_AFTER_S = 1.0

    def __init__(self, *, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.open = 0
        self._by_address: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(total=settings.max_connections, per_address=settings.max_connections_per_ip)

    def count(self, address: str) -> int:
        """Return how many connections *address* has open."""
        return self._by_address.get(address, 0)

    def acquire(self, address: str) -> Lease:
        """Take a connection slot for *address*, or raise :class:`Busy`."""
        if self.total and self.open >= self.total:
            raise Busy(
                f"voxrelay is at its limit of {self.total} connections: retry shortly",
                retry_after_s=self.RETRY_AFTER_S,
            )
        held = self.count(address)
        if self.per_address and held >= self.per_address:
            raise Busy(
                f"this address already has {held} connections open (limit"
                f" {self.per_address}): close one or retry later",
                retry_after_s=self.RETRY_AFTER_S,
            )
        self.open += 1
        self._by_address[address] = held + 1

        def release() -> None:
            self.open -= 1
            left = self._by_address[address] - 1
            if left:
                self._by_address[address] = left
            else:
                del self._by_address[address]

        return Lease(release)
