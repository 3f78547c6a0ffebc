"""What every fake upstream has: ``async with`` for its lifetime, and waiting on its records."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Self

__all__ = ["FakeServer"]


class FakeServer:
    """A local server for tests: ``async with Fake() as fake:`` starts and stops it.

    Subclasses call :meth:`_notify` whenever they record something; tests await
    :meth:`wait_for` instead of sleeping.
    """

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - the spelling tests expect
    ) -> None:
        """Return once *predicate* holds; raise :class:`TimeoutError` after *timeout*."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout} s") from None
