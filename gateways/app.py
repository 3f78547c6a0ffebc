"""The voxrelay process: three listeners around one core, and a graceful drain.

Lifecycle (after uvicorn's ``Server``): start-up → serve until SIGTERM/SIGINT →
drain (readiness 503, health NOT_SERVING, no new work; streams in flight get
``VOXRELAY_DRAIN_S``) → abort what is left (WebSocket 1001, gRPC UNAVAILABLE, HTTP a
cut-off body or an SSE ``error``) → close. SIGHUP re-reads the API keys and the lexicon. Signal
handlers are restored afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from voxrelay.service import __version__, metrics
from voxrelay.service.auth import KeyStore
from voxrelay.service.errors import Unavailable
from voxrelay.service.logs import register_secrets
from voxrelay.service.providers.registry import make_chat, make_speech
from voxrelay.service.relay import Relay
from voxrelay.service.settings import Settings
from voxrelay.service.synthesizer import Synthesizer

from .grpc_server import GrpcDoor
from .http_server import HttpDoor
from .ws_server import WsDoor

__all__ = ["App", "serve"]

log = logging.getLogger("voxrelay")

#: How often a worker copies its callback gauges into its metrics file.
GAUGE_REFRESH_S = 2.0


def _secrets(settings: Settings) -> list[str]:
    """Every secret in *settings*, so that no log line can carry one."""
    values = [
        key.get_secret_value()
        for key in (settings.openai_api_key, settings.llm_api_key, settings.tts_api_key)
        if key is not None
    ]
    for url in (
        settings.openai_base_url,
        settings.llm_base_url,
        settings.tts_base_url,
        settings.redis_url,
    ):
        password = urlsplit(url).password if url else None
        if password:
            values.append(password)
    # An unreadable key file is the key store's to report; it holds nothing to hide then.
    with contextlib.suppress(OSError, UnicodeDecodeError):
        values += settings.all_api_keys()
    return values


class App:
    """Own the core and its doors; start, drain and stop them together."""

    def __init__(self, settings: Settings, *, worker: int | None = None) -> None:
        """*worker*: this process is that worker of several (see :mod:`.workers`): its
        listeners share their ports and the supervisor serves ``/metrics``."""
        self.settings = settings
        self.worker = worker
        register_secrets(_secrets(settings))
        # One key store for every door; SIGHUP reloads it.
        self.keys = KeyStore(settings)
        self.synthesizer = Synthesizer(settings, make_chat(settings), make_speech(settings))
        self.runtime = self.synthesizer.runtime
        for stage in self.synthesizer.engines.stages:
            metrics.init_upstream(stage.stage, stage.provider)
        relay = Relay(self.synthesizer)
        self.grpc = GrpcDoor(settings, relay, self.keys, reuse_port=worker is not None)
        self.ws = WsDoor(settings, relay, self.keys, self.runtime)
        self.http = HttpDoor(settings, relay, self.keys) if settings.http_port is not None else None
        self.runtime.on_drain(self.grpc.begin_drain)
        self._metrics: tuple[WSGIServer, threading.Thread] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self.metrics_port = 0
        self._stop = asyncio.Event()
        self._forced = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None

    @property
    def grpc_port(self) -> int:
        return self.grpc.port

    @property
    def ws_port(self) -> int:
        return self.ws.port

    @property
    def http_port(self) -> int:
        """The OpenAI-compatible door's port (0 when it is off)."""
        return self.http.port if self.http is not None else 0

    async def start(self) -> None:
        """Open every listener and log what was chosen."""
        s = self.settings
        if self.worker is None:
            server, thread = start_http_server(
                s.metrics_port, addr=s.host, registry=metrics.REGISTRY
            )
            self._metrics = (server, thread)
            self.metrics_port = server.server_port
        else:
            self.metrics_port = s.metrics_port  # the supervisor's, for all workers
            self._gauges = asyncio.create_task(self._refresh_gauges())
        await self.runtime.admission.start()
        await self.grpc.start()
        await self.ws.start(reuse_port=self.worker is not None)
        if self.http is not None:
            await self.http.start(reuse_port=self.worker is not None)
        scheme = "wss" if s.tls_cert else "ws"
        https = "https" if s.tls_cert else "http"
        openai_door = f"{https}://{s.host}:{self.http_port}/v1" if self.http is not None else "off"
        log.info(
            "voxrelay %s serving" if self.worker is None else "voxrelay %s worker serving",
            __version__,
            extra={
                "event": "startup" if self.worker is None else "worker_start",
                "pid": os.getpid(),
                "version": __version__,
                "grpc": f"{s.host}:{self.grpc_port}",
                "websocket": f"{scheme}://{s.host}:{self.ws_port}/v1/stream",
                "demo": f"{https}://{s.host}:{self.ws_port}/",
                "openai": openai_door,
                "metrics": f"http://{s.host}:{self.metrics_port}/metrics",
                **s.describe_choice(),
                "llm_model": self.synthesizer.engines.reply_provider.model,
                "tts_model": self.synthesizer.engines.speech.model,
                "auth": "api_keys" if self.keys.required else "open",
                "log_text": s.log_text,
                "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            },
        )

    async def _refresh_gauges(self) -> None:
        """Copy what a worker's gauges read on demand into its metrics file, for the supervisor.

        The supervisor's /metrics reads only the files, not this process's callbacks.
        """
        while True:
            metrics.GRPC_CONNECTIONS.set(self.grpc.connections())
            await asyncio.sleep(GAUGE_REFRESH_S)

    def reload(self) -> None:
        """Read the API keys and the lexicon again (what SIGHUP does).

        Either one that cannot be read keeps what is in force.
        """
        self.keys.reload()
        self.synthesizer.speakable.reload()

    def request_stop(self) -> None:
        """Ask the process to drain and stop (what SIGTERM does)."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def drain_and_stop(self) -> None:
        """Refuse new work, let streams finish within the drain window, then close.

        Calling it again waits for the first call's work; it never runs twice.
        """
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._drain_and_stop())
        await asyncio.shield(self._stopping)

    async def _drain_and_stop(self) -> None:
        s = self.settings
        runtime = self.runtime
        log.info(
            "draining",
            extra={
                "event": "drain",
                "active_streams": runtime.active_streams,
                "drain_s": s.drain_s,
            },
        )
        await runtime.begin_drain()
        idle = asyncio.ensure_future(runtime.wait_idle())
        forced = asyncio.ensure_future(self._forced.wait())
        await asyncio.wait({idle, forced}, timeout=s.drain_s, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not idle.done():
            idle.cancel()
            left = runtime.active_streams
            why = "interrupted again" if self._forced.is_set() else "drain window over"
            log.warning("%s; ending %d streams", why, left, extra={"event": "drain"})
            runtime.abort_all(Unavailable("voxrelay is shutting down: retry", retry_after_s=1.0))
        await self._close()
        log.info("stopped", extra={"event": "shutdown"})

    async def _close(self) -> None:
        """Close the doors, the core and the metrics listener (whatever was opened)."""
        await self.ws.close_all()
        await self.grpc.stop(grace=1.0)
        await self.ws.stop()
        if self.http is not None:
            await self.http.stop()
        await self.synthesizer.aclose()
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
            self._gauges = None
        if self._metrics is not None:
            server, thread = self._metrics
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._metrics = None

    def _on_signal(self, sig: signal.Signals) -> None:
        """SIGTERM/SIGINT: drain and stop; a second SIGINT (Ctrl-C) ends the drain at once.

        A second SIGTERM is ignored: ``make`` passes its own on to the server, so killing
        the process group of ``make run`` delivers two, and the drain must go on.
        """
        if not self._stop.is_set():
            self.request_stop()
        elif sig == signal.SIGINT and not self._forced.is_set():
            self._forced.set()
        else:
            log.info("%s again: the drain goes on", sig.name, extra={"event": "drain"})

    async def run(self, *, on_ready: Callable[[App], Any] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then drain and stop; SIGHUP reloads the keys.

        The handlers stay in place through the drain and are restored afterwards.
        """
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.getsignal(sig) for sig in signals}
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        started = False
        try:
            await self.start()
            started = True
            if on_ready is not None:
                on_ready(self)
            await self.wait_stopped()
            await self.drain_and_stop()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous[sig])
            if started:
                await self.drain_and_stop()  # a no-op after a normal stop
            else:
                await self._close()  # start-up failed: nothing was served, nothing to drain


async def serve(settings: Settings) -> None:
    """Run voxrelay until it is told to stop."""
    await App(settings).run()
