"""Several worker processes behind one supervisor: ``voxrelay serve --workers N``.

Each worker is a whole voxrelay (:class:`~.app.App`) whose listeners share their ports
with the other workers through ``SO_REUSEPORT``: the kernel spreads new connections over
them. The supervisor (the ``voxrelay serve`` process) serves no stream. It

- picks the ports once: a port of 0 becomes one free port that every worker binds; it
  holds each port bound (not listening) for its whole life, so no other program takes it
  between a worker's death and its replacement;
- starts the workers with ``spawn`` (a fresh interpreter each: nothing of grpc's state
  crosses a fork), each in its own session so that only the supervisor receives the
  terminal's and the process group's signals, and forwards them exactly once;
- restarts a worker that dies, after an exponential backoff; a worker that fails before
  it is ready at the first start, or too many times in a row later, stops it all with one
  line;
- serves one ``/metrics`` for all workers: prometheus-client's multiprocess mode over a
  fresh directory (``PROMETHEUS_MULTIPROC_DIR``) removed at exit.

A worker whose supervisor vanishes (SIGKILL) drains and exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from voxrelay.service import __version__
from voxrelay.service.settings import Settings

from . import supervisor_metrics
from .worker import run_worker

__all__ = ["SupervisorError", "supervise"]

log = logging.getLogger("voxrelay")

#: The listeners the workers share: (name, setting, variable). The HTTP door joins when present.
LISTENERS = (
    ("gRPC", "grpc_port", "VOXRELAY_GRPC_PORT"),
    ("WebSocket", "ws_port", "VOXRELAY_WS_PORT"),
    ("HTTP", "http_port", "VOXRELAY_HTTP_PORT"),
)
#: The first restart waits this long; each quick death in a row doubles it, up to the cap.
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
#: A worker that served this long before dying starts its slot's backoff afresh.
STABLE_S = 30.0
#: A slot whose worker dies before it is ready this many times in a row stops the supervisor.
MAX_START_FAILURES = 4
#: After the workers' own drain window, how long the supervisor waits before killing them.
STOP_GRACE_S = 15.0
METRICS_DIR_PREFIX = "voxrelay-metrics-"
#: How a process that had no handlers yet ends on a forwarded SIGTERM or SIGINT.
STOP_EXITS = (-signal.SIGTERM, -signal.SIGINT)


class SupervisorError(Exception):
    """The workers cannot run; the message is one line for the operator."""


# Ports


def check_reuse_port() -> None:
    """Raise :class:`SupervisorError` unless this system can share a port between processes."""
    option = getattr(socket, "SO_REUSEPORT", None)
    try:
        if option is None:
            raise OSError(errno.ENOPROTOOPT, "no SO_REUSEPORT")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, option, 1)
    except OSError as exc:
        raise SupervisorError(
            f"--workers needs SO_REUSEPORT, which this system does not support ({exc}):"
            " run one process (VOXRELAY_WORKERS=1) per port instead"
        ) from None


def _address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, address


def reserve_ports(settings: Settings) -> tuple[Settings, list[socket.socket]]:
    """Bind every shared port once (SO_REUSEPORT, not listening); return the settings the
    workers get (ports picked) and the sockets to keep open while they run.

    A fixed port is first bound the ordinary way, so that one another program holds is
    named rather than silently shared.
    """
    chosen: dict[str, int] = {}
    held: list[socket.socket] = []
    try:
        for name, setting, variable in LISTENERS:
            if setting not in type(settings).model_fields:
                continue
            port: int | None = getattr(settings, setting)
            if port is None:  # a listener that is off
                continue
            where = f"{settings.host}:{port}"
            try:
                family, address = _address(settings.host, port)
                if port:
                    with socket.socket(family, socket.SOCK_STREAM) as probe:
                        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        probe.bind(address)
                sock = socket.socket(family, socket.SOCK_STREAM)
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise SupervisorError(
                        f"cannot start: the {name} port {where} is in use (another voxrelay?):"
                        f" stop it, or set {variable} (0 picks a free port)"
                    ) from None
                raise SupervisorError(
                    f"cannot start: cannot bind the {name} port {where} ({variable}): {exc}"
                ) from None
            chosen[setting] = sock.getsockname()[1]
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return settings.model_copy(update=chosen), held


# The supervisor


@dataclass
class _Slot:
    """One worker index: its current process and its history."""

    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    ready: bool = False
    deaths: int = 0  # deaths in a row, each before ready or soon after it: the backoff
    start_failures: int = 0  # deaths in a row before ready
    failure: str | None = None  # what the worker said when it could not start
    first_ready: asyncio.Event = field(default_factory=asyncio.Event)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Start, watch, restart and stop the workers; forward signals to them."""

    def __init__(self, settings: Settings, count: int, metrics_dir: str) -> None:
        self.settings = settings
        self.count = count
        self.metrics_dir = metrics_dir
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i) for i in range(count)]
        self.fatal: str | None = None
        self._stop = asyncio.Event()
        self._forced = False
        self._serving = False

    # Signals

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stop.is_set():
            log.info(
                "%s: the workers drain", sig.name, extra={"event": "drain", "workers": self.count}
            )
            self._begin_stop(signal.SIGINT if sig == signal.SIGINT else signal.SIGTERM)
        elif sig == signal.SIGINT and not self._forced:
            self._forced = True
            self._forward(signal.SIGINT)
        else:
            log.info("%s again: the drain goes on", sig.name, extra={"event": "drain"})

    def _begin_stop(self, sig: signal.Signals) -> None:
        """Tell every worker to drain, once: a second SIGINT would cut its drain short."""
        if not self._stop.is_set():
            self._stop.set()
            self._forward(sig)

    def _forward(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def _reload(self) -> None:
        log.info("SIGHUP: the workers reload", extra={"event": "reload"})
        self._forward(signal.SIGHUP)

    # Workers

    def _spawn(self, slot: _Slot) -> Connection:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=run_worker,
            args=(slot.index, self.settings, send),
            name=f"voxrelay-worker-{slot.index}",
        )
        process.start()
        send.close()
        slot.process, slot.started_at, slot.ready, slot.failure = (
            process,
            time.monotonic(),
            False,
            None,
        )
        return receive

    async def _run_once(self, slot: _Slot) -> int | None:
        """Run one process in *slot* until it exits; return its exit code."""
        loop = asyncio.get_running_loop()
        receive = self._spawn(slot)
        process = slot.process
        assert process is not None
        exited = loop.create_future()
        loop.add_reader(process.sentinel, lambda: exited.done() or exited.set_result(None))

        def message() -> None:
            try:
                kind, value = receive.recv()
            except (EOFError, OSError):
                loop.remove_reader(receive.fileno())
                return
            if kind == "ready":
                slot.ready = True
                slot.first_ready.set()
                supervisor_metrics.WORKERS.inc()
                log.info(
                    "worker %d ready",
                    slot.index,
                    extra={"event": "worker_ready", "worker_index": slot.index, "pid": value},
                )
            elif kind == "failed":
                slot.failure = str(value)

        loop.add_reader(receive.fileno(), message)
        try:
            await exited
        finally:
            loop.remove_reader(process.sentinel)
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(receive.fileno())
            with contextlib.suppress(EOFError, OSError):
                while receive.poll():  # a last word written just before the exit
                    kind, value = receive.recv()
                    if kind == "failed":
                        slot.failure = str(value)
            receive.close()
            # Its descriptors close just before it can be reaped: this wait is that instant.
            process.join(timeout=5)
            if process.pid is not None:
                supervisor_metrics.mark_process_dead(process.pid, self.metrics_dir)
            if slot.ready:
                supervisor_metrics.WORKERS.dec()
        return process.exitcode

    async def _keep(self, slot: _Slot) -> None:
        """Keep a worker running in *slot* until the stop; restart it after a death."""
        while True:
            code = await self._run_once(slot)
            if self._stop.is_set():
                return
            served = slot.ready and time.monotonic() - slot.started_at >= STABLE_S
            slot.deaths = 0 if served else slot.deaths + 1
            slot.start_failures = 0 if slot.ready else slot.start_failures + 1
            why = slot.failure or f"worker {slot.index} died ({_describe_exit(code)})"
            if not self._serving or slot.start_failures >= MAX_START_FAILURES:
                self.fatal = (
                    why
                    if not self._serving
                    else f"{why}; it failed to start {slot.start_failures} times in a row"
                )
                self._begin_stop(signal.SIGTERM)
                return
            delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (slot.deaths - 1))
            supervisor_metrics.RESTARTS.inc()
            log.warning(
                "worker %d (pid %s) exited with %s; restarting it in %.1f s",
                slot.index,
                slot.process.pid if slot.process else "?",
                _describe_exit(code),
                delay,
                extra={
                    "event": "worker_exit",
                    "worker_index": slot.index,
                    "exit": _describe_exit(code),
                    "restart_in_s": delay,
                },
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return

    async def run(self, metrics_port: int) -> int:
        """Serve until SIGTERM/SIGINT and the workers' drain; return the exit code."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        try:
            await self._serve_when_ready(metrics_port)
            await asyncio.wait(keepers)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self._stop_all(keepers)
        if self.fatal is not None:
            return 1
        # A worker still starting when told to stop ends by the signal itself: that is a stop.
        clean = all(
            slot.process.exitcode == 0 or (not slot.ready and slot.process.exitcode in STOP_EXITS)
            for slot in self.slots
            if slot.process is not None
        )
        return 0 if clean else 1

    async def _all_ready(self) -> None:
        for slot in self.slots:
            await slot.first_ready.wait()

    async def _serve_when_ready(self, metrics_port: int) -> None:
        """Log the start-up line once every worker is ready (unless the start failed)."""
        ready = asyncio.ensure_future(self._all_ready())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stop.cancel()
        if self._stop.is_set():
            return
        self._serving = True
        s = self.settings
        scheme = "wss" if s.tls_cert else "ws"
        http_port = getattr(s, "http_port", None)
        log.info(
            "voxrelay %s serving with %d workers",
            __version__,
            self.count,
            extra={
                "event": "startup",
                "version": __version__,
                "workers": self.count,
                "pid": os.getpid(),
                "grpc": f"{s.host}:{s.grpc_port}",
                "websocket": f"{scheme}://{s.host}:{s.ws_port}/v1/stream",
                "demo": f"{'https' if s.tls_cert else 'http'}://{s.host}:{s.ws_port}/",
                **({"http": f"{s.host}:{http_port}"} if http_port is not None else {}),
                "metrics": f"http://{s.host}:{metrics_port}/metrics",
                "metrics_dir": self.metrics_dir,
                **s.describe_choice(),
            },
        )

    async def _stop_all(self, keepers: list[asyncio.Task[None]]) -> None:
        """Wait for every worker to finish its drain; kill what outlives the window."""
        self._begin_stop(signal.SIGTERM)
        limit = self.settings.drain_s + STOP_GRACE_S
        _, late = await asyncio.wait(keepers, timeout=limit)
        if late:
            log.warning(
                "%d workers still running after %.0f s: killing them",
                len(late),
                limit,
                extra={"event": "shutdown"},
            )
            self._forward(signal.SIGKILL)
            await asyncio.wait(late, timeout=STOP_GRACE_S)
        log.info("stopped", extra={"event": "shutdown"})


def _remove_stale_metrics(base: str) -> None:
    """Remove the metrics directories of supervisors that are gone (killed, not stopped).

    Each is named after its supervisor's pid; one named after ours is a former life of
    this pid (a container's PID 1 restarted).
    """
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            if not entry.name.startswith(METRICS_DIR_PREFIX):
                continue
            pid = entry.name.removeprefix(METRICS_DIR_PREFIX).partition("-")[0]
            if not pid.isdigit() or not entry.is_dir(follow_symlinks=False):
                continue
            if int(pid) != os.getpid():
                try:
                    os.kill(int(pid), 0)
                    continue  # its supervisor runs
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue  # another user's, and running
            shutil.rmtree(entry.path, ignore_errors=True)


def supervise(settings: Settings, count: int) -> int:
    """Run *count* workers behind a supervisor until SIGTERM; return the exit code.

    Raises :class:`SupervisorError` (one line) when the ports or the metrics listener
    cannot be had.
    """
    check_reuse_port()
    shared, held = reserve_ports(settings)
    base = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    _remove_stale_metrics(base or tempfile.gettempdir())
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-", dir=base)
    server = None
    try:
        try:
            server, thread = supervisor_metrics.serve(
                settings.host, settings.metrics_port, metrics_dir
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SupervisorError(
                    f"cannot start: the metrics port {settings.host}:{settings.metrics_port}"
                    " is in use (another voxrelay?): stop it, or set VOXRELAY_METRICS_PORT"
                    " (0 picks a free port)"
                ) from None
            raise SupervisorError(f"cannot start the metrics listener: {exc}") from None
        shared = shared.model_copy(update={"metrics_port": server.server_port, "workers": 1})
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by each spawn
        supervisor = Supervisor(shared, count, metrics_dir)
        from .cli import _loop_factory

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(supervisor.run(server.server_port))
        if supervisor.fatal is not None:
            print(f"voxrelay: {supervisor.fatal}", file=sys.stderr)
        return code
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if server is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        for sock in held:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
