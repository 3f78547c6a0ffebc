"""The floor under voxrelay's 1-stream overhead: one hop on each door's own library.

voxrelay's time to first audio over the limit is the same upstream work plus one hop each
way: the client's request to voxrelay, and the first audio back. This server is that hop
and nothing else. It answers ``Synthesize`` over grpc.aio, and ``synthesize`` over
websockets, the way voxrelay does on each door, but at once and with no upstream.

The benchmark probes it with its own gRPC and WebSocket clients, in the same rounds as the
probes of voxrelay, pinned to voxrelay's core, on uvloop. So the floor pays what those
probes pay: each library's call set-up, its threads and their wake-ups on this machine.
voxrelay's overhead less this floor is what voxrelay itself adds.

It also answers ``POST /v1/audio/speech`` on aiohttp, as voxrelay's OpenAI-compatible
door does.

Run it as ``python -m bench.floor --grpc-port N --ws-port M --http-port H``. It prints one
line with the addresses once all listen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import uvloop
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

from .clients import GrpcClient, HttpClient, WsClient

__all__ = ["READY", "GrpcFloorClient", "HttpFloorClient", "WsFloorClient", "main"]

READY = "floor doors on"
#: 20 ms of 24 kHz s16le mono: voxrelay's first audio message at one stream.
AUDIO = bytes(960)
#: How long a stream stays open for its probe's cancel; a probe cancels within ms.
HOLD_S = 30.0


class GrpcFloorClient(GrpcClient):
    """The benchmark's gRPC client, pointed at the floor server."""

    kind = "grpc_floor"


class WsFloorClient(WsClient):
    """The benchmark's WebSocket client, pointed at the floor server."""

    kind = "ws_floor"


class HttpFloorClient(HttpClient):
    """The benchmark's OpenAI-door client, pointed at the floor server."""

    kind = "http_floor"


class _Synthesizer(pb_grpc.SynthesizerServicer):
    async def Synthesize(
        self,
        request: pb.SynthesizeRequest,
        context: grpc.aio.ServicerContext[pb.SynthesizeRequest, pb.SynthesizeResponse],
    ) -> AsyncIterator[pb.SynthesizeResponse]:
        response = pb.SynthesizeResponse()
        response.audio.data = AUDIO
        yield response
        await asyncio.sleep(HOLD_S)  # the probe cancels here
        yield pb.SynthesizeResponse(finished=pb.StreamFinished(audio_bytes=len(AUDIO)))

    async def ListVoices(
        self,
        request: pb.ListVoicesRequest,
        context: grpc.aio.ServicerContext[pb.ListVoicesRequest, pb.ListVoicesResponse],
    ) -> pb.ListVoicesResponse:
        return pb.ListVoicesResponse()


async def _websocket(ws: ServerConnection) -> None:
    async for message in ws:
        frame = json.loads(message)
        if frame.get("type") == "synthesize":
            await ws.send(AUDIO)
        elif frame.get("type") == "cancel":
            await ws.send(json.dumps({"type": "cancelled", "id": frame.get("id")}))


async def _speech(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(AUDIO)
    await asyncio.sleep(HOLD_S)  # the probe disconnects here
    return response


async def _serve(grpc_port: int, ws_port: int, http_port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_SynthesizerServicer_to_server(_Synthesizer(), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    app = web.Application()
    app.router.add_post("/v1/audio/speech", _speech)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    try:
        async with serve(
            _websocket, "127.0.0.1", ws_port, compression=None, max_size=None, ping_interval=None
        ):
            print(
                f"{READY} grpc=127.0.0.1:{grpc_port} ws=ws://127.0.0.1:{ws_port}/v1/stream"
                f" http=http://127.0.0.1:{http_port}/v1",
                flush=True,
            )
            await server.wait_for_termination()
    finally:
        await runner.cleanup()
        await server.stop(None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--ws-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args(argv)
    # The same loop as voxrelay's; the benchmark stops this process with SIGTERM.
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(args.grpc_port, args.ws_port, args.http_port))


if __name__ == "__main__":
    main()
