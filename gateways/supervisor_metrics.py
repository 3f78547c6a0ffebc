"""The supervisor's ``/metrics``: every worker's metrics (multiprocess mode) and its own.

Imported only by the supervisor, before it sets ``PROMETHEUS_MULTIPROC_DIR``: its own
metrics stay in its memory, and no worker creates them.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from voxrelay.service import metrics

__all__ = ["RESTARTS", "WORKERS", "mark_process_dead", "serve"]

WORKERS = Gauge("voxrelay_workers", "Worker processes ready to serve.", registry=None)
RESTARTS = Counter("voxrelay_worker_restarts", "Workers restarted after they died.", registry=None)


def serve(host: str, port: int, path: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on *host*:*port*: the workers' files in *path*, and the supervisor's."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(metrics.BUILD_INFO)
    registry.register(WORKERS)
    registry.register(RESTARTS)
    return start_http_server(port, addr=host, registry=registry)
