"""The processes the benchmark starts, and their end whatever ends the benchmark.

Every child leads a session (so a process group) of its own: a signal sent to the
benchmark's group (Ctrl-C in a terminal, ``timeout``) does not reach it, and its parent
becomes init when the benchmark dies. So the benchmark stops its children itself, whatever
ends it, in two ways:

- :func:`spawn` asks the kernel (``prctl(PR_SET_PDEATHSIG)``) to send a child SIGTERM when
  the benchmark dies, however it dies, SIGKILL included;
- :func:`stopping_children` stops every child's process group, grandchildren included, on
  SIGTERM, SIGINT and SIGHUP (then dies of that signal) and on any exit from its block.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["forget", "spawn", "stop_all", "stopping_children"]

#: ``<linux/prctl.h>``: the signal a process gets when the thread that forked it dies.
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
#: The children in flight: pid (which is also its process group's id) → name.
_running: dict[int, str] = {}


def _dies_with(parent: int) -> Callable[[], None]:
    """Return a ``preexec_fn`` that ties the child's life to *parent*'s."""
    prctl = _libc.prctl

    def tie() -> None:
        # Runs in the child between fork and exec, and survives exec (taskset, then python).
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the tie was made
            os._exit(1)

    return tie


async def spawn(name: str, *argv: str, **options: Any) -> asyncio.subprocess.Process:
    """Start *argv* as a child that dies with this process; *options* go to asyncio.

    The child leads a process group of its own. Call :func:`forget` once it has exited.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv, start_new_session=True, preexec_fn=_dies_with(os.getpid()), **options
    )
    _running[proc.pid] = name
    return proc


def forget(pid: int) -> None:
    """Note that the child *pid* has exited (and was waited for)."""
    _running.pop(pid, None)


def _signal_groups(sig: int) -> None:
    for pid in _running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def stop_all(grace_s: float = 3.0) -> None:
    """Stop every child's process group: SIGTERM, up to *grace_s* to exit, then SIGKILL.

    Synchronous, so that it can run in a signal handler, with or without an event loop.
    """
    if not _running:
        return
    _signal_groups(signal.SIGTERM)
    left = set(_running)
    deadline = time.monotonic() + grace_s
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                exited, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # already waited for by the event loop
                exited = pid
            if exited:
                left.discard(pid)
        if left:
            time.sleep(0.02)
    # Whatever is left of each group, a leader that would not go or what it started.
    _signal_groups(signal.SIGKILL)
    _running.clear()


@contextlib.contextmanager
def stopping_children(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
) -> Iterator[None]:
    """Stop every child when the block exits, or on one of *signals*, then die of it.

    Installed before an event loop runs, the SIGINT handler also stands in for asyncio's
    (which would only cancel the main task and leave the children to its ``finally``).
    """

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # A second signal while the children stop kills us at once; PDEATHSIG then ends them.
        signal.signal(signum, signal.SIG_DFL)
        stop_all()
        os.kill(os.getpid(), signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield
    finally:
        stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
