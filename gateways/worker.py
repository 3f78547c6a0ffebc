"""One worker process of several (see :mod:`.workers`): a whole voxrelay on shared ports.

This module is what a spawned worker imports first; it imports nothing of the
supervisor's (whose own metrics must not exist in a worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

from voxrelay.service.settings import Settings

__all__ = ["run_worker"]

log = logging.getLogger("voxrelay")


def run_worker(index: int, settings: Settings, ready: Connection) -> None:
    """Run one worker (the target of a spawned process) until it is told to stop.

    It says ``("ready", pid)`` on *ready* once it serves, or ``("failed", line)`` if it
    cannot start, then exits 1.
    """
    os.setsid()  # the supervisor forwards signals; a group's signal must not arrive twice
    # A reload asked for while this worker starts is moot (it reads the keys now), and
    # SIGHUP's default action would end it; the app's own handler replaces this one.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from voxrelay.service.descriptors import raise_descriptor_limit
    from voxrelay.service.logs import configure_logging

    from .app import App
    from .cli import _freeze_heap, _loop_factory

    configure_logging(settings.log_level, worker=index)
    raise_descriptor_limit(settings)

    serving = False

    def on_ready(app: App) -> None:
        nonlocal serving
        _freeze_heap(app)
        _watch_supervisor(app)
        serving = True
        ready.send(("ready", os.getpid()))

    async def run() -> None:
        await App(settings, worker=index).run(on_ready=on_ready)

    try:
        # A replacement starts long after the supervisor checked the settings: the key file
        # may be gone, and a worker without its keys would serve an open door.
        settings.check_key_file()
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run())
    except (OSError, ValueError) as exc:
        if serving:
            raise
        with contextlib.suppress(OSError):
            ready.send(("failed", f"worker {index} cannot start: {exc}"))
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # forwarded before the app's own handlers were in place
        raise SystemExit(130) from None
    finally:
        ready.close()


def _watch_supervisor(app: Any) -> None:
    """Drain and stop *app* when the supervisor's process is gone (its pipe closes)."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    loop = asyncio.get_running_loop()
    sentinel = parent.sentinel

    def gone() -> None:
        loop.remove_reader(sentinel)
        log.warning("the supervisor is gone: draining", extra={"event": "drain"})
        app.request_stop()

    loop.add_reader(sentinel, gone)
