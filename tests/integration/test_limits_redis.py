"""Shared limits in a real Redis: exact across replicas, dead holders, outages, slowness.

Each "replica" is a :class:`RedisAdmission` on its own connection pool (or a child
process for a holder that dies); the server is Debian's ``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from tests.conftest import AppFactory
from tests.integration.test_cli import voxrelay
from tests.integration.test_grpc import retry_delay_ms
from tests.integration.test_limits import grpc_refusal, speak_grpc
from tests.redis_server import RedisServer, free_port, needs_redis
from tests.servers import ROOT, make_settings, serve_process
from voxrelay.service import metrics
from voxrelay.service.errors import RateLimited, TooLarge, Unavailable
from voxrelay.service.limits import Admission, make_admission
from voxrelay.service.limits_redis import RedisAdmission
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

pytestmark = needs_redis

Factory = Callable[..., Awaitable[RedisAdmission]]


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Factory]:
    """Build started :class:`RedisAdmission` instances on the test's Redis; close them after."""
    made: list[RedisAdmission] = []

    async def make(url: str | None = None, **options: Any) -> RedisAdmission:
        options.setdefault("requests_per_min", 0)
        options.setdefault("chars_per_min", 0)
        options.setdefault("streams_per_key", 0)
        admission = RedisAdmission.from_url(url or redis_server.url, **options)
        made.append(admission)
        await admission.start()
        return admission

    yield make
    for admission in made:
        await admission.aclose()
    metrics.LIMITS_BACKEND_UP.set(1)


def gauge() -> float:
    value = metrics.REGISTRY.get_sample_value("voxrelay_limits_backend_up")
    assert value is not None
    return value


async def back_within(admission: RedisAdmission, limit: float) -> None:
    """Wait until *admission* has the shared limits in force again (SPEC: within 10 s)."""
    async with asyncio.timeout(limit):
        await admission.wait_shared()


async def test_request_budget_is_shared_and_the_wait_is_exact(replicas: Factory) -> None:
    a, b = await replicas(requests_per_min=3), await replicas(requests_per_min=3)
    assert a.up and b.up and gauge() == 1
    (await a.admit("k", 1)).release()
    (await b.admit("k", 1)).release()
    (await a.admit("k", 1)).release()
    for replica in (a, b):
        with pytest.raises(RateLimited) as refused:
            await replica.admit("k", 1)
        wait = refused.value.retry_after_ms
        # One request every 20 s, from the server's clock: less only what has elapsed.
        assert wait is not None and 18_000 < wait <= 20_000
        assert "3 requests per minute" in refused.value.message
    (await b.admit("other", 1)).release()  # another key is not affected


async def test_character_budget_is_shared_and_too_large_is_refused(replicas: Factory) -> None:
    a, b = await replicas(chars_per_min=6000), await replicas(chars_per_min=6000)
    (await a.admit("k", 5000)).release()
    with pytest.raises(RateLimited) as refused:
        await b.admit("k", 2000)  # 1000 missing at 100 a second: 10 s
    wait = refused.value.retry_after_ms
    assert wait is not None and 9_000 < wait <= 10_000
    assert "characters" in refused.value.message
    (await b.admit("k", 900)).release()  # a refused request consumed nothing
    with pytest.raises(TooLarge):
        await a.admit("k", 6001)


async def test_streamed_pieces_are_charged_to_the_shared_budget(replicas: Factory) -> None:
    a = await replicas(requests_per_min=2, chars_per_min=6000)
    b = await replicas(requests_per_min=2, chars_per_min=6000)
    (await a.admit("k", 0)).release()
    await a.charge("k", 3000)  # a streamed input's pieces, as they arrive
    await b.charge("k", 2000)
    with pytest.raises(RateLimited) as refused:
        await a.charge("k", 2000)  # 1000 missing at 100 a second: 10 s
    wait = refused.value.retry_after_ms
    assert wait is not None and 9_000 < wait <= 10_000
    await b.charge("k", 900)  # a refused piece consumed nothing
    with pytest.raises(TooLarge):
        await b.charge("k", 6001)
    (await b.admit("k", 0)).release()  # charging took no request token
    await a.charge(None, 10**6)  # anonymous: no limit, no round trip


async def test_stream_slots_are_shared_and_come_back(replicas: Factory) -> None:
    a, b = await replicas(streams_per_key=2), await replicas(streams_per_key=2)
    first, second = await a.admit("k", 1), await b.admit("k", 1)
    for replica in (a, b):
        with pytest.raises(RateLimited) as refused:
            await replica.admit("k", 1)
        assert refused.value.retry_after_ms == 1000
        assert "2 streams in flight" in refused.value.message
    first.release()
    first.release()  # idempotent
    await a.settle()
    third = await b.admit("k", 1)
    with pytest.raises(RateLimited):
        await a.admit("k", 1)
    for lease in (second, third):
        lease.release()
    await a.settle()
    await b.settle()
    assert await a._client.zcard("voxrelay:limits:{k}:streams") == 0


async def test_a_burst_of_admits_queues_for_connections_and_stays_shared(
    replicas: Factory,
) -> None:
    a = await replicas(requests_per_min=10_000, streams_per_key=1000)
    leases = await asyncio.gather(*(a.admit(f"k{n % 7}", 1) for n in range(300)))
    assert a.up and gauge() == 1  # no "pool exhausted" counted as Redis being away
    held = await a._client.zcard("voxrelay:limits:{k0}:streams")
    assert held == len(range(0, 300, 7))
    for lease in leases:
        lease.release()
    await a.settle()


async def test_anonymous_callers_cost_no_round_trip(replicas: Factory) -> None:
    a = await replicas(requests_per_min=1, streams_per_key=1)
    await a._client.aclose()  # any round trip would now fail loudly
    leases = [await a.admit(None, 10_000) for _ in range(3)]
    assert len(leases) == 3 and a.up


async def test_keys_expire(replicas: Factory) -> None:
    a = await replicas(requests_per_min=10, chars_per_min=100, streams_per_key=2)
    lease = await a.admit("k", 10)
    ttl_buckets = await a._client.pttl("voxrelay:limits:{k}:buckets")
    ttl_streams = await a._client.pttl("voxrelay:limits:{k}:streams")
    assert 0 < ttl_buckets <= 61_000 and 0 < ttl_streams <= 21_000
    lease.release()


HOLDER = """
import asyncio, sys
from voxrelay.service.limits_redis import RedisAdmission
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

async def main():
    a = RedisAdmission.from_url(sys.argv[1], requests_per_min=0, chars_per_min=0,
                                streams_per_key=1, slot_ttl_s=1.0, heartbeat_s=0.2)
    await a.start()
    await a.admit("k", 1)
    print("held", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_dead_holders_slot_is_freed_and_a_live_ones_is_kept(
    redis_server: RedisServer, replicas: Factory
) -> None:
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, redis_server.url,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(30):
            assert await holder.stdout.readline() == b"held\n"
        other = await replicas(streams_per_key=1, slot_ttl_s=1.0)
        # Alive, the holder refreshes its slot well past its 1 s lifetime.
        for _ in range(3):
            with pytest.raises(RateLimited):
                await other.admit("k", 1)
            await asyncio.sleep(0.5)
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        freed = asyncio.Event()

        async def take() -> None:
            while True:
                try:
                    (await other.admit("k", 1)).release()
                except RateLimited:
                    await asyncio.sleep(0.05)
                else:
                    freed.set()
                    return

        async with asyncio.timeout(5):  # the slot's lifetime (1 s) and some slack
            await take()
        assert freed.is_set()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_redis_stopped_falls_back_then_recovers(
    redis_server: RedisServer, replicas: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voxrelay")
    a = await replicas(requests_per_min=1, recheck_s=0.2)
    (await a.admit("k", 1)).release()
    with pytest.raises(RateLimited):
        await a.admit("k", 1)
    await asyncio.to_thread(redis_server.stop)
    # Open: the first admit that meets the outage is served on fresh per-process budgets.
    (await a.admit("k", 1)).release()
    assert a.up is False and gauge() == 0
    with pytest.raises(RateLimited):
        await a.admit("k", 1)  # the fallback's own budget holds meanwhile
    await asyncio.to_thread(redis_server.start)
    await back_within(a, 10)
    assert gauge() == 1
    changes = [r for r in caplog.records if getattr(r, "event", None) == "limits_backend"]
    assert [r.up for r in changes] == [True, False, True]  # type: ignore[attr-defined]
    # Shared again: the restarted Redis kept nothing (no persistence here), so the
    # bucket starts full, and spends across replicas once more.
    b = await replicas(requests_per_min=1)
    (await a.admit("k", 1)).release()
    with pytest.raises(RateLimited):
        await b.admit("k", 1)


async def test_redis_down_at_start_is_a_state_not_a_crash(replicas: Factory) -> None:
    a = await replicas(f"redis://127.0.0.1:{free_port()}/0", requests_per_min=1)
    assert a.up is False and gauge() == 0
    (await a.admit("k", 1)).release()
    with pytest.raises(RateLimited):
        await a.admit("k", 1)


async def test_closed_policy_refuses_with_unavailable(
    redis_server: RedisServer, replicas: Factory
) -> None:
    a = await replicas(requests_per_min=10, failure="closed", recheck_s=0.2)
    (await a.admit("k", 1)).release()
    await asyncio.to_thread(redis_server.stop)
    for _ in range(2):  # the outage found by an admit, then known
        with pytest.raises(Unavailable) as refused:
            await a.admit("k", 1)
        assert refused.value.retryable and refused.value.retry_after_ms == 1000
    assert (await a.admit(None, 1)) is not None  # anonymous callers need no Redis
    await asyncio.to_thread(redis_server.start)
    await back_within(a, 10)
    (await a.admit("k", 1)).release()


async def test_a_redis_that_does_not_answer_is_bounded(
    redis_server: RedisServer, replicas: Factory
) -> None:
    a = await replicas(
        requests_per_min=10, read_timeout_s=0.2, connect_timeout_s=0.2, recheck_s=0.2
    )
    (await a.admit("k", 1)).release()
    redis_server.pause()
    try:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        (await a.admit("k", 1)).release()  # served by the fallback once the read times out
        took = time.monotonic() - started
        ticker.cancel()
        assert a.up is False
        assert took < 2.0  # the bound: read + connect timeouts, not forever
        assert ticks > 0  # the loop went on meanwhile
    finally:
        redis_server.resume()
    await back_within(a, 10)


async def test_make_admission_picks_redis_only_with_a_url(redis_server: RedisServer) -> None:
    local = make_admission(make_settings())
    assert isinstance(local, Admission)
    shared = make_admission(make_settings(redis_url=redis_server.url, redis_failure="closed"))
    assert isinstance(shared, RedisAdmission) and shared.failure == "closed"
    await shared.start()
    assert shared.up
    await shared.aclose()


async def test_a_cancelled_admit_leaves_no_slot(replicas: Factory) -> None:
    a = await replicas(streams_per_key=1)
    trip = asyncio.create_task(a.admit("k", 1))
    await asyncio.sleep(0)  # the round trip is under way
    trip.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trip
    await a.settle()
    await a.settle()  # the release the cancelled grant scheduled
    (await a.admit("k", 1)).release()


# Through the real app and process


async def test_two_replicas_share_one_keys_budget(
    redis_server: RedisServer, app_factory: AppFactory
) -> None:
    shared = dict(api_keys="replica-key", rate_limit_per_min=2, redis_url=redis_server.url)
    one, two = await app_factory(**shared), await app_factory(**shared)
    assert (await speak_grpc(one, "replica-key"))[-1].HasField("finished")
    assert (await speak_grpc(two, "replica-key"))[-1].HasField("finished")
    for app in (one, two):
        refused = await grpc_refusal(app, "replica-key")
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        delay = retry_delay_ms(refused)
        assert 25_000 < delay <= 30_000  # one request every 30 s, less what has elapsed
    assert gauge() == 1


async def test_a_malformed_url_fails_start_up_in_one_line_without_the_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env.update(VOXRELAY_REDIS_URL="redis://user:hunter2@redis:notaport/0")
    code, _, err = await voxrelay("serve", env=env)
    assert code != 0 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert "VOXRELAY_REDIS_URL" in line and "port" in line, err
    assert "hunter2" not in err


async def test_a_process_starts_with_redis_down_and_serves() -> None:
    async with serve_process(
        VOXRELAY_REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        VOXRELAY_API_KEYS="process-key",
    ) as server:
        change = await server.wait_for_event("limits_backend")
        assert change["up"] is False and change["failure"] == "open"
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(
                pb.SynthesizeRequest(text="Still serving.", mode=pb.MODE_SPEAK),
                timeout=60,
                metadata=(("authorization", "Bearer process-key"),),
            )
            assert [r async for r in call][-1].HasField("finished")
    assert not any("hunter2" in json.dumps(line) for line in server.lines)
