"""What every fake upstream has: a latency model and a reply, ``async with`` for its
lifetime, and waiting on its records."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

__all__ = ["FakeServer", "Latency", "Reply"]

#: the reply, or a function of the conversation (``{"role", "content"}`` dicts) that returns it.
Reply = str | Callable[[Sequence[Mapping[str, Any]]], str]


@dataclass(slots=True)
class Latency:
    """How slowly the fake answers; replace ``fake.latency`` to change it mid-test."""

    #: chat: from the request to the first token.
    ttft_s: float = 0.2
    #: chat: between two tokens.
    token_s: float = 0.02
    #: speech: from the request to the first audio byte.
    tts_first_byte_s: float = 0.15
    #: speech: seconds spent per second of audio after the first byte (0.2 = 5× real time).
    tts_rtf: float = 0.2

    @classmethod
    def zero(cls) -> Latency:
        """Return a latency model that never waits, for fast unit tests."""
        return cls(ttft_s=0.0, token_s=0.0, tts_first_byte_s=0.0, tts_rtf=0.0)


class FakeServer:
    """A local server for tests: ``async with Fake() as fake:`` starts and stops it.

    Subclasses call :meth:`_notify` whenever they record something; tests await
    :meth:`wait_for` instead of sleeping.
    """

    def __init__(
        self,
        *,
        latency: Latency | None,
        reply: Reply,
        api_key: str | None,
        host: str,
        port: int,
        keep_history: bool,
    ) -> None:
        self._changed = asyncio.Event()
        self._waiters = 0  # tasks in wait_for
        self.latency = latency if latency is not None else Latency()
        self.reply: Reply = reply
        #: when set, any other bearer token is refused with a 401.
        self.api_key = api_key
        self.host = host
        self.port = port
        #: record requests and events (off for long benchmark runs, so memory stays flat).
        self.keep_history = keep_history
        #: every event: (time, kind, index of its request or session).
        self.events: list[tuple[float, str, int]] = []
        #: TCP connections open now (including ones still in, or refused at, the handshake).
        self.open_connections = 0
        self.connections_total = 0

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
        # A new Event only when someone waits on this one: events come per audio chunk.
        if self._waiters:
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
                    self._waiters += 1
                    try:
                        await self._changed.wait()
                    finally:
                        self._waiters -= 1
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout} s") from None
