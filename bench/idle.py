"""Idle WebSocket connections: what each one costs voxrelay in memory, and streaming beside them."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from .clients import Sample, WsClient
from .load import Group, Meter, run_window
from .procs import ChildProcess

__all__ = ["idle_connections"]

MIB = 1024 * 1024


async def _settled_rss(voxrelay: ChildProcess, wait_s: float = 1.5) -> int:
    """Return voxrelay's RSS once it has stopped moving (or after *wait_s*)."""
    await asyncio.sleep(0.3)
    last = voxrelay.rss()
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while loop.time() < end:
        await asyncio.sleep(0.3)
        now = voxrelay.rss()
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


async def idle_connections(
    voxrelay: ChildProcess,
    fake: ChildProcess,
    *,
    connections: int,
    streaming: int,
    ramp_s: float,
    window_s: float,
) -> dict[str, Any]:
    """Open *connections* idle WebSockets, then stream on *streaming* of them."""
    url = str(voxrelay.info["websocket"])
    warm = WsClient(url, 4)
    await warm.open()
    for _ in range(4):  # the first requests size voxrelay's pools and caches
        await warm.request(Sample())
    await warm.aclose()
    gc.collect()
    before = await _settled_rss(voxrelay)
    idle = WsClient(url, connections)
    try:
        await idle.open()
        after = await _settled_rss(voxrelay)
        per_conn = (after - before) / connections
        result: dict[str, Any] = {
            "connections": connections,
            "rss_before_mib": round(before / MIB, 1),
            "rss_idle_mib": round(after / MIB, 1),
            "kib_per_connection": round(per_conn / 1024, 2),
        }
        # Stream on some of the open connections while the rest stay idle.
        streamers = WsClient(url, streaming)
        streamers.idle = idle.idle[:streaming]
        idle.idle = idle.idle[streaming:]
        async with Meter(voxrelay, fake) as meter:
            phase = await run_window(
                [Group(streamers, streaming)], ramp_s=ramp_s, window_s=window_s, meter=meter
            )
        idle.idle += streamers.idle
        result["streaming"] = {"streams": streaming, "phase": phase}
        result["rss_streaming_max_mib"] = round(phase.rss_max / MIB, 1)
        return result
    finally:
        await idle.aclose()
