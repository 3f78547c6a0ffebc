"""Limits shared by every process and replica, kept in Redis (``VOXRELAY_REDIS_URL``).

:class:`RedisAdmission` implements :class:`~voxrelay.service.limits.AdmissionControl`
with the in-process rules — a token bucket per caller for requests and one for
characters, refilled continuously; a refused request consumes nothing; the wait is
exact — and a count of concurrent streams per caller, all decided atomically by one
Lua script per admit on the Redis server, on the server's own clock (``TIME``), so
replicas whose clocks disagree still agree on every wait.

Keys (per caller, in one hash slot: ``voxrelay:limits:{caller}:…``):

- ``…:buckets`` — a hash of the two buckets' tokens and the time they were last
  refilled; it expires 61 s after its last write (a bucket left alone refills
  completely within 60 s, so an expired bucket and a full one are the same).
- ``…:streams`` — a sorted set of the caller's stream slots, each scored by its
  expiry (server milliseconds). The holder refreshes its slots every
  :data:`HEARTBEAT_S`; a slot not refreshed for :data:`SLOT_TTL_S` is a dead
  holder's and the next admit sweeps it, so a replica that dies (SIGKILL, a lost
  node) frees its callers' streams within 20 s.

Round trips: one per admit (``EVALSHA``), one per release (``ZREM``), none for an
anonymous caller (``key`` None); one per :data:`HEARTBEAT_S` for all the slots this
process holds (which is also the health check). Each is bounded: a read by
``socket_timeout``, a connect by ``socket_connect_timeout``, no client retries, and
the whole, the wait for one of the pool's connections included, by an ``asyncio``
timeout.

Failure policy (``VOXRELAY_REDIS_FAILURE``): when a round trip fails, ``open`` admits
with a fresh in-process :class:`~voxrelay.service.limits.Admission` (fresh budgets,
never reconciled later) and ``closed`` refuses with ``unavailable`` (retryable, 1 s).
Either way ``voxrelay_limits_backend_up`` is 0, one ``limits_backend`` log line says
so, and Redis is tried again every :data:`RECHECK_S` until it answers.

Why not the ``limits`` library (5.8, evaluated for this): its strategies are fixed,
moving and sliding windows, not the token buckets the in-process limits use, so the
same settings would mean different budgets with and without Redis; it has no
concurrency (semaphore) limit at all, so the stream count would be hand-written
anyway; each limit is its own round trip (``hit`` per limit), so "refuse on
characters without spending a request" needs a ``test`` then a ``hit`` per limit,
which races between replicas; and its async Redis storage is built on ``coredis``
(a second Redis client beside the ``redis`` package). One 40-line script does all
three checks in one atomic round trip with the exact wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from . import metrics
from .errors import RateLimited, TooLarge, Unavailable
from .limits import Admission, Lease
from .settings import Settings

__all__ = ["RedisAdmission"]

log = logging.getLogger(__name__)

# Timeouts
#: A read (one reply); a healthy Redis on the same network answers in well under 1 ms.
ROUND_TRIP_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 1.0
#: Connections per process; more would not help: Redis runs one command at a time.
POOL_CONNECTIONS = 32

# Slots and health
#: A slot not refreshed this long is a dead holder's (SPEC: freed within 30 s).
SLOT_TTL_S = 20.0
#: How often a holder refreshes its slots while Redis answers (also the health check).
HEARTBEAT_S = 5.0
#: How often a lost Redis is tried again (SPEC: back within 10 s of its return).
RECHECK_S = 1.0
#: A stream-count refusal's wait: streams end at no predictable time.
STREAMS_RETRY_AFTER_S = 1.0

KEY_PREFIX = "voxrelay:limits:"

#: What a failed round trip raises: the client's errors, a socket's, our own timeout.
BACKEND_ERRORS = (RedisError, OSError, TimeoutError)

FailurePolicy = Literal["open", "closed"]

# KEYS[1] buckets hash, KEYS[2] stream slots; ARGV: requests/min, chars/min, streams per
# key, chars asked, slot member, slot ttl (ms). Returns {0} granted, {1, held} too many
# streams, {2} larger than the whole character budget, {3, what, wait_ms} rate limited
# (what: 1 requests, 2 characters). Numbers are written with %.17g: exact doubles.
ADMIT_LUA = """
local rpm, cpm, spk = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local chars, ttl = tonumber(ARGV[4]), tonumber(ARGV[6])
local t = redis.call('TIME')
local sec, usec = tonumber(t[1]), tonumber(t[2])
local now_ms = sec * 1000 + math.floor(usec / 1000)
if spk > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  local held = redis.call('ZCARD', KEYS[2])
  if held >= spk then return {1, held} end
end
if cpm > 0 and chars > cpm then return {2} end
if rpm > 0 or cpm > 0 then
  local rt, ct = rpm, cpm
  local state = redis.call('HMGET', KEYS[1], 'rt', 'ct', 's', 'us')
  if state[3] then
    local elapsed = (sec - tonumber(state[3])) + (usec - tonumber(state[4])) / 1e6
    if elapsed < 0 then elapsed = 0 end
    rt = math.min(rpm, tonumber(state[1]) + elapsed * rpm / 60)
    ct = math.min(cpm, tonumber(state[2]) + elapsed * cpm / 60)
  end
  local wait_r, wait_c = 0, 0
  if rpm > 0 and rt + 1e-9 < 1 then
    wait_r = math.ceil((1 - rt) / (rpm / 60) * 1000 - 1e-6)
  end
  if cpm > 0 and ct + 1e-9 < chars then
    wait_c = math.ceil((chars - ct) / (cpm / 60) * 1000 - 1e-6)
  end
  if wait_r > 0 or wait_c > 0 then
    if wait_r >= wait_c then return {3, 1, wait_r} end
    return {3, 2, wait_c}
  end
  if rpm > 0 then rt = rt - 1 end
  if cpm > 0 then ct = ct - chars end
  redis.call('HSET', KEYS[1], 'rt', string.format('%.17g', rt),
    'ct', string.format('%.17g', ct), 's', t[1], 'us', t[2])
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if spk > 0 then
  redis.call('ZADD', KEYS[2], now_ms + ttl, ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ttl + 1000)
end
return {0}
"""

# KEYS[1] buckets hash; ARGV: requests/min, chars/min, chars asked. Takes characters only
# (a streamed input's piece), refilling both buckets as ADMIT_LUA does, since they share
# one time stamp. Returns {0} taken, {2} larger than the whole budget, {3, 2, wait_ms}.
CHARGE_LUA = """
local rpm, cpm, chars = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if cpm <= 0 then return {0} end
if chars > cpm then return {2} end
local t = redis.call('TIME')
local sec, usec = tonumber(t[1]), tonumber(t[2])
local rt, ct = rpm, cpm
local state = redis.call('HMGET', KEYS[1], 'rt', 'ct', 's', 'us')
if state[3] then
  local elapsed = (sec - tonumber(state[3])) + (usec - tonumber(state[4])) / 1e6
  if elapsed < 0 then elapsed = 0 end
  rt = math.min(rpm, tonumber(state[1]) + elapsed * rpm / 60)
  ct = math.min(cpm, tonumber(state[2]) + elapsed * cpm / 60)
end
if ct + 1e-9 < chars then
  return {3, 2, math.ceil((chars - ct) / (cpm / 60) * 1000 - 1e-6)}
end
ct = ct - chars
redis.call('HSET', KEYS[1], 'rt', string.format('%.17g', rt),
  'ct', string.format('%.17g', ct), 's', t[1], 'us', t[2])
redis.call('PEXPIRE', KEYS[1], 61000)
return {0}
"""

# KEYS: slot sets; ARGV[1] slot ttl (ms), ARGV[i + 1] the member held in KEYS[i].
# XX: a slot released (or swept) meanwhile is not brought back.
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local ttl = tonumber(ARGV[1])
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ttl + 1000)
end
return #KEYS
"""


def _keys(caller: str) -> tuple[str, str]:
    tagged = f"{KEY_PREFIX}{{{caller}}}"
    return f"{tagged}:buckets", f"{tagged}:streams"


class RedisAdmission:
    """Decide whether a caller may start a stream, with budgets shared through Redis."""

    def __init__(
        self,
        client: Redis,
        *,
        requests_per_min: int,
        chars_per_min: int,
        streams_per_key: int,
        failure: FailurePolicy = "open",
        slot_ttl_s: float = SLOT_TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
        recheck_s: float = RECHECK_S,
        round_trip_s: float = 2 * ROUND_TRIP_TIMEOUT_S + CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests_per_min = requests_per_min
        self.chars_per_min = chars_per_min
        self.streams_per_key = streams_per_key
        self.failure = failure
        self.slot_ttl_s = slot_ttl_s
        self.heartbeat_s = heartbeat_s
        self.recheck_s = recheck_s
        self.round_trip_s = round_trip_s
        self._clock = clock
        self._client = client
        self._admit_script = client.register_script(ADMIT_LUA)
        self._heartbeat_script = client.register_script(HEARTBEAT_LUA)
        self._charge_script = client.register_script(CHARGE_LUA)
        #: None until the first check; then whether the shared limits are in force.
        self.up: bool | None = None
        self._shared = asyncio.Event()
        self._fallback: Admission | None = None
        #: Slots this process holds: member → its sorted set.
        self._held: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        self._connections = asyncio.Semaphore(POOL_CONNECTIONS)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        read_timeout_s: float = ROUND_TRIP_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        **options: Any,
    ) -> RedisAdmission:
        """Build one on its own connection pool; nothing connects until :meth:`start`.

        The pool is bounded; round trips queue for it (see :meth:`_trip`).
        """
        pool = ConnectionPool.from_url(
            url,
            max_connections=POOL_CONNECTIONS,
            socket_timeout=read_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            # A retry would multiply the bound of a round trip: the failure policy decides.
            retry=Retry(NoBackoff(), 0),
        )
        options.setdefault("round_trip_s", 2 * read_timeout_s + connect_timeout_s)
        return cls(Redis(connection_pool=pool), **options)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisAdmission:
        assert settings.redis_url is not None
        return cls.from_url(
            settings.redis_url,
            requests_per_min=settings.rate_limit_per_min,
            chars_per_min=settings.chars_per_min,
            streams_per_key=settings.max_streams_per_key,
            failure=settings.redis_failure,
        )

    # Lifecycle

    async def start(self) -> None:
        """Check Redis once (down is a state, never an error) and start the upkeep."""
        if self._keeper is not None:
            return
        # The keeper first: a concurrent start sees it and does not start another.
        self._keeper = asyncio.create_task(self._keep(), name="limits-redis-keeper")
        await self._check()

    async def aclose(self) -> None:
        """Stop the upkeep, finish the releases under way, close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        await self.settle()
        await self._client.aclose(close_connection_pool=True)

    async def wait_shared(self) -> None:
        """Wait until the shared limits are in force (Redis answers)."""
        await self._shared.wait()

    async def settle(self) -> None:
        """Wait for the round trips under way (releases, cancelled admits) to end."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # Admission

    async def admit(self, key: str | None, chars: int) -> Lease:
        """Grant a stream to *key* for *chars* input characters, or raise a typed refusal.

        ``key`` None means an anonymous internal caller: no per-key limits, no round trip.
        """
        if key is None:
            return Lease()
        if self._keeper is None:
            await self.start()
        if not self.up:
            return await self._degraded(key, chars)
        buckets, streams = _keys(key)
        member = uuid.uuid4().hex
        trip = self._spawn(self._run_admit(buckets, streams, chars, member))
        try:
            # Shielded: a caller that goes away mid-trip must not leave a slot behind.
            reply = await asyncio.shield(trip)
        except asyncio.CancelledError:
            trip.add_done_callback(lambda done: self._forget_slot(done, streams, member))
            raise
        except BACKEND_ERRORS as exc:
            self._went_down(exc)
            return await self._degraded(key, chars)
        return self._grant(reply, streams, member, chars)

    async def charge(self, key: str | None, chars: int) -> None:
        """Take *chars* more input characters from *key*'s shared budget, or raise a refusal."""
        if key is None or chars <= 0 or not self.chars_per_min:
            return
        if self._keeper is None:
            await self.start()
        if self.up:
            buckets, _ = _keys(key)
            try:
                async with self._trip():
                    reply = await self._charge_script(
                        keys=[buckets], args=[self.requests_per_min, self.chars_per_min, chars]
                    )
            except BACKEND_ERRORS as exc:
                self._went_down(exc)
            else:
                code = int(reply[0])
                if code == 2:
                    raise TooLarge(
                        f"a piece of {chars} characters exceeds this caller's budget of"
                        f" {self.chars_per_min} per minute"
                    )
                if code == 3:
                    wait = int(reply[2]) / 1000
                    raise RateLimited(
                        f"rate limit of {self.chars_per_min} characters per minute reached:"
                        f" retry in {wait:.1f} s",
                        retry_after_s=wait,
                    )
                return
        if self.failure == "closed":
            raise Unavailable(
                "the shared limits (Redis) cannot be reached: retry shortly", retry_after_s=1.0
            )
        await self._fallback_admission().charge(key, chars)

    async def _run_admit(self, buckets: str, streams: str, chars: int, member: str) -> Any:
        ttl_ms = round(self.slot_ttl_s * 1000)
        args = (self.requests_per_min, self.chars_per_min, self.streams_per_key)
        async with self._trip():
            return await self._admit_script(
                keys=[buckets, streams], args=[*args, chars, member, ttl_ms]
            )

    def _grant(self, reply: Sequence[int], streams: str, member: str, chars: int) -> Lease:
        code = int(reply[0])
        if code == 1:
            raise RateLimited(
                f"this caller already has {int(reply[1])} streams in flight"
                f" (limit {self.streams_per_key}): wait for one to end",
                retry_after_s=STREAMS_RETRY_AFTER_S,
            )
        if code == 2:
            raise TooLarge(
                f"{chars} characters exceed this caller's budget of {self.chars_per_min} per minute"
            )
        if code == 3:
            what = "requests" if int(reply[1]) == 1 else "characters"
            limit = self.requests_per_min if what == "requests" else self.chars_per_min
            wait = int(reply[2]) / 1000
            raise RateLimited(
                f"rate limit of {limit} {what} per minute reached: retry in {wait:.1f} s",
                retry_after_s=wait,
            )
        if not self.streams_per_key:
            return Lease()
        self._held[member] = streams
        return Lease(lambda: self._release(streams, member))

    def _release(self, streams: str, member: str) -> None:
        self._held.pop(member, None)
        if self.up and not self._closed:
            self._spawn(self._remove_slot(streams, member))
        # Else the slot expires on its own: no heartbeat refreshes it any more.

    async def _remove_slot(self, streams: str, member: str) -> None:
        try:
            async with self._trip():
                await self._client.zrem(streams, member)
        except BACKEND_ERRORS as exc:
            self._went_down(exc)

    def _forget_slot(self, trip: asyncio.Task[Any], streams: str, member: str) -> None:
        """Give back a slot granted to a caller that had gone by the time it came."""
        if trip.cancelled() or trip.exception() is not None:
            return
        reply = trip.result()
        if int(reply[0]) == 0 and self.streams_per_key:
            self._release(streams, member)

    async def _degraded(self, key: str, chars: int) -> Lease:
        """Admit while Redis is away: per-process budgets (open) or a refusal (closed)."""
        if self.failure == "closed":
            raise Unavailable(
                "the shared limits (Redis) cannot be reached: retry shortly",
                retry_after_s=1.0,
            )
        return await self._fallback_admission().admit(key, chars)

    def _fallback_admission(self) -> Admission:
        """The per-process budgets of the ``open`` policy, made when first needed."""
        if self._fallback is None:
            self._fallback = Admission(
                requests_per_min=self.requests_per_min,
                chars_per_min=self.chars_per_min,
                streams_per_key=self.streams_per_key,
                clock=self._clock,
            )
        return self._fallback

    # Health

    async def _keep(self) -> None:
        """Refresh our slots while Redis answers; try it again while it does not."""
        while True:
            await asyncio.sleep(self.heartbeat_s if self.up else self.recheck_s)
            await self._check()

    async def _check(self) -> None:
        try:
            async with self._trip():
                if not self.up:
                    # Redis may have restarted empty: load the script while checking.
                    await self._client.script_load(ADMIT_LUA)
                elif self._held:
                    members = list(self._held.items())
                    await self._heartbeat_script(
                        keys=[streams for _, streams in members],
                        args=[round(self.slot_ttl_s * 1000), *(m for m, _ in members)],
                    )
                else:
                    await self._client.ping()
        except BACKEND_ERRORS as exc:
            self._went_down(exc)
        else:
            self._went_up()

    def _went_down(self, exc: BaseException) -> None:
        metrics.LIMITS_BACKEND_ERRORS.inc()
        if self.up is False:
            return
        self.up = False
        self._shared.clear()
        self._fallback = None  # the next degraded admit starts fresh budgets
        metrics.LIMITS_BACKEND_UP.set(0)
        policy = "per-process limits" if self.failure == "open" else "refusing requests"
        log.warning(
            "shared limits unavailable (%s): %s until Redis answers",
            type(exc).__name__,
            policy,
            extra={
                "event": "limits_backend",
                "up": False,
                "failure": self.failure,
                "reason": str(exc) or type(exc).__name__,
            },
        )

    def _went_up(self) -> None:
        if self.up is True:
            return
        self.up = True
        self._shared.set()
        self._fallback = None
        metrics.LIMITS_BACKEND_UP.set(1)
        log.info(
            "shared limits in force (Redis)",
            extra={"event": "limits_backend", "up": True, "failure": self.failure},
        )

    @contextlib.asynccontextmanager
    async def _trip(self) -> AsyncIterator[None]:
        """Bound one round trip, the wait for a connection included.

        Round trips queue first-come first-served for the pool's connections (a
        semaphore: the pool's own waiting wakes every waiter on each release), so a
        burst of admits is served in order on a few connections.
        """
        async with asyncio.timeout(self.round_trip_s), self._connections:
            yield

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
