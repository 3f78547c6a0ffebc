"""``/metrics`` after real traffic over both doors: names, counts, cardinality, promtool.

The registry is process-global, so every count is asserted as a difference between a
scrape before the traffic and one after it. Scrapes are plain GETs: without an
``Accept: application/openmetrics-text`` header prometheus-client answers in the classic
text format, the one ``promtool check metrics`` reads (Prometheus itself asks for
OpenMetrics and gets it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from fakes.openai_upstream import FakeOpenAI, Latency, hang, status
from tests.servers import running_app
from tests.waiting import eventually
from voxrelay.gateways.app import App
from voxrelay.service import __version__, metrics
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

WAIT = 30.0
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="needs promtool: `make test-deps` installs it (Debian package prometheus)",
)

#: SPEC's metrics and the type each is exposed as.
SPEC_METRICS = {
    "voxrelay_requests_total": "counter",
    "voxrelay_active_streams": "gauge",
    "voxrelay_ws_connections": "gauge",
    "voxrelay_time_to_first_audio_seconds": "histogram",
    "voxrelay_upstream_seconds": "histogram",
    "voxrelay_upstream_first_byte_seconds": "histogram",
    "voxrelay_audio_bytes_total": "counter",
    "voxrelay_errors_total": "counter",
    "voxrelay_limits_backend_up": "gauge",
}
SPEC_LABELS = {
    "voxrelay_requests_total": {"protocol", "mode", "outcome"},
    "voxrelay_active_streams": {"protocol"},
    "voxrelay_ws_connections": set(),
    "voxrelay_time_to_first_audio_seconds_count": {"protocol"},
    "voxrelay_upstream_seconds_count": {"stage", "provider"},
    "voxrelay_upstream_first_byte_seconds_count": {"stage", "provider"},
    "voxrelay_audio_bytes_total": {"protocol", "format"},
    "voxrelay_errors_total": {"protocol", "code"},
    "voxrelay_limits_backend_up": set(),
}
#: Every label value the exposition may carry for voxrelay's own metrics.
CLOSED_SETS = {
    "protocol": {"grpc", "ws", "http"},
    "mode": {"chat", "speak"},
    "outcome": {
        "ok", "cancelled", "invalid_request", "unauthorized", "forbidden", "rate_limited",
        "busy", "too_large", "upstream_error", "upstream_timeout", "unavailable", "internal",
    },
    "stage": {"llm", "tts", "realtime"},
    "provider": {"openai", "echo", "espeak", "realtime"},
    "format": {"pcm", "wav", "mp3", "opus", "flac", "aac", "mulaw", "alaw", "unknown"},
    "kind": {"prompt", "completion", "upstream_error", "upstream_timeout"},
}  # fmt: skip
CLOSED_SETS["code"] = CLOSED_SETS["outcome"] - {"ok", "cancelled"}
BUCKETS = set(metrics.LATENCY_BUCKETS) | set(metrics.DURATION_BUCKETS)
#: Per-caller limits off: a flood from one address must not turn into rate_limited.
NO_CALLER_LIMITS: dict[str, Any] = dict(
    rate_limit_per_min=0, chars_per_min=0, max_streams_per_key=0, max_connections_per_ip=0
)

Series = tuple[str, frozenset[tuple[str, str]]]


# Scraping


def fetch(url: str, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return response.headers["Content-Type"], response.read().decode()


async def scrape(app: App, accept: str | None = None) -> str:
    url = f"http://127.0.0.1:{app.metrics_port}/metrics"
    return (await asyncio.to_thread(fetch, url, accept))[1]


@dataclass
class Scrape:
    """One exposition, parsed: every sample by (name, labels)."""

    text: str
    types: dict[str, str] = field(default_factory=dict)
    samples: dict[Series, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        scrape = cls(text)
        for family in text_string_to_metric_families(text):
            scrape.types[family.name] = family.type
            for s in family.samples:
                scrape.samples[(s.name, frozenset(s.labels.items()))] = s.value
        return scrape

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def series(self) -> set[Series]:
        return set(self.samples)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def counted(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# Clients


def open_ws(app: App) -> Any:
    url = f"ws://127.0.0.1:{app.ws_port}/v1/stream"
    return connect(url, compression=None, max_size=None, proxy=None, open_timeout=WAIT)


async def receive(ws: ClientConnection) -> dict[str, Any] | bytes:
    message = await asyncio.wait_for(ws.recv(), WAIT)
    return message if isinstance(message, bytes) else json.loads(message)


async def until_end(ws: ClientConnection) -> list[dict[str, Any] | bytes]:
    frames: list[dict[str, Any] | bytes] = []
    while True:
        frames.append(await receive(ws))
        last = frames[-1]
        if isinstance(last, dict) and last["type"] in ("finished", "error", "cancelled"):
            return frames


@dataclass
class Traffic:
    """What the clients saw, to compare with what the server counted."""

    grpc_audio_bytes: int = 0
    ws_audio_bytes: int = 0
    segment_chars: int = 0
    segments: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(latency=Latency.zero()) as server:
        yield server


@pytest.fixture
async def app(fake: FakeOpenAI) -> AsyncIterator[App]:
    async with running_app(llm="openai", llm_base_url=fake.base_url, upstream_retries=0) as app:
        yield app


async def grpc_traffic(app: App, fake: FakeOpenAI, seen: Traffic) -> None:
    """Over gRPC: chat ok, speak ok, a cancel, a refusal and an upstream failure."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        for request in (
            pb.SynthesizeRequest(text="Tell me something."),
            pb.SynthesizeRequest(text="Hello there. Goodbye.", mode=pb.MODE_SPEAK),
        ):
            async for r in stub.Synthesize(request, timeout=WAIT):
                if r.HasField("segment"):
                    seen.segments += 1
                    # The engine is given what the segment says it speaks.
                    seen.segment_chars += len(r.segment.spoken or r.segment.text)
                elif r.HasField("audio"):
                    seen.grpc_audio_bytes += len(r.audio.data)
                elif r.HasField("finished"):
                    seen.prompt_tokens += r.finished.prompt_tokens
                    seen.completion_tokens += r.finished.completion_tokens

        def cancels() -> float:
            labels = {"protocol": "grpc", "mode": "chat", "outcome": "cancelled"}
            return counted("voxrelay_requests_total", **labels)

        cancelled = cancels()
        fake.chat_faults.append(hang())
        call = stub.Synthesize(pb.SynthesizeRequest(text="Never answered."), timeout=WAIT)
        assert (await call.read()).HasField("started")
        asked = len(fake.chat_requests)
        await fake.wait_for(lambda: len(fake.chat_requests) >= asked)
        call.cancel()
        await eventually(lambda: cancels() > cancelled)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Synthesize(pb.SynthesizeRequest(text=""), timeout=WAIT):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        fake.chat_faults.append(status(500, message="upstream broke"))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.Synthesize(pb.SynthesizeRequest(text="Hi."), timeout=WAIT):
                pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


async def ws_traffic(app: App, fake: FakeOpenAI, seen: Traffic) -> None:
    """Over WebSocket: speak ok, a cancel, a refusal."""
    async with open_ws(app) as ws:
        text = "One sentence here. And a second one."
        await ws.send(
            json.dumps(
                {"type": "synthesize", "id": "ok", "text": text, "mode": "speak", "format": "pcm"}
            )
        )
        for frame in await until_end(ws):
            if isinstance(frame, bytes):
                seen.ws_audio_bytes += len(frame)
            elif frame["type"] == "segment":
                seen.segments += 1
                seen.segment_chars += len(frame.get("spoken") or frame["text"])
            else:
                assert frame["type"] != "error", frame

        fake.chat_faults.append(hang())
        await ws.send(json.dumps({"type": "synthesize", "id": "c", "text": "Wait."}))
        started = await receive(ws)
        assert isinstance(started, dict) and started["type"] == "started"
        await ws.send(json.dumps({"type": "cancel", "id": "c"}))
        [*_, last] = await until_end(ws)
        assert isinstance(last, dict) and last["type"] == "cancelled"

        await ws.send(json.dumps({"type": "synthesize", "id": "bad", "text": "x", "format": "mp4"}))
        [error] = await until_end(ws)
        assert isinstance(error, dict) and error["code"] == "invalid_request"
    await eventually(lambda: counted("voxrelay_ws_connections") == 0)


# The tests


async def test_traffic_over_both_doors_is_counted(app: App, fake: FakeOpenAI) -> None:
    before = Scrape.parse(await scrape(app))
    seen = Traffic()
    await grpc_traffic(app, fake, seen)
    await ws_traffic(app, fake, seen)
    after = Scrape.parse(await scrape(app))

    for name, kind in SPEC_METRICS.items():
        family = name.removesuffix("_total")
        assert after.types.get(family) == kind, f"{name} is missing or not a {kind}"
    for name, labels in SPEC_LABELS.items():
        keys = [dict(ls) for n, ls in after.samples if n == name]
        assert keys and all(set(k) == labels for k in keys), (name, keys)

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    requests = "voxrelay_requests_total"
    assert d(requests, protocol="grpc", mode="chat", outcome="ok") == 1
    assert d(requests, protocol="grpc", mode="speak", outcome="ok") == 1
    assert d(requests, protocol="grpc", mode="chat", outcome="cancelled") == 1
    assert d(requests, protocol="grpc", mode="chat", outcome="invalid_request") == 1
    assert d(requests, protocol="grpc", mode="chat", outcome="upstream_error") == 1
    assert d(requests, protocol="ws", mode="speak", outcome="ok") == 1
    assert d(requests, protocol="ws", mode="chat", outcome="cancelled") == 1
    assert d(requests, protocol="ws", mode="chat", outcome="invalid_request") == 1
    total = sum(v for (n, _), v in after.samples.items() if n == requests) - sum(
        v for (n, _), v in before.samples.items() if n == requests
    )
    assert total == 8

    assert d("voxrelay_errors_total", protocol="grpc", code="invalid_request") == 1
    assert d("voxrelay_errors_total", protocol="grpc", code="upstream_error") == 1
    assert d("voxrelay_errors_total", protocol="ws", code="invalid_request") == 1
    assert after.value("voxrelay_active_streams", protocol="grpc") == 0
    assert after.value("voxrelay_active_streams", protocol="ws") == 0
    assert after.value("voxrelay_ws_connections") == 0

    ttfa = "voxrelay_time_to_first_audio_seconds_count"
    assert d(ttfa, protocol="grpc") == 2 and d(ttfa, protocol="ws") == 1
    assert d("voxrelay_audio_bytes_total", protocol="grpc", format="mp3") == seen.grpc_audio_bytes
    assert d("voxrelay_audio_bytes_total", protocol="ws", format="pcm") == seen.ws_audio_bytes
    assert d("voxrelay_audio_seconds_total", protocol="grpc") > 0

    tts = {"stage": "tts", "provider": "espeak"}
    llm = {"stage": "llm", "provider": "openai"}
    assert d("voxrelay_upstream_first_byte_seconds_count", **tts) == seen.segments
    assert d("voxrelay_upstream_seconds_count", **tts) == seen.segments
    assert d("voxrelay_upstream_first_byte_seconds_count", **llm) == 1
    assert d("voxrelay_upstream_seconds_count", **llm) == 1
    assert d("voxrelay_upstream_failures_total", kind="upstream_error", **llm) == 1
    assert d("voxrelay_upstream_characters_total", provider="espeak") == seen.segment_chars
    assert seen.prompt_tokens > 0 and seen.completion_tokens > 0
    tokens = "voxrelay_upstream_tokens_total"
    assert d(tokens, provider="openai", kind="prompt") == seen.prompt_tokens
    assert d(tokens, provider="openai", kind="completion") == seen.completion_tokens
    assert after.value("voxrelay_breaker_open", **llm) == 0

    assert after.value("voxrelay_build_info", version=__version__) == 1
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= after.names()
    assert any(name.startswith("python_gc_") for name in after.names())
    assert not any(name.endswith("_created") for name in after.names())


@needs_promtool
async def test_the_exposition_passes_promtool(app: App, fake: FakeOpenAI) -> None:
    await grpc_traffic(app, fake, Traffic())
    await ws_traffic(app, fake, Traffic())
    result = promtool_check(await scrape(app))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


async def test_the_classic_text_format_is_served_unless_openmetrics_is_asked_for(
    app: App,
) -> None:
    url = f"http://127.0.0.1:{app.metrics_port}/metrics"
    plain, _ = await asyncio.to_thread(fetch, url)
    assert plain.startswith("text/plain") and "version=0.0.4" in plain
    om, body = await asyncio.to_thread(fetch, url, "application/openmetrics-text; version=1.0.0")
    assert om.startswith("application/openmetrics-text") and body.rstrip().endswith("# EOF")


def voxrelay_series(scrape: Scrape) -> set[Series]:
    return {s for s in scrape.series() if s[0].startswith("voxrelay_")}


async def test_client_values_never_become_series() -> None:
    """Thousands of distinct voices, ids and garbage values: not one new series."""
    async with running_app(**NO_CALLER_LIMITS) as app:
        flood = 600

        async def round_of_garbage(n: int, tag: str) -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                stub = pb_grpc.SynthesizerStub(channel)

                async def one(i: int) -> None:
                    # Every request names its own id; all are refused but one in fifty.
                    ok = i % 50 == 0
                    request = pb.SynthesizeRequest(
                        text=f"Text {tag}{i}.",
                        mode=pb.MODE_SPEAK if ok or i % 3 == 0 else 1000 + i,
                        voice="" if ok else f"voice-{tag}{i}\x01",
                        format=pb.AUDIO_FORMAT_MP3 if ok or i % 3 != 2 else 900 + i,
                        request_id=f"id-{tag}{i}",
                    )
                    metadata = (("x-request-id", f"hdr-{tag}{i}"),)
                    try:
                        async for _ in stub.Synthesize(request, timeout=WAIT, metadata=metadata):
                            pass
                        assert ok
                    except grpc.aio.AioRpcError as exc:
                        assert not ok and exc.code() == grpc.StatusCode.INVALID_ARGUMENT

                for start in range(0, n, 50):
                    await asyncio.gather(*(one(i) for i in range(start, min(start + 50, n))))

            async with open_ws(app) as ws:
                # Refused as frames: pipelined, one error frame each (a stray cancel: none).
                frames: list[Any] = []
                for i in range(n):
                    frames += [
                        {"type": f"type-{tag}{i}", "id": f"t-{tag}{i}"},
                        {"type": "synthesize", "id": f"m-{tag}{i}", "text": "x",
                         "mode": f"mode-{tag}{i}"},
                        {"type": "synthesize", "id": f"f-{tag}{i}", "text": "x",
                         "format": f"fmt-{tag}{i}"},
                        {"type": "cancel", "id": f"c-{tag}{i}"},
                    ]  # fmt: skip
                    if i % 10 == 0:
                        frames += [b"\x00binary", "{not json " + tag + str(i), "[1, 2]"]
                for frame in frames:
                    await ws.send(frame if isinstance(frame, bytes | str) else json.dumps(frame))
                replies = sum(not isinstance(f, dict) or f["type"] != "cancel" for f in frames)
                for _ in range(replies):
                    reply = await receive(ws)
                    assert isinstance(reply, dict) and reply["type"] == "error", reply
                # Refused by the core (an unknown voice), or served: one at a time.
                for i in range(n):
                    ok = i % 50 == 0
                    frame = {
                        "type": "synthesize",
                        "id": f"v-{tag}{i}",
                        "mode": "speak",
                        "text": f"Text {tag}{i}.",
                        "voice": "" if ok else f"v-{tag}{i}",
                    }
                    await ws.send(json.dumps(frame))
                    [*_, last] = await until_end(ws)
                    assert isinstance(last, dict)
                    assert last["type"] == ("finished" if ok else "error"), last
            await eventually(lambda: counted("voxrelay_ws_connections") == 0)

        await round_of_garbage(30, "warm")  # every closed-set series these requests can touch
        before = Scrape.parse(await scrape(app))
        await round_of_garbage(flood, "flood")
        after = Scrape.parse(await scrape(app))

        assert voxrelay_series(after) == voxrelay_series(before)
        assert (
            delta(before, after, "voxrelay_errors_total", protocol="ws", code="invalid_request")
            >= flood * 4
        )
        for name, labels in voxrelay_series(after):
            for key, value in labels:
                if key in CLOSED_SETS:
                    assert value in CLOSED_SETS[key], (name, key, value)
                elif key == "le":
                    assert value == "+Inf" or float(value) in BUCKETS, (name, value)
                else:
                    assert (name, key) == ("voxrelay_build_info", "version")
        assert "flood" not in after.text and "warm" not in after.text


async def test_series_worth_seeing_exist_before_any_traffic(app: App) -> None:
    """A dashboard shows 0, not "no data", on a server that has served nothing yet."""
    exposed = Scrape.parse(await scrape(app)).samples

    def has(name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in exposed

    for protocol in ("grpc", "ws", "http"):
        for mode in ("chat", "speak"):
            assert has("voxrelay_requests_total", protocol=protocol, mode=mode, outcome="ok")
        assert has("voxrelay_active_streams", protocol=protocol)
        assert has("voxrelay_time_to_first_audio_seconds_count", protocol=protocol)
        assert has("voxrelay_errors_total", protocol=protocol, code="upstream_error")
    for stage, provider in (("llm", "openai"), ("tts", "espeak")):
        assert has("voxrelay_upstream_first_byte_seconds_count", stage=stage, provider=provider)
        assert has("voxrelay_breaker_open", stage=stage, provider=provider)
    assert has("voxrelay_upstream_tokens_total", provider="openai", kind="prompt")
    assert has("voxrelay_upstream_characters_total", provider="espeak")
    assert has("voxrelay_limits_backend_up")  # 1: Redis is not used here
