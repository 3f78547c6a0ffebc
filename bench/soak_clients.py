"""The soak run's normal clients: well-behaved callers of both doors, each timing its answer.

A :class:`NormalClient` asks for one kind of answer (a door and a mode) again and again, as a
listener would: it reads the whole stream, then waits for the audio to have played (capped)
before it asks again. Each client speaks from its own loopback address, so voxrelay's
per-address limits and its engine's fair queue treat it as one caller among many, as they
would real users; the attack uses other addresses. grpc's Python client cannot choose its
source address, so a gRPC caller reaches voxrelay through a :class:`SourceHops` hop that
connects from the caller's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass

import grpc
from websockets.asyncio.client import ClientConnection, connect

from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

__all__ = [
    "FORMATS",
    "GRPC_FORMATS",
    "KINDS",
    "NormalClient",
    "Outcome",
    "SourceHops",
    "error_name",
    "loopback",
    "ws_connect",
]

#: every kind of normal request: door/mode.
KINDS = ("grpc/speak", "grpc/chat", "ws/speak", "ws/chat")
FORMATS = ("pcm", "mp3", "opus", "wav")
GRPC_FORMATS = {
    "pcm": pb.AUDIO_FORMAT_PCM,
    "wav": pb.AUDIO_FORMAT_WAV,
    "mp3": pb.AUDIO_FORMAT_MP3,
    "opus": pb.AUDIO_FORMAT_OPUS,
}
SPEAK_TEXT = "Your train leaves from platform four. It is on time."
CHAT_TEXT = "How much is a ticket, and how often do the trains run?"
#: a listener waits at most this long for its audio to play before asking again.
MAX_LISTEN_S = 8.0


def loopback(block: int, index: int) -> str:
    """Return a loopback address of its own for client *index* of *block* (127.0.0.0/8)."""
    return f"127.{block}.{index // 250}.{index % 250 + 2}"


def error_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc:{exc.code().name}"
    return type(exc).__name__


async def ws_connect(url: str, address: str, **options: object) -> ClientConnection:
    """Open a WebSocket from *address* with no compression and no frame limit."""
    return await connect(
        url,
        local_addr=(address, 0),
        compression=None,
        max_size=None,
        ping_interval=None,
        open_timeout=10,
        **options,  # type: ignore[arg-type]
    )


class SourceHops:
    """TCP hops to voxrelay's gRPC port, one per source address, started when first asked.

    A connection to a hop is carried to *target* over a connection bound to the hop's
    address: voxrelay sees the caller's address, as it would see a real client's. Each
    direction is read only as fast as the other side takes it, so a caller that stops
    reading still stops the server's writes (after a hop's few buffers).
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._hops: dict[str, asyncio.Server] = {}
        self._pipes: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.WriteTransport] = set()

    async def target(self, address: str) -> str:
        """Return the ``host:port`` a gRPC channel dials to reach voxrelay from *address*."""
        hop = self._hops.get(address)
        if hop is None:

            async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await self._carry(address, reader, writer)

            hop = self._hops[address] = await asyncio.start_server(carry, "127.0.0.1", 0)
        port: int = hop.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _carry(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        ends: list[asyncio.WriteTransport] = [writer.transport]
        self._transports.add(writer.transport)
        try:
            async with asyncio.timeout(10):
                up_reader, up_writer = await asyncio.open_connection(
                    self._host, self._port, local_addr=(address, 0)
                )
            ends.append(up_writer.transport)
            self._transports.add(up_writer.transport)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, TimeoutError):
            pass  # voxrelay refused or is gone: the caller sees its connection end
        finally:
            for transport in ends:
                transport.abort()
                self._transports.discard(transport)
            self._pipes.discard(task)

    async def aclose(self) -> None:
        """Stop every hop and end every connection it carries (each end sees a reset)."""
        for hop in self._hops.values():
            hop.close()
        for transport in list(self._transports):
            transport.abort()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for hop in self._hops.values():
            await hop.wait_closed()
        self._hops.clear()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy *source* to *sink* until *source* ends or fails; then close *sink*."""
    try:
        while data := await source.read(65_536):
            sink.write(data)
            await sink.drain()
    except OSError:
        sink.transport.abort()
    finally:
        sink.close()


@dataclass(slots=True)
class Outcome:
    """One normal request as its client saw it (times from ``time.monotonic()``)."""

    kind: str
    started: float
    ttfa: float | None = None
    audio_s: float = 0.0
    error: str | None = None

    @property
    def first_audio_at(self) -> float | None:
        return None if self.ttfa is None else self.started + self.ttfa


class NormalClient:
    """One caller of one kind (``door/mode``), one request at a time."""

    def __init__(
        self, kind: str, *, grpc_target: str, ws_url: str, address: str, timeout_s: float
    ) -> None:
        self.kind = kind
        self.door, self.mode = kind.split("/")
        self.ws_url = ws_url
        self.address = address
        self.timeout_s = timeout_s
        self._formats = itertools.cycle(FORMATS)
        self._ids = itertools.count()
        self._ws: ClientConnection | None = None
        self._channel = grpc.aio.insecure_channel(
            grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self._stub = pb_grpc.SynthesizerStub(self._channel)

    @property
    def text(self) -> str:
        return SPEAK_TEXT if self.mode == "speak" else CHAT_TEXT

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        await self._channel.close()

    async def request(self) -> Outcome:
        """Ask once; an error, a timeout or a missing ``finished`` is a failure."""
        out = Outcome(self.kind, time.monotonic())
        fmt = next(self._formats)
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.door == "grpc":
                    await self._grpc(out, fmt)
                else:
                    await self._websocket(out, fmt)
        except TimeoutError:
            out.error = "timeout"
        except Exception as exc:
            out.error = error_name(exc)
        if out.error is not None and self._ws is not None:
            ws, self._ws = self._ws, None
            with contextlib.suppress(Exception):
                await ws.close()
        return out

    async def listen(self, out: Outcome) -> None:
        """Wait as a listener would for the audio to play, then a moment more."""
        if out.first_audio_at is None:
            await asyncio.sleep(1.0)
            return
        played = out.first_audio_at + min(out.audio_s, MAX_LISTEN_S) + 0.3
        await asyncio.sleep(max(0.3, played - time.monotonic()))

    async def _grpc(self, out: Outcome, fmt: str) -> None:
        mode = pb.MODE_SPEAK if self.mode == "speak" else pb.MODE_CHAT
        call = self._stub.Synthesize(
            pb.SynthesizeRequest(text=self.text, mode=mode, format=GRPC_FORMATS[fmt]),
            timeout=self.timeout_s,
        )
        finished = False
        async for event in call:
            which = event.WhichOneof("event")
            if which == "audio" and out.ttfa is None:
                out.ttfa = time.monotonic() - out.started
            elif which == "finished":
                out.audio_s = event.finished.audio_ms / 1000
                finished = True
        if not finished:
            out.error = "no_finished"

    async def _websocket(self, out: Outcome, fmt: str) -> None:
        if self._ws is None:
            self._ws = await ws_connect(self.ws_url, self.address)
        ws = self._ws
        request_id = f"n{next(self._ids)}"
        frame = {"type": "synthesize", "id": request_id, "text": self.text, "mode": self.mode}
        await ws.send(json.dumps({**frame, "format": fmt}))
        async for message in ws:
            if isinstance(message, bytes):
                if out.ttfa is None:
                    out.ttfa = time.monotonic() - out.started
                continue
            event = json.loads(message)
            kind = event.get("type")
            if kind == "finished":
                out.audio_s = event.get("audio_ms", 0) / 1000
                return
            if kind == "error":
                out.error = f"ws:{event.get('code')}"
                return
            if kind == "cancelled":
                out.error = "cancelled"
                return
        out.error = f"ws_closed:{ws.close_code}"
        self._ws = None
