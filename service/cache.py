"""The phrase cache: a segment said once before is replayed, not synthesised again.

A phrase is one segment's PCM as the speech engine made it (and, when the engine reports
them, its word marks), keyed by everything that shapes that audio: the engine and its
model, voice, speed, instructions, sample rate and the *spoken* text. The stream's own
encoder turns the PCM into its format, so one entry serves every format, and word
timings fitted from the PCM come out as they did the first time.

- :class:`PhraseCache` keeps phrases in memory, least recently used first out, within a
  byte bound (``VOXRELAY_CACHE_MB``). :meth:`PhraseCache.phrase` is single flight: while
  one stream makes a phrase, another stream that asks for it waits for the whole entry
  (see :class:`Recording`) and replays it.
- :class:`SharedPhrases` is the second tier, in Redis (``VOXRELAY_REDIS_URL``), for other
  workers and replicas: its own byte bound and expiry, kept by two atomic scripts. Every
  round trip has a timeout, and a failure is a miss.

Only whole phrases are stored: a segment that failed, was cancelled or outgrew the
entry bound leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from . import metrics
from .settings import Settings
from .words import WordMark

__all__ = ["Phrase", "PhraseCache", "PhraseKey", "Recording", "SharedPhrases"]

log = logging.getLogger(__name__)

MB = 1024 * 1024
#: Bookkeeping one entry costs besides its PCM (the key, the dict slot, the object).
ENTRY_OVERHEAD = 256
#: One phrase may take at most this share of the bound, so one long segment cannot
#: push out every short one.
MAX_ENTRY_SHARE = 4
#: A stream waits this long at most for a phrase another stream is making, then asks
#: the engine itself: about what a segment's synthesis takes, at worst, when all is well.
MAX_FLIGHT_WAIT_S = 5.0
#: A Redis round trip longer than this is a miss: the engine is asked instead.
REDIS_TIMEOUT_S = 0.25
#: After a Redis failure, the shared tier is not asked again for this long.
REDIS_RETRY_S = 5.0
#: Redis keys of the shared tier (one hash tag: one slot on a cluster).
REDIS_PREFIX = "{voxrelay-phrases}"

_MAGIC = b"VXP1"
_HEAD = struct.Struct("<4sII")
_MARK = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class PhraseKey:
    """Everything that shapes a segment's audio."""

    engine: str
    model: str
    voice: str
    speed: float
    instructions: str
    sample_rate: int
    #: the text as the engine is given it (after normalization and the lexicon).
    text: str

    def digest(self) -> str:
        """Return a stable name of this key, the same in every process and replica."""
        fields = (
            self.engine,
            self.model,
            self.voice,
            repr(float(self.speed)),
            self.instructions,
            str(self.sample_rate),
            self.text,
        )
        joined = "\x1f".join(fields).encode("utf-8", "surrogatepass")
        return hashlib.sha256(joined).hexdigest()


@dataclass(frozen=True, slots=True)
class Phrase:
    """One segment's audio: s16le mono PCM, and the engine's word marks when it gave any."""

    pcm: bytes
    sample_rate: int
    marks: tuple[WordMark, ...] | None = None

    @property
    def size(self) -> int:
        return len(self.pcm) + ENTRY_OVERHEAD

    def to_bytes(self) -> bytes:
        """Serialize for the shared tier."""
        marks = self.marks
        count = 0xFFFFFFFF if marks is None else len(marks)
        parts = [_HEAD.pack(_MAGIC, self.sample_rate, count)]
        for mark in marks or ():
            parts.append(_MARK.pack(mark.offset, mark.length, mark.time_ms))
        parts.append(self.pcm)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Phrase | None:
        """Read what :meth:`to_bytes` wrote; None for anything else."""
        if len(data) < _HEAD.size:
            return None
        magic, rate, count = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            return None
        at = _HEAD.size
        marks: tuple[WordMark, ...] | None = None
        if count != 0xFFFFFFFF:
            end = at + count * _MARK.size
            if len(data) < end:
                return None
            marks = tuple(
                WordMark(*_MARK.unpack_from(data, at + i * _MARK.size)) for i in range(count)
            )
            at = end
        pcm = data[at:]
        if len(pcm) % 2:
            return None
        return cls(pcm, rate, marks)


class Recording:
    """The phrase a stream makes while it speaks a segment nobody had cached.

    ``add`` each chunk as it is made and ``complete`` once the engine's stream ended
    well; only then is the phrase stored. A recording that outgrows the entry bound
    stops recording, and the segment is spoken on uncached.
    """

    def __init__(self, sample_rate: int, max_bytes: int) -> None:
        self.sample_rate = sample_rate
        self._max = max_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._overflowed = False
        self.phrase: Phrase | None = None

    def add(self, pcm: bytes) -> None:
        if self._overflowed:
            return
        self._size += len(pcm)
        if self._size + ENTRY_OVERHEAD > self._max:
            self._overflowed = True
            self._parts.clear()
            return
        self._parts.append(pcm)

    def complete(self, marks: tuple[WordMark, ...] | None = None) -> None:
        """Say the segment was made whole: what was added is the phrase."""
        if not self._overflowed and self._size:
            self.phrase = Phrase(b"".join(self._parts), self.sample_rate, marks)
        self._parts.clear()


@dataclass(slots=True)
class Lookup:
    """What :meth:`PhraseCache.phrase` found: a phrase to replay, or a recording to make.

    Neither: speak the segment uncached (its maker elsewhere took too long).
    """

    hit: Phrase | None
    recording: Recording | None


@dataclass(slots=True)
class _Flight:
    """A phrase being made: its maker resolves *done* with it, or None if it failed."""

    done: asyncio.Future[Phrase | None]
    waiters: int = 0


class PhraseCache:
    """Phrases in memory, least recently used out first, within *max_bytes*.

    With *shared*, a phrase missing here is looked for there before it is made, and
    a phrase made here is offered there.
    """

    def __init__(
        self,
        max_bytes: int,
        shared: SharedPhrases | None = None,
        *,
        max_wait_s: float = MAX_FLIGHT_WAIT_S,
    ) -> None:
        self.max_bytes = max_bytes
        self.shared = shared
        self.max_wait_s = max_wait_s
        self._entries: OrderedDict[str, Phrase] = OrderedDict()
        self._bytes = 0
        self._flights: dict[str, _Flight] = {}
        self._writes: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> PhraseCache | None:
        """Build the cache the settings ask for (None when ``VOXRELAY_CACHE_MB`` is 0)."""
        max_bytes = int(settings.cache_mb * MB)
        if max_bytes <= 0:
            return None
        shared = None
        if settings.redis_url and settings.cache_redis_mb > 0:
            shared = SharedPhrases.from_url(
                settings.redis_url,
                max_bytes=int(settings.cache_redis_mb * MB),
                ttl_s=settings.cache_redis_ttl_s,
            )
        return cls(max_bytes, shared)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def waiting(self, key: PhraseKey) -> int:
        """Return how many streams wait for the phrase of *key* while another makes it."""
        flight = self._flights.get(key.digest())
        return 0 if flight is None else flight.waiters

    def get(self, key: PhraseKey) -> Phrase | None:
        """Return the phrase of *key* held in memory (now the most recently used)."""
        name = key.digest()
        phrase = self._entries.get(name)
        if phrase is not None:
            self._entries.move_to_end(name)
        return phrase

    def put(self, key: PhraseKey, phrase: Phrase) -> None:
        """Keep *phrase* in memory, pushing out the least recently used past the bound."""
        self._store(key.digest(), phrase)

    @asynccontextmanager
    async def phrase(self, key: PhraseKey) -> AsyncIterator[Lookup]:
        """Find the phrase of *key*, or be the one stream that makes it.

        Yields a :class:`Lookup`: either ``hit`` (replay it) or a ``recording`` to fill
        while speaking the segment; leaving the block stores a completed recording and
        wakes every stream that waited for it. A stream that finds the phrase being made
        waits for the whole of it; if its maker fails or is cancelled, the waiters ask
        again and one of them makes it. A waiter that has waited *max_wait_s* speaks the
        segment itself, uncached (a ``Lookup`` with neither).
        """
        name = key.digest()
        while True:
            phrase = self._entries.get(name)
            if phrase is not None:
                self._entries.move_to_end(name)
                metrics.CACHE_HITS.inc()
                yield Lookup(phrase, None)
                return
            flight = self._flights.get(name)
            if flight is None:
                break
            # Shielded: a waiter that is cancelled must not cancel the maker's future.
            flight.waiters += 1
            stuck = False
            try:
                async with asyncio.timeout(self.max_wait_s):
                    made = await asyncio.shield(flight.done)
            except TimeoutError:
                stuck = True
            finally:
                flight.waiters -= 1
            if stuck:
                # The maker is stuck (an upstream stalling, a listener not reading):
                # speak the segment without it, and leave the caching to the maker.
                metrics.CACHE_MISSES.inc()
                yield Lookup(None, None)
                return
            if made is not None:
                metrics.CACHE_HITS.inc()
                yield Lookup(made, None)
                return
        flight = _Flight(asyncio.get_running_loop().create_future())
        self._flights[name] = flight
        made = None
        try:
            found = await self.shared.get(name) if self.shared is not None else None
            if found is not None and found.sample_rate == key.sample_rate:
                made = found
                self._store(name, found)
                metrics.CACHE_HITS.inc()
                yield Lookup(found, None)
                return
            metrics.CACHE_MISSES.inc()
            recording = Recording(key.sample_rate, self.max_bytes // MAX_ENTRY_SHARE)
            yield Lookup(None, recording)
            made = recording.phrase
            if made is not None:
                self._store(name, made)
                self._offer(name, made)
        finally:
            del self._flights[name]
            flight.done.set_result(made)

    async def flushed(self) -> None:
        """Return once every phrase offered to the shared tier so far has been written."""
        if self._writes:
            await asyncio.wait(set(self._writes))

    async def aclose(self) -> None:
        """Forget every phrase, wait for the writes to the shared tier, and close it."""
        metrics.CACHE_BYTES.dec(self._bytes)
        self._entries.clear()
        self._bytes = 0
        await self.flushed()
        if self.shared is not None:
            await self.shared.aclose()

    def _store(self, name: str, phrase: Phrase) -> None:
        if phrase.size > self.max_bytes // MAX_ENTRY_SHARE:
            return
        before = self._bytes
        old = self._entries.pop(name, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[name] = phrase
        self._bytes += phrase.size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
            metrics.CACHE_EVICTIONS.inc()
        # By difference: every cache of the process adds its own share to the gauge.
        metrics.CACHE_BYTES.inc(self._bytes - before)

    def _offer(self, name: str, phrase: Phrase) -> None:
        """Write *phrase* to the shared tier in the background: no stream waits for it."""
        if self.shared is None:
            return
        task = asyncio.create_task(self.shared.put(name, phrase), name=f"phrase-{name[:12]}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)


# The shared tier. Keys: {p}:e:<name> the entry's bytes (expiring), {p}:lru a sorted set of
# names by last use (Redis TIME in µs, made strictly increasing so that two uses in one
# tick keep their order), {p}:size each name's byte count, {p}:total their sum. Entries
# that expired are dropped from the bookkeeping by the next put.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]
if last and tonumber(last) >= now then now = tonumber(last) + 1 end
"""

_PUT = (
    """
local prefix, name, data = ARGV[1], ARGV[2], ARGV[3]
local ttl, bound = tonumber(ARGV[4]), tonumber(ARGV[5])
local lru, sizes, total = KEYS[1], KEYS[2], KEYS[3]
"""
    + _NOW
    + """
local function drop(member)
  local size = tonumber(redis.call('HGET', sizes, member) or '0')
  redis.call('HDEL', sizes, member)
  redis.call('ZREM', lru, member)
  redis.call('DEL', prefix .. ':e:' .. member)
  redis.call('DECRBY', total, size)
end
local stale = now - ttl * 1000
for _, member in ipairs(redis.call('ZRANGEBYSCORE', lru, '-inf', stale, 'LIMIT', 0, 64)) do
  drop(member)
end
if redis.call('HEXISTS', sizes, name) == 1 then drop(name) end
local size = string.len(data)
local evicted = 0
if size > bound then return evicted end
redis.call('SET', prefix .. ':e:' .. name, data, 'PX', ttl)
redis.call('HSET', sizes, name, size)
redis.call('ZADD', lru, now, name)
redis.call('INCRBY', total, size)
while tonumber(redis.call('GET', total)) > bound do
  drop(redis.call('ZRANGE', lru, 0, 0)[1])
  evicted = evicted + 1
end
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
return evicted
"""
)

_GET = (
    """
local data = redis.call('GET', ARGV[1] .. ':e:' .. ARGV[2])
if data then
"""
    + _NOW
    + """
  redis.call('ZADD', KEYS[1], 'XX', now, ARGV[2])
  redis.call('PEXPIRE', ARGV[1] .. ':e:' .. ARGV[2], ARGV[3])
end
return data
"""
)


class SharedPhrases:
    """Phrases in Redis, shared by workers and replicas, within their own byte bound.

    A round trip that fails or takes longer than *timeout_s* is a miss (or a lost
    write), and the tier rests for :data:`REDIS_RETRY_S` before it is asked again.
    """

    def __init__(
        self,
        client: Any,
        *,
        max_bytes: int,
        ttl_s: float,
        prefix: str = REDIS_PREFIX,
        timeout_s: float = REDIS_TIMEOUT_S,
    ) -> None:
        self._client = client
        self.max_bytes = max_bytes
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = prefix
        self._timeout_s = timeout_s
        self._keys = [f"{prefix}:lru", f"{prefix}:size", f"{prefix}:total"]
        self._put = client.register_script(_PUT)
        self._get = client.register_script(_GET)
        self._resting_until = 0.0

    @classmethod
    def from_url(cls, url: str, *, max_bytes: int, ttl_s: float, **options: Any) -> SharedPhrases:
        from redis.asyncio import Redis

        client = Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=30,
        )
        return cls(client, max_bytes=max_bytes, ttl_s=ttl_s, **options)

    async def get(self, name: str) -> Phrase | None:
        """Return the phrase called *name*, or None (absent, unreadable or Redis away)."""
        data = await self._call(
            self._get, keys=self._keys[:1], args=[self.prefix, name, self._ttl_ms]
        )
        if not isinstance(data, bytes):
            return None
        return Phrase.from_bytes(data)

    async def put(self, name: str, phrase: Phrase) -> None:
        """Store *phrase* as *name*, pushing out the least recently used past the bound."""
        data = phrase.to_bytes()
        if len(data) > self.max_bytes:
            return
        args = [self.prefix, name, data, self._ttl_ms, self.max_bytes]
        evicted = await self._call(self._put, keys=self._keys, args=args)
        if isinstance(evicted, int) and evicted:
            metrics.CACHE_EVICTIONS.inc(evicted)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, script: Any, *, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        if loop.time() < self._resting_until:
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                return await script(keys=keys, args=args)
        except Exception as exc:  # any Redis fault is a miss, never a stream's failure
            self._resting_until = loop.time() + REDIS_RETRY_S
            log.warning(
                "phrase cache: Redis unavailable for %.0f s (%s)", REDIS_RETRY_S, type(exc).__name__
            )
            return None
