"""Every Prometheus metric voxrelay exports, declared once.

Label values come from closed sets only (protocol, mode, outcome/code, stage,
provider, format); nothing a caller sends becomes a label value. Code records
metrics at the edges: a door per request, the upstream guard per call.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

from . import __version__

__all__ = [
    "ACTIVE_STREAMS",
    "AUDIO_BYTES",
    "AUDIO_SECONDS",
    "BREAKER_OPEN",
    "ERRORS",
    "REGISTRY",
    "REQUESTS",
    "TIME_TO_FIRST_AUDIO",
    "UPSTREAM_CHARACTERS",
    "UPSTREAM_FIRST_BYTE",
    "UPSTREAM_RETRIES",
    "UPSTREAM_SECONDS",
    "UPSTREAM_TOKENS",
    "WS_CONNECTIONS",
]

#: Speech latency spans ~10 ms (an embedded engine) to 30 s (a stage timeout).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0)
#: Whole-call durations are longer: a reply may be spoken for a minute.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

REGISTRY = CollectorRegistry(auto_describe=True)
REGISTRY.register(PROCESS_COLLECTOR)
REGISTRY.register(PLATFORM_COLLECTOR)
REGISTRY.register(GC_COLLECTOR)

BUILD_INFO = Info("voxrelay_build", "voxrelay build information.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})

REQUESTS = Counter(
    "voxrelay_requests", "Synthesis requests by door, mode and outcome.",
    ["protocol", "mode", "outcome"], registry=REGISTRY,
)
ACTIVE_STREAMS = Gauge(
    "voxrelay_active_streams", "Streams in flight.", ["protocol"], registry=REGISTRY,
)
WS_CONNECTIONS = Gauge(
    "voxrelay_ws_connections", "Open WebSocket connections.", registry=REGISTRY,
)
TIME_TO_FIRST_AUDIO = Histogram(
    "voxrelay_time_to_first_audio_seconds", "From request to the first audio byte sent.",
    ["protocol"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "voxrelay_upstream_seconds", "Duration of one upstream call, first request to last byte.",
    ["stage", "provider"], buckets=DURATION_BUCKETS, registry=REGISTRY,
)
UPSTREAM_FIRST_BYTE = Histogram(
    "voxrelay_upstream_first_byte_seconds", "From an upstream call's start to its first byte.",
    ["stage", "provider"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "voxrelay_upstream_retries", "Upstream calls tried again after a transient failure.",
    ["stage", "provider"], registry=REGISTRY,
)
UPSTREAM_FAILURES = Counter(
    "voxrelay_upstream_failures", "Failed upstream calls.",
    ["stage", "provider", "kind"], registry=REGISTRY,
)
BREAKER_OPEN = Gauge(
    "voxrelay_breaker_open", "1 while an upstream's circuit breaker is open.",
    ["stage", "provider"], registry=REGISTRY,
)
UPSTREAM_TOKENS = Counter(
    "voxrelay_upstream_tokens", "Tokens the chat upstream reported (cost).",
    ["provider", "kind"], registry=REGISTRY,
)
UPSTREAM_CHARACTERS = Counter(
    "voxrelay_upstream_characters", "Characters sent to the speech upstream (cost).",
    ["provider"], registry=REGISTRY,
)
AUDIO_BYTES = Counter(
    "voxrelay_audio_bytes", "Encoded audio bytes sent to callers.",
    ["protocol", "format"], registry=REGISTRY,
)
AUDIO_SECONDS = Counter(
    "voxrelay_audio_seconds", "Seconds of audio sent to callers.",
    ["protocol"], registry=REGISTRY,
)
ERRORS = Counter(
    "voxrelay_errors", "Errors returned to callers, by WebSocket error code.",
    ["protocol", "code"], registry=REGISTRY,
)
