"""A reply whose segments are all in the phrase cache: first audio, and no upstream call.

voxrelay runs with its phrase cache on (the load runs turn it off). One whole request per
door speaks the reply once (the gRPC one makes every segment; the WebSocket one already
replays them); then both doors ask for it again, in turn, and the time to first audio is
measured from the request's send. voxrelay's own metrics say what the repeats cost
upstream: the speech calls it made (completed or failed) and its cache's hits and misses.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from .clients import SPOKEN, GrpcClient, Sample, WsClient
from .load import percentiles
from .procs import Pinning, voxrelay_process
from .report import TARGETS

__all__ = ["cached_reply"]


async def _scrape(url: str) -> dict[str, float]:
    """Return the counters that matter here from voxrelay's ``/metrics``."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            f"GET {parts.path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    body = raw.partition(b"\r\n\r\n")[2].decode()
    found = {"upstream_calls": 0.0, "hits": 0.0, "misses": 0.0}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name in (
                "voxrelay_upstream_seconds_count",
                "voxrelay_upstream_failures_total",
            ):
                found["upstream_calls"] += sample.value
            elif sample.name == "voxrelay_cache_hits_total":
                found["hits"] += sample.value
            elif sample.name == "voxrelay_cache_misses_total":
                found["misses"] += sample.value
    return found


async def cached_reply(pinning: Pinning, upstream: str, *, rounds: int) -> dict[str, Any]:
    """Speak the reply once, then *rounds* times on each door from the cache."""
    vox = await voxrelay_process(pinning, upstream, extra_env={"VOXRELAY_CACHE_MB": "64"})
    grpc = GrpcClient(str(vox.info["grpc"]), 1, text=SPOKEN, mode="speak")
    ws = WsClient(str(vox.info["websocket"]), 1, text=SPOKEN, mode="speak")
    metrics_url = str(vox.info["metrics"])
    try:
        start = await _scrape(metrics_url)
        first = Sample()
        await grpc.request(first)
        await ws.request(Sample())  # its connection opened, outside the measure
        before = await _scrape(metrics_url)
        samples: dict[str, list[Sample]] = {"grpc": [], "ws": []}
        for _ in range(rounds):
            for kind, client in (("grpc", grpc), ("ws", ws)):
                sample = Sample()
                await client.request(sample)
                samples[kind].append(sample)
        after = await _scrape(metrics_url)
    finally:
        await grpc.aclose()
        await ws.aclose()
        await vox.stop()
    result: dict[str, Any] = {
        "reply": SPOKEN,
        "rounds": rounds,
        "first_request_ttfa_ms": None if first.ttfa is None else round(first.ttfa * 1000, 2),
        "first_request_upstream_calls": before["upstream_calls"] - start["upstream_calls"],
        "upstream_calls_during": after["upstream_calls"] - before["upstream_calls"],
        "cache_hits_during": after["hits"] - before["hits"],
        "cache_misses_during": after["misses"] - before["misses"],
        "errors": sum(1 for s in samples["grpc"] + samples["ws"] if s.error is not None),
    }
    for kind, taken in samples.items():
        result[kind] = percentiles([s.ttfa for s in taken if s.ttfa is not None])
    result["within_goal"] = all(
        result[kind]["p99"] is not None and result[kind]["p99"] <= TARGETS["cached_first_audio_ms"]
        for kind in ("grpc", "ws")
    )
    return result
