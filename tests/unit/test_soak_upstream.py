"""The soak run's upstream: faults only where asked, never enough in a row to open a breaker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx2
import pytest

from bench.soak_upstream import HEALTHY_BETWEEN_FAULTS, LONG_REPLY, SoakUpstream
from fakes.openai_upstream import DEFAULT_REPLY, Latency


@pytest.fixture
async def http() -> AsyncIterator[tuple[SoakUpstream, httpx2.AsyncClient]]:
    async with (
        SoakUpstream(latency=Latency.zero()) as fake,
        httpx2.AsyncClient(base_url=fake.base_url, timeout=10) as client,
    ):
        yield fake, client


async def ask(client: httpx2.AsyncClient, text: str) -> httpx2.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    return await client.post("/chat/completions", json=body)


async def test_only_marked_requests_fault(
    http: tuple[SoakUpstream, httpx2.AsyncClient],
) -> None:
    _, client = http
    assert (await ask(client, "Hello. [[fault:503]]")).status_code == 503
    healthy = await ask(client, "Hello.")
    assert healthy.status_code == 200
    assert healthy.json()["choices"][0]["message"]["content"] == DEFAULT_REPLY
    long = await ask(client, "Go on. [[long]]")
    assert long.json()["choices"][0]["message"]["content"] == LONG_REPLY


async def test_faults_come_one_at_a_time_between_healthy_answers(
    http: tuple[SoakUpstream, httpx2.AsyncClient],
) -> None:
    _, client = http
    codes = [(await ask(client, "Again. [[fault:500]]")).status_code for _ in range(6)]
    assert codes == [500, 200, 200, 500, 200, 200]
    assert HEALTHY_BETWEEN_FAULTS == 2


async def test_no_fault_while_another_is_still_answered(
    http: tuple[SoakUpstream, httpx2.AsyncClient],
) -> None:
    fake, client = http
    stalled = asyncio.create_task(ask(client, "Wait. [[fault:stall]]"))
    await fake.wait_for(lambda: fake.fault_open)
    for _ in range(HEALTHY_BETWEEN_FAULTS + 1):
        assert (await ask(client, "Now. [[fault:500]]")).status_code == 200
    stalled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stalled
    await fake.wait_for(lambda: not fake.fault_open)
    assert (await ask(client, "Now. [[fault:500]]")).status_code == 500
