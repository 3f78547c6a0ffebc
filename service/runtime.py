"""Which streams may start, which are running, and the drain that ends them.

:class:`Runtime` is the one place that knows whether this process takes work: it
refuses new streams while draining or at capacity, grants per-caller slots through the
:class:`~.limits.AdmissionControl`, keeps the streams in flight so a drain can wait for
them or, once its window is over, end them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from .errors import Busy, Unavailable, VoxrelayError
from .limits import AdmissionControl, Lease
from .settings import Settings

__all__ = ["Abortable", "Runtime"]


class Abortable(Protocol):
    """A stream in flight, as the runtime sees it."""

    def abort(self, error: VoxrelayError) -> None:
        """Stop producing and make *error* the next thing the consumer gets."""
        ...


class Runtime:
    """Admit streams, count them, and drain."""

    def __init__(self, settings: Settings, admission: AdmissionControl) -> None:
        self.max_streams = settings.max_streams
        self.admission = admission
        self.draining = False
        self._streams: set[Abortable] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_drain: list[Callable[[], Awaitable[None]]] = []

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def check_open(self) -> None:
        """Raise the refusal a new stream would get now: draining, or at capacity."""
        if self.draining:
            raise Unavailable(
                "voxrelay is shutting down: retry on another replica", retry_after_s=1.0
            )
        cap = self.max_streams
        if cap and len(self._streams) >= cap:
            raise Busy(f"voxrelay is at capacity ({cap} streams): retry shortly", retry_after_s=1.0)

    async def admit(self, stream: Abortable, caller: str | None, chars: int) -> Lease:
        """Count *stream* in, within the caps and *caller*'s limits; release the lease after.

        *caller* is whom per-caller limits apply to (an API key id or a client address;
        None for an anonymous internal caller, to whom only the global caps apply).
        """
        self.check_open()
        grant = await self.admission.admit(caller, chars)
        try:
            self.check_open()  # others may have started while the admission answered
        except VoxrelayError:
            grant.release()
            raise
        self._streams.add(stream)
        self._idle.clear()

        def release() -> None:
            grant.release()
            self._streams.discard(stream)
            if not self._streams:
                self._idle.set()

        return Lease(release)

    async def charge(self, caller: str | None, chars: int) -> None:
        """Charge *chars* more input characters to *caller* (a streamed input's piece)."""
        await self.admission.charge(caller, chars)

    def on_drain(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await *callback* when the drain begins (a door reports that it is not serving)."""
        self._on_drain.append(callback)

    async def begin_drain(self) -> None:
        """Refuse new streams from now on (streams in flight go on), and tell the doors."""
        if self.draining:
            return
        self.draining = True
        for callback in self._on_drain:
            await callback()

    async def wait_idle(self) -> None:
        """Wait until no stream is in flight."""
        await self._idle.wait()

    def abort_all(self, error: VoxrelayError) -> None:
        """End every stream in flight with *error* (the drain window has run out)."""
        for stream in list(self._streams):
            stream.abort(error)
