"""Every Prometheus metric voxrelay exports, declared once.

Label values come from closed sets only (protocol, mode, outcome/code, stage,
provider, format): nothing a caller sends becomes a label value, so a client that
sends ten thousand voices or ids creates no new series. Code records metrics at the
edges: a door per request (through :class:`voxrelay.service.telemetry.StreamRecord`), the
upstream guard per call.

Series worth seeing at zero are created up front, so a dashboard shows ``0`` rather
than "no data" and ``rate()`` has something to work on from the first scrape.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from . import __version__
from .errors import ERROR_CODES
from .model import AudioFormat, Mode

__all__ = [
    "ACTIVE_STREAMS",
    "AUDIO_BYTES",
    "AUDIO_SECONDS",
    "BREAKER_OPEN",
    "BUILD_INFO",
    "DURATION_BUCKETS",
    "ERRORS",
    "ERROR_CODES",
    "FORMATS",
    "GRPC_CONNECTIONS",
    "LATENCY_BUCKETS",
    "LIMITS_BACKEND_ERRORS",
    "LIMITS_BACKEND_UP",
    "MODES",
    "OUTCOMES",
    "PROTOCOLS",
    "PROVIDERS",
    "REGISTRY",
    "REQUESTS",
    "STAGES",
    "TIME_TO_FIRST_AUDIO",
    "UPSTREAM_CHARACTERS",
    "UPSTREAM_FAILURES",
    "UPSTREAM_FIRST_BYTE",
    "UPSTREAM_RETRIES",
    "UPSTREAM_SECONDS",
    "UPSTREAM_TOKENS",
    "WS_CONNECTIONS",
    "closed",
    "init_upstream",
]

# `_created` series double the exposition and no dashboard or alert here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The closed sets every label value is drawn from.
PROTOCOLS = ("grpc", "ws", "http")
MODES = tuple(m.value for m in Mode)
FORMATS = tuple(f.value for f in AudioFormat)
OUTCOMES = ("ok", "cancelled", *ERROR_CODES)
STAGES = ("llm", "tts", "realtime")
PROVIDERS = ("openai", "echo", "espeak", "realtime")
TOKEN_KINDS = ("prompt", "completion")

#: Speech latency spans ~10 ms (an embedded engine) to 30 s (a stage timeout).
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0,
)  # fmt: skip
#: Whole upstream calls are longer: a segment of a long reply may be spoken for a minute.
DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


def closed(value: str, allowed: Iterable[str], fallback: str) -> str:
    """Return *value* if it is one of *allowed*, else *fallback*: a label stays in its set."""
    return value if value in allowed else fallback


# Under workers (PROMETHEUS_MULTIPROC_DIR set by the supervisor) every value lives in a
# file the supervisor's /metrics reads: counters and histograms are summed over every worker
# that ever ran, and each gauge names how its workers' values combine (``multiprocess_mode``;
# the ``live`` modes forget a worker once it has exited). One process ignores the modes.
REGISTRY = CollectorRegistry(auto_describe=True)
REGISTRY.register(PROCESS_COLLECTOR)
REGISTRY.register(PLATFORM_COLLECTOR)
REGISTRY.register(GC_COLLECTOR)

BUILD_INFO = Info("voxrelay_build", "voxrelay build information.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})

# Streams, counted by the doors

REQUESTS = Counter(
    "voxrelay_requests",
    "Synthesis requests by door, mode and outcome (ok, cancelled or an error code).",
    ["protocol", "mode", "outcome"],
    registry=REGISTRY,
)
ACTIVE_STREAMS = Gauge(
    "voxrelay_active_streams",
    "Streams in flight.",
    ["protocol"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
WS_CONNECTIONS = Gauge(
    "voxrelay_ws_connections",
    "Open WebSocket connections.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
GRPC_CONNECTIONS = Gauge(
    "voxrelay_grpc_connections",
    "Open gRPC connections (-1: unknown).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
TIME_TO_FIRST_AUDIO = Histogram(
    "voxrelay_time_to_first_audio_seconds",
    "From a request's arrival to its first audio byte handed to the client.",
    ["protocol"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
AUDIO_BYTES = Counter(
    "voxrelay_audio_bytes",
    "Encoded audio bytes sent to callers.",
    ["protocol", "format"],
    registry=REGISTRY,
)
AUDIO_SECONDS = Counter(
    "voxrelay_audio_seconds",
    "Seconds of audio in streams that finished.",
    ["protocol"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "voxrelay_errors",
    "Errors returned to callers, by WebSocket error code (on both doors).",
    ["protocol", "code"],
    registry=REGISTRY,
)

# Upstream calls, counted by the upstream guard (service.resilience) and the pipeline

UPSTREAM_SECONDS = Histogram(
    "voxrelay_upstream_seconds",
    "Duration of one upstream call that completed, from its request to its last byte.",
    ["stage", "provider"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_FIRST_BYTE = Histogram(
    "voxrelay_upstream_first_byte_seconds",
    "From an upstream call's start to its first byte (first token, first audio).",
    ["stage", "provider"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "voxrelay_upstream_retries",
    "Upstream calls tried again after a transient failure.",
    ["stage", "provider"],
    registry=REGISTRY,
)
UPSTREAM_FAILURES = Counter(
    "voxrelay_upstream_failures",
    "Failed upstream calls (retries included), by error code.",
    ["stage", "provider", "kind"],
    registry=REGISTRY,
)
BREAKER_OPEN = Gauge(
    "voxrelay_breaker_open",
    "1 while an upstream's circuit breaker is open (in any worker).",
    ["stage", "provider"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
# Shared limits (service.limits_redis)

#: ``livemin`` under prometheus-client's multiprocess mode: 1 only when every living
#: worker has the shared limits in force (a dead worker's last value does not count).
LIMITS_BACKEND_UP = Gauge(
    "voxrelay_limits_backend_up",
    "1 when the shared limits (Redis) are in force or not configured; 0 while Redis is away.",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
LIMITS_BACKEND_UP.set(1)
LIMITS_BACKEND_ERRORS = Counter(
    "voxrelay_limits_backend_errors",
    "Redis round trips of the shared limits that failed or timed out.",
    registry=REGISTRY,
)

UPSTREAM_TOKENS = Counter(
    "voxrelay_upstream_tokens",
    "Tokens the chat upstream reported, by kind (prompt, completion): what it costs.",
    ["provider", "kind"],
    registry=REGISTRY,
)
UPSTREAM_CHARACTERS = Counter(
    "voxrelay_upstream_characters",
    "Characters sent to the speech upstream: what it costs.",
    ["provider"],
    registry=REGISTRY,
)


def init_upstream(stage: str, provider: str) -> None:
    """Create the zero-valued series of one upstream, so it shows up before its first call.

    *stage* and *provider* come from the configuration (one of :data:`STAGES`,
    :data:`PROVIDERS`), never from a request.
    """
    UPSTREAM_SECONDS.labels(stage, provider)
    UPSTREAM_FIRST_BYTE.labels(stage, provider)
    UPSTREAM_RETRIES.labels(stage, provider)
    for kind in ("upstream_error", "upstream_timeout"):
        UPSTREAM_FAILURES.labels(stage, provider, kind)
    if stage in ("llm", "realtime"):
        for kind in TOKEN_KINDS:
            UPSTREAM_TOKENS.labels(provider, kind)
    if stage == "tts":
        UPSTREAM_CHARACTERS.labels(provider)


def _init_streams() -> None:
    for protocol in PROTOCOLS:
        ACTIVE_STREAMS.labels(protocol)
        TIME_TO_FIRST_AUDIO.labels(protocol)
        AUDIO_SECONDS.labels(protocol)
        for mode in MODES:
            for outcome in ("ok", "cancelled"):
                REQUESTS.labels(protocol, mode, outcome)
        for code in ERROR_CODES:
            ERRORS.labels(protocol, code)


_init_streams()
