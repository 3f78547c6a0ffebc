"""ReadHold over a real loopback socket: held, it is not read; then one read takes it all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.waiting import eventually
from voxrelay.service.providers.base import ReadHold

PIECES = [bytes([n]) * 960 for n in range(1, 6)]


class Receiver(asyncio.Protocol):
    """Record each read the event loop makes, with the loop's time."""

    def __init__(self) -> None:
        self.reads: list[tuple[float, bytes]] = []
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.reads.append((asyncio.get_running_loop().time(), data))
        self.arrived.set()

    def received(self) -> bytes:
        return b"".join(data for _, data in self.reads)


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[asyncio.StreamWriter, asyncio.Transport, Receiver]]:
    """Yield a server-side writer and the client's transport and protocol, over loopback."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
    server = await asyncio.start_server(
        lambda _, writer: accepted.set_result(writer), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    transport, receiver = await loop.create_connection(Receiver, "127.0.0.1", port)
    writer = await accepted
    try:
        yield writer, transport, receiver
    finally:
        transport.close()
        writer.close()
        server.close()
        await server.wait_closed()


async def send(writer: asyncio.StreamWriter) -> None:
    for piece in PIECES:
        writer.write(piece)
        await writer.drain()


async def test_a_held_socket_is_read_once_the_hold_ends_and_in_one_go() -> None:
    loop = asyncio.get_running_loop()
    async with connected() as (writer, transport, receiver):
        hold = ReadHold()
        hold.reading(lambda: transport)
        began = loop.time()
        holding = asyncio.create_task(hold.hold(0.1))
        await eventually(lambda: hold.held)
        await send(writer)  # into the kernel's buffer: loopback delivers at once
        await holding
        assert not hold.held and transport.is_reading()
        await receiver.arrived.wait()
        assert receiver.received() == b"".join(PIECES)
        [(when, _)] = receiver.reads  # all that gathered, in one read
        assert when >= began + 0.09  # not before the hold ended (the clock ticks in ms)


async def test_a_socket_no_longer_the_streams_is_read_as_usual() -> None:
    async with connected() as (writer, _, receiver):
        hold = ReadHold()
        hold.reading(lambda: None)  # the body is in; the socket went back to its pool
        holding = asyncio.create_task(hold.hold(5))
        await send(writer)
        await receiver.arrived.wait()  # read while the hold still lasts
        assert not holding.done() and not hold.held
        holding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holding


async def test_a_socket_paused_by_its_owner_stays_paused() -> None:
    async with connected() as (_, transport, _):
        transport.pause_reading()  # aiohttp's flow control, say
        hold = ReadHold()
        hold.reading(lambda: transport)
        await hold.hold(0.001)
        assert not transport.is_reading() and not hold.held


async def test_a_cancelled_hold_lets_the_socket_be_read_again() -> None:
    async with connected() as (writer, transport, receiver):
        hold = ReadHold()
        hold.reading(lambda: transport)
        holding = asyncio.create_task(hold.hold(5))
        await eventually(lambda: hold.held)
        holding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holding
        assert transport.is_reading() and not hold.held
        await send(writer)
        await receiver.arrived.wait()
        await eventually(lambda: receiver.received() == b"".join(PIECES))


async def test_a_closed_socket_is_left_alone() -> None:
    async with connected() as (_, transport, _):
        hold = ReadHold()
        hold.reading(lambda: transport)
        transport.close()
        await hold.hold(0.001)
        assert not hold.held
