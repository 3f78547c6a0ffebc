"""The soak's gRPC callers reach voxrelay from addresses of their own, through its hops."""

from __future__ import annotations

import asyncio

from bench.soak_clients import SourceHops

WAIT = 30.0


async def test_a_hop_carries_both_ways_from_its_address() -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await seen.put(writer.get_extra_info("peername")[0])
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    hops = SourceHops(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        async with asyncio.timeout(WAIT):
            for address in ("127.9.0.2", "127.9.0.3"):
                host, port = (await hops.target(address)).rsplit(":", 1)
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                assert await seen.get() == address
                writer.close()
                await writer.wait_closed()
            assert await hops.target("127.9.0.2") == await hops.target("127.9.0.2")
    finally:
        await hops.aclose()
        server.close()
        await server.wait_closed()
