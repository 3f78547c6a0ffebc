"""Wait for what a test needs: an event where one exists, else a condition within a bound.

Tests never sleep for something to happen. They await the event that announces it (a
frame, a close, ``FakeServer.wait_for``, a process's exit); state that nothing announces
(a gauge, a log line, ``/proc``, the loop's task count) is polled by :func:`eventually`,
whose bound is a safety net, never a timing under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["eventually"]


async def eventually(
    condition: Callable[[], bool],
    within: float = 30.0,
    *,
    every: float = 0.01,
) -> None:
    """Return once *condition* holds, polling every *every* s; TimeoutError after *within* s."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - for state that no event announces
            await asyncio.sleep(every)
