"""A cluster on 127.0.0.1: redis-server, two replicas (each a supervisor and its workers), nginx.

Every request goes through nginx, as a client of the deployment would send it. Each test
starts its own cluster with the settings it needs and stops every process after. Waits
are for events (log lines, metrics, replies), bounded; none is a timing under test except
SPEC's own promise that ``voxrelay_limits_backend_up`` returns to 1 within 10 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from tests.nginx_server import Nginx, needs_nginx, running_nginx
from tests.redis_server import RedisServer, needs_redis
from tests.servers import ServerProcess, ends, ready_pids, scrape, value, workers_process
from tests.waiting import eventually
from voxrelay.client import Client, StreamFinished, StreamStarted
from voxrelay.service.errors import RateLimited, Unavailable, VoxrelayError
from voxrelay.service.model import Event

pytestmark = [needs_redis, needs_nginx]

KEY = "cluster-key"
#: Worker processes per replica: two, so that a replica is the supervisor and its workers.
WORKERS = 2
SHORT = "Hello there."
#: Far more audio than the sockets between the server and a client that stops reading can
#: hold, so such a stream stays in flight on its replica until the client reads on.
LONG = " ".join(f"Sentence number {i} is spoken through the cluster." for i in range(40))
WAIT = 60.0


@dataclass
class Cluster:
    redis: RedisServer
    replicas: list[ServerProcess]
    front: Nginx

    def grpc(self) -> Client:
        """A gRPC client of the cluster, through nginx (one channel for all its calls)."""
        return Client(self.front.grpc_target, api_key=KEY, timeout=WAIT)

    def ws(self) -> Client:
        """A WebSocket client of the cluster, through nginx (one connection, one replica)."""
        return Client(self.front.ws_url, api_key=KEY, timeout=WAIT)


def address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


@asynccontextmanager
async def running_cluster(redis: RedisServer, **env: str) -> AsyncIterator[Cluster]:
    """Two replicas sharing *redis*, nginx in front of both; every process stopped after."""
    settings = {
        "VOXRELAY_REDIS_URL": redis.url,
        "VOXRELAY_API_KEYS": KEY,
        "VOXRELAY_ESPEAK_WORKERS": "1",
        "VOXRELAY_HTTP_PORT": "off",
        **env,
    }
    async with AsyncExitStack() as stack:
        replicas = [workers_process(WORKERS, **settings) for _ in range(2)]
        started = await asyncio.gather(*(r.__aenter__() for r in replicas), return_exceptions=True)
        for replica, outcome in zip(replicas, started, strict=True):
            if not isinstance(outcome, BaseException):
                stack.push_async_exit(replica)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        front = await stack.enter_async_context(
            running_nginx(
                grpc=[r.grpc_target for r in replicas], ws=[address(r.ws_url) for r in replicas]
            )
        )
        yield Cluster(redis, replicas, front)


async def speak(client: Client, text: str = SHORT) -> list[Event]:
    """One whole stream; a refusal raises the server's typed error."""
    async with aclosing(client.synthesize(text, mode="speak")) as events:
        return [event async for event in events]


async def speak_once(client: Client, text: str = SHORT) -> list[Event]:
    """One whole stream on a client of its own, closed after."""
    async with client:
        return await speak(client, text)


async def refusal(client: Client, kind: type[VoxrelayError]) -> VoxrelayError:
    with pytest.raises(kind) as refused:
        await speak(client)
    return refused.value


def finished(events: list[Event]) -> bool:
    return isinstance(events[-1], StreamFinished)


async def metric(server: ServerProcess, name: str, **labels: str) -> float:
    return value(await asyncio.to_thread(scrape, server), name, **labels)


async def until_metric(
    server: ServerProcess,
    name: str,
    wanted: Callable[[float], bool],
    within: float = WAIT,
    **labels: str,
) -> None:
    """Poll *server*'s ``/metrics`` until sample *name* satisfies *wanted*."""
    async with asyncio.timeout(within):
        while not wanted(await metric(server, name, **labels)):  # noqa: ASYNC110 - a gauge
            await asyncio.sleep(0.1)


def served_ok(server: ServerProcess) -> int:
    return sum(1 for line in ends(server) if line["outcome"] == "ok")


async def test_a_keys_request_budget_is_exact_across_replicas(redis_server: RedisServer) -> None:
    per_min = 4
    async with (
        running_cluster(redis_server, VOXRELAY_RATE_LIMIT_PER_MIN=str(per_min)) as cluster,
        cluster.grpc() as client,
        cluster.ws() as ws,
    ):
        began = time.monotonic()
        for _ in range(per_min):
            assert finished(await speak(client))
        refused = [await refusal(client, RateLimited), await refusal(ws, RateLimited)]
        elapsed_ms = (time.monotonic() - began) * 1000
        # A token comes back every 60/N s from the first request on (Redis's clock), so the
        # wait is one interval less what has elapsed since; a margin for rounding only.
        interval_ms = 60_000 / per_min
        for error in refused:
            wait = error.retry_after_ms
            assert wait is not None and interval_ms - elapsed_ms - 2 <= wait <= interval_ms
            assert error.retryable and f"{per_min} requests per minute" in error.message
        await eventually(lambda: sum(served_ok(r) for r in cluster.replicas) == per_min)
        assert all(served_ok(r) > 0 for r in cluster.replicas)  # both replicas spent the budget


async def test_a_keys_stream_slots_are_exact_across_replicas(redis_server: RedisServer) -> None:
    async with (
        running_cluster(redis_server, VOXRELAY_MAX_STREAMS_PER_KEY="2") as cluster,
        cluster.grpc() as client,
        cluster.ws() as ws,
        AsyncExitStack() as held,
    ):
        streams = [
            await held.enter_async_context(
                aclosing(client.synthesize(LONG, mode="speak", format="pcm"))
            )
            for _ in range(2)
        ]
        for stream in streams:
            assert isinstance(await anext(stream), StreamStarted)
        for replica in cluster.replicas:  # round robin: one stream on each replica
            await until_metric(
                replica, "voxrelay_active_streams", lambda n: n == 1, protocol="grpc"
            )
        for door in (client, ws):
            refused = await refusal(door, RateLimited)
            assert refused.retry_after_ms == 1000 and refused.retryable
            assert "2 streams in flight" in refused.message
        await streams[0].aclose()  # cancels it on its replica, which frees the slot

        async def slot_returns() -> None:
            while True:
                try:
                    assert finished(await speak(client))
                    return
                except RateLimited:  # until the release has reached Redis
                    await asyncio.sleep(0.05)

        await asyncio.wait_for(slot_returns(), 10)


async def test_a_sigtermed_replica_finishes_its_stream_and_new_ones_go_elsewhere(
    redis_server: RedisServer,
) -> None:
    async with running_cluster(redis_server, VOXRELAY_DRAIN_S="30") as cluster:
        async with (
            cluster.ws() as long_client,
            aclosing(long_client.synthesize(LONG, mode="speak", format="pcm")) as stream,
        ):
            assert isinstance(await anext(stream), StreamStarted)
            active = [
                await metric(r, "voxrelay_active_streams", protocol="ws") for r in cluster.replicas
            ]
            assert sorted(active) == [0, 1]
            victim, other = cluster.replicas[active.index(1)], cluster.replicas[active.index(0)]
            victim.signal(signal.SIGTERM)
            await victim.wait_for_event("drain")
            before = served_ok(other)
            for _ in range(4):  # the draining replica answers the handshake 503: nginx passes it on
                assert finished(await speak_once(cluster.ws()))
            async with cluster.grpc() as client:
                for _ in range(4):
                    # A gRPC call nginx has passed on is not resent: the draining replica's
                    # refusal reaches the client, retryable, and the retry goes elsewhere.
                    try:
                        events = await speak(client)
                    except Unavailable as error:
                        assert error.retryable and "shutting down" in error.message
                        events = await speak(client)
                    assert finished(events)
            await eventually(lambda: served_ok(other) == before + 8)
            assert await metric(victim, "voxrelay_active_streams", protocol="ws") == 1
            rest = [event async for event in stream]
            last = rest[-1]
            assert isinstance(last, StreamFinished) and last.segments >= 2
        assert await victim.wait() == 0
        assert served_ok(victim) == 1


@pytest.mark.parametrize("failure", ["open", "closed"])
async def test_redis_stopped_and_restarted_under_traffic(
    redis_server: RedisServer, failure: str
) -> None:
    lots = {"VOXRELAY_RATE_LIMIT_PER_MIN": "100000", "VOXRELAY_CHARS_PER_MIN": "10000000"}
    async with (
        running_cluster(redis_server, VOXRELAY_REDIS_FAILURE=failure, **lots) as cluster,
        cluster.grpc() as grpc_client,
    ):
        outcomes: list[str] = []
        changed = asyncio.Event()
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                for make in (lambda: grpc_client, cluster.ws):
                    client = make()
                    try:
                        events = await speak(client)
                    except Unavailable as error:
                        assert error.retry_after_ms == 1000 and error.retryable
                        outcomes.append("unavailable")
                    else:
                        assert finished(events)
                        outcomes.append("ok")
                    finally:
                        if client is not grpc_client:
                            await client.aclose()
                    changed.set()

        async def until(condition: Callable[[], bool]) -> None:
            async with asyncio.timeout(WAIT):
                while not condition():
                    await changed.wait()
                    changed.clear()

        runner = asyncio.create_task(traffic())
        try:
            await until(lambda: "ok" in outcomes)
            await asyncio.to_thread(cluster.redis.stop)
            for replica in cluster.replicas:
                await until_metric(replica, "voxrelay_limits_backend_up", lambda n: n == 0)
            # Every worker knows; the one request that may have been under way is left out.
            down = len(outcomes) + 1
            await until(lambda: len(outcomes) >= down + 4)
            assert set(outcomes[down:]) == ({"ok"} if failure == "open" else {"unavailable"})
            await asyncio.to_thread(cluster.redis.start)
            for replica in cluster.replicas:  # SPEC: within 10 s of Redis coming back
                await until_metric(
                    replica, "voxrelay_limits_backend_up", lambda n: n == 1, within=10
                )
            up = len(outcomes) + 1
            await until(lambda: len(outcomes) >= up + 4)
            assert set(outcomes[up:]) == {"ok"}
        finally:
            stop.set()
            await runner
        for replica in cluster.replicas:
            changes = [
                line["up"] for line in replica.lines if line.get("event") == "limits_backend"
            ]
            # Each worker: its first check, the outage, the return; one line each.
            assert changes.count(False) == WORKERS and changes.count(True) == 2 * WORKERS


async def test_a_killed_worker_is_replaced_while_the_others_serve(
    redis_server: RedisServer,
) -> None:
    async with running_cluster(redis_server) as cluster, cluster.grpc() as client:
        one = cluster.replicas[0]
        [victim] = ready_pids(one)[0]
        os.kill(victim, signal.SIGKILL)
        exit_line = await one.wait_for_event("worker_exit")
        assert exit_line["worker_index"] == 0 and exit_line["exit"] == "signal SIGKILL"
        for _ in range(4):  # while it is being replaced
            assert finished(await speak(client))
            assert finished(await speak_once(cluster.ws()))
        await eventually(lambda: len(ready_pids(one)[0]) == 2, WAIT)
        assert ready_pids(one)[0][1] != victim
        assert await metric(one, "voxrelay_worker_restarts_total") == 1
        assert await metric(one, "voxrelay_workers") == WORKERS
        for _ in range(4):
            assert finished(await speak(client))
            assert finished(await speak_once(cluster.ws()))
