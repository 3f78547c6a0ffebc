"""The sans-I/O limits: token buckets, per-caller admission, connection counts.

Time is an injected clock: every refill is instant and exact.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.servers import make_settings
from tests.unit.clock import Clock
from voxrelay.service.errors import Busy, RateLimited, TooLarge
from voxrelay.service.limits import Admission, ConnectionLimits, Lease, TokenBucket


def admission(clock: Clock, rpm: int = 0, cpm: int = 0, streams: int = 0) -> Admission:
    return Admission(requests_per_min=rpm, chars_per_min=cpm, streams_per_key=streams, clock=clock)


def test_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(capacity=10, rate=2, now=0)
    assert bucket.wait_for(10, 0) == 0
    bucket.take(10, 0)
    assert bucket.wait_for(1, 0) == pytest.approx(0.5)
    assert bucket.wait_for(4, 1) == pytest.approx(1.0)  # 2 tokens back after 1 s
    assert bucket.is_full(100) and bucket.tokens == 10


async def test_requests_per_minute_refuses_with_the_wait_then_refills() -> None:
    clock = Clock()
    limits = admission(clock, rpm=2)
    (await limits.admit("a", 5)).release()
    (await limits.admit("a", 5)).release()
    with pytest.raises(RateLimited) as refused:
        await limits.admit("a", 5)
    assert refused.value.code == "rate_limited" and refused.value.retryable
    assert refused.value.retry_after_ms == 30_000  # one request every 30 s
    assert "2 requests per minute" in refused.value.message
    # Refused requests do not count: 10 s later the wait is 20 s, not 30 s more.
    clock.advance(10)
    with pytest.raises(RateLimited) as again:
        await limits.admit("a", 5)
    assert again.value.retry_after_ms == 20_000
    # Other callers are served meanwhile.
    (await limits.admit("b", 5)).release()
    clock.advance(20)
    (await limits.admit("a", 5)).release()


async def test_characters_per_minute_refuses_with_the_wait_then_refills() -> None:
    clock = Clock()
    limits = admission(clock, cpm=120)  # two characters a second
    (await limits.admit("a", 100)).release()
    with pytest.raises(RateLimited) as refused:
        await limits.admit("a", 40)
    assert refused.value.retry_after_ms == 10_000  # 20 missing at 2/s
    assert "120 characters per minute" in refused.value.message
    (await limits.admit("b", 120)).release()
    clock.advance(10)
    (await limits.admit("a", 40)).release()


async def test_a_request_larger_than_the_whole_budget_is_too_large() -> None:
    limits = admission(Clock(), cpm=50)
    with pytest.raises(TooLarge) as refused:
        await limits.admit("a", 51)
    assert not refused.value.retryable and refused.value.retry_after_s is None


async def test_the_longest_wait_is_reported() -> None:
    clock = Clock()
    limits = admission(clock, rpm=60, cpm=60)  # 1 request and 1 character a second
    (await limits.admit("a", 60)).release()
    with pytest.raises(RateLimited) as refused:
        await limits.admit("a", 30)
    assert refused.value.retry_after_ms == 30_000


async def test_concurrent_streams_per_key_and_the_slot_returns() -> None:
    limits = admission(Clock(), streams=2)
    first, second = await limits.admit("a", 1), await limits.admit("a", 1)
    with pytest.raises(RateLimited) as refused:
        await limits.admit("a", 1)
    assert refused.value.retry_after_ms == 1000
    assert "2 streams in flight" in refused.value.message
    other = await limits.admit("b", 1)  # another key is not affected
    first.release()
    first.release()  # idempotent: releasing twice frees one slot
    third = await limits.admit("a", 1)
    with pytest.raises(RateLimited):
        await limits.admit("a", 1)
    for lease in (second, third, other):
        lease.release()


async def test_anonymous_callers_and_zero_limits_are_not_limited() -> None:
    limits = admission(Clock(), rpm=1, cpm=1, streams=1)
    leases = [await limits.admit(None, 10_000) for _ in range(5)]
    assert all(isinstance(lease, Lease) for lease in leases)
    off = admission(Clock())
    held = [await off.admit("a", 10_000) for _ in range(100)]
    assert len(held) == 100


async def test_from_settings_uses_the_settings_and_the_clock() -> None:
    clock = Clock()
    limits = Admission.from_settings(
        make_settings(rate_limit_per_min=1, chars_per_min=0, max_streams_per_key=0), clock=clock
    )
    await limits.admit("a", 1)
    with pytest.raises(RateLimited) as refused:
        await limits.admit("a", 1)
    assert refused.value.retry_after_ms == 60_000
    clock.advance(60)
    await limits.admit("a", 1)


async def test_quiet_callers_are_forgotten() -> None:
    clock = Clock()
    limits = admission(clock, rpm=10_000)
    for n in range(1022):
        (await limits.admit(f"caller-{n}", 1)).release()
    held = await limits.admit("busy", 1)
    clock.advance(1000)
    (await limits.admit("late", 1)).release()  # every 1024th admit prunes
    assert set(limits._callers) <= {"busy", "late"} and "busy" in limits._callers
    held.release()


def test_connection_limits_total_and_per_address() -> None:
    conns = ConnectionLimits(total=3, per_address=2)
    a1, a2 = conns.acquire("10.0.0.1"), conns.acquire("10.0.0.1")
    with pytest.raises(Busy) as per_address:
        conns.acquire("10.0.0.1")
    assert per_address.value.retry_after_ms == 1000 and per_address.value.retryable
    b1 = conns.acquire("10.0.0.2")  # others are served meanwhile
    with pytest.raises(Busy) as total:
        conns.acquire("10.0.0.3")
    assert "3 connections" in total.value.message
    a1.release()
    a1.release()
    assert conns.open == 2 and conns.count("10.0.0.1") == 1
    a3 = conns.acquire("10.0.0.1")
    for lease in (a2, a3, b1):
        lease.release()
    assert conns.open == 0 and conns.count("10.0.0.1") == 0


def test_connection_limits_zero_is_off() -> None:
    conns = ConnectionLimits(total=0, per_address=0)
    leases = [conns.acquire("10.0.0.1") for _ in range(1000)]
    assert conns.open == len(leases)


@given(
    cpm=st.integers(1, 100_000),
    rpm=st.integers(0, 1000),
    sizes=st.lists(st.integers(1, 100_000), min_size=1, max_size=20),
)
async def test_waiting_the_advised_time_is_always_enough(
    cpm: int, rpm: int, sizes: list[int]
) -> None:
    clock = Clock()
    limits = admission(clock, rpm=rpm, cpm=cpm)
    for size in (min(s, cpm) for s in sizes):
        try:
            (await limits.admit("a", size)).release()
        except RateLimited as refused:
            assert refused.retry_after_ms is not None and refused.retry_after_ms > 0
            clock.advance(refused.retry_after_ms / 1000)
            (await limits.admit("a", size)).release()
