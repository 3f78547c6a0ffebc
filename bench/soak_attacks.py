"""The soak run's attack: every abuse issue 17 names, each a bounded number of workers.

- ``huge_ws`` / ``huge_grpc``: the longest text allowed (prose, or one whitespace-free run),
  or a chat turn that asks for a long reply, at ``speed`` 0.25 and 48 kHz; on WebSocket with
  ``"stream": false``. Read to the end, or given up after ``hold_s``.
- ``stall_grpc`` / ``stall_ws``: open a long stream and never read it (a small receive buffer,
  a one-frame queue); note whether the server dropped the caller within ``hold_s``.
- ``malformed_ws`` / ``malformed_grpc``: bad JSON, unknown types, wrong types, lone surrogates,
  over-size frames, undecodable protobuf; each should get its typed error, and the WebSocket
  connection should stay usable afterwards.
- ``cancels``: ordinary requests cancelled at a random point (a cancel frame, a dropped
  connection, a cancelled call), before or after the first audio.
- ``faults``: chat requests whose upstream call faults (:mod:`bench.soak_upstream`).

Every worker, on either door, speaks from a loopback address of its own (per-address limits
and the engine's fair queue apply to each as to one caller; gRPC through
:class:`~bench.soak_clients.SourceHops`). What each attempt ended in is counted in
:attr:`Attack.tally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import signal
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

from .soak_clients import FORMATS, GRPC_FORMATS, SourceHops, error_name, loopback, ws_connect
from .soak_upstream import FAULTS

__all__ = ["ATTACKING", "ATTACKS", "TALLY", "Attack", "Targets", "make_attacks"]

LONG_PROSE = (
    "The slow reader asks for everything and listens to nothing, one word at a time. " * 60
)[:4000]
#: one whitespace-free run: a segment the chunker cannot cut at a word.
LONG_RUN = "1" * 4096
GRPC_METHOD = "/voxrelay.v1.Synthesizer/Synthesize"


@dataclass(frozen=True, slots=True)
class Targets:
    grpc: str
    ws_url: str
    hops: SourceHops

    async def grpc_from(self, address: str) -> str:
        """The gRPC target that reaches voxrelay from *address* (see :class:`SourceHops`)."""
        return await self.hops.target(address)


def _channel(target: str) -> grpc.aio.Channel:
    # Its own HTTP/2 connection, not one shared through the global subchannel pool.
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _huge_request() -> dict[str, Any]:
    text, mode = random.choice(
        [(LONG_PROSE, "speak"), (LONG_RUN, "speak"), ("Tell me everything. [[long]]", "chat")]
    )
    return {"text": text, "mode": mode, "speed": 0.25, "sample_rate_hz": 48_000}


class Attack:
    """*workers* loops of one abuse, each from its own address, until told to stop."""

    name = "attack"
    pause_s = 0.5

    def __init__(self, targets: Targets, *, workers: int, block: int, hold_s: float) -> None:
        self.targets = targets
        self.workers = workers
        self.block = block
        self.hold_s = hold_s
        self.tally: Counter[str] = Counter()
        self._ids = itertools.count()

    def next_id(self) -> str:
        return f"{self.name[:2]}{next(self._ids)}"

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._loop(i, stop) for i in range(self.workers)))

    async def _loop(self, index: int, stop: asyncio.Event) -> None:
        address = loopback(self.block, index)
        while not stop.is_set():
            try:
                outcome = await self.once(index, address)
            except asyncio.CancelledError:
                self.tally["in_flight_at_stop"] += 1
                raise
            except Exception as exc:
                outcome = f"raised:{error_name(exc)}"
            self.tally[outcome] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.pause_s)

    async def once(self, index: int, address: str) -> str:
        raise NotImplementedError


async def _read_ws(ws: ClientConnection, limit_s: float) -> str:
    """Read one stream to its end; return how it ended."""
    try:
        async with asyncio.timeout(limit_s):
            async for message in ws:
                if isinstance(message, bytes):
                    continue
                event = json.loads(message)
                kind = event.get("type")
                if kind in ("finished", "cancelled"):
                    return str(kind)
                if kind == "error":
                    return f"error:{event.get('code')}"
    except TimeoutError:
        return "held_to_limit"
    return f"closed:{ws.close_code}"


async def _read_grpc(call: Any, limit_s: float) -> str:
    try:
        async with asyncio.timeout(limit_s):
            async for _ in call:
                pass
    except TimeoutError:
        call.cancel()
        return "held_to_limit"
    except grpc.aio.AioRpcError as exc:
        return f"grpc:{exc.code().name}"
    return "finished"


class HugeWs(Attack):
    name = "huge_ws"

    async def once(self, index: int, address: str) -> str:
        frame = {"type": "synthesize", "id": self.next_id(), "format": "wav", "stream": False}
        async with await ws_connect(self.targets.ws_url, address) as ws:
            await ws.send(json.dumps({**frame, **_huge_request()}))
            return await _read_ws(ws, self.hold_s)


class HugeGrpc(Attack):
    name = "huge_grpc"

    async def once(self, index: int, address: str) -> str:
        ask = _huge_request()
        mode = pb.MODE_SPEAK if ask["mode"] == "speak" else pb.MODE_CHAT
        async with _channel(await self.targets.grpc_from(address)) as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(
                pb.SynthesizeRequest(
                    text=ask["text"],
                    mode=mode,
                    speed=ask["speed"],
                    sample_rate_hz=ask["sample_rate_hz"],
                    format=pb.AUDIO_FORMAT_WAV,
                )
            )
            return await _read_grpc(call, self.hold_s)


class StallGrpc(Attack):
    """Open a long call and read nothing for ``hold_s``; then see whether the server ended it."""

    name = "stall_grpc"

    async def once(self, index: int, address: str) -> str:
        async with _channel(await self.targets.grpc_from(address)) as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(
                pb.SynthesizeRequest(
                    text=LONG_PROSE,
                    mode=pb.MODE_SPEAK,
                    speed=0.25,
                    sample_rate_hz=48_000,
                    format=pb.AUDIO_FORMAT_WAV,
                )
            )
            # The call's status queues behind the messages nobody read, so whether the server
            # ended it shows only once they are read: after the hold, drain what is buffered.
            await asyncio.sleep(self.hold_s)
            outcome = await _read_grpc(call, 5.0)
            return outcome.replace("grpc:", "dropped:", 1)


class StallWs(Attack):
    """Send a request, then stop reading: a tiny receive buffer and a one-frame queue."""

    name = "stall_ws"

    async def once(self, index: int, address: str) -> str:
        url = urlsplit(self.targets.ws_url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind((address, 0))
            sock.setblocking(False)
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (url.hostname, url.port)), 10
            )
        except BaseException:
            sock.close()
            raise
        ws = await connect(
            self.targets.ws_url,
            sock=sock,
            max_queue=1,
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=10,
        )
        try:
            frame: dict[str, Any] = {"type": "synthesize", "id": self.next_id(), "mode": "speak"}
            frame.update(text=LONG_PROSE, speed=0.25, sample_rate_hz=48_000, format="wav")
            frame["stream"] = index % 2 == 0
            await ws.send(json.dumps(frame))
            # The server drops a non-reader by closing its socket; the kernel still owes the
            # client the unsent bytes before the FIN, so the end shows only once they are
            # read: after the hold, drain what is buffered.
            await asyncio.sleep(self.hold_s)
            try:
                async with asyncio.timeout(5.0):
                    async for _ in ws:
                        pass
            except TimeoutError:
                return "held_to_limit"
            except ConnectionClosed as exc:
                return f"dropped:{exc.rcvd.code if exc.rcvd else 'no_close_frame'}"
            return f"closed:{ws.close_code}"
        finally:
            ws.transport.abort()


#: (name, raw text frame) sent by ``malformed_ws``; each deserves an error frame.
WS_PAYLOADS: tuple[tuple[str, str | bytes], ...] = (
    ("bad_json", "{not json"),
    ("not_object", "[1, 2, 3]"),
    ("unknown_type", '{"type": "dance", "id": "m1"}'),
    ("no_text", '{"type": "synthesize", "id": "m2"}'),
    ("text_not_string", '{"type": "synthesize", "id": "m3", "text": 123}'),
    ("surrogate_text", '{"type": "synthesize", "id": "m4", "mode": "speak", "text": "a\\ud800"}'),
    ("surrogate_id", '{"type": "synthesize", "id": "\\udfff", "text": "hi"}'),
    ("surrogate_voice", '{"type": "synthesize", "id": "m5", "text": "hi", "voice": "\\ud83d"}'),
    ("speed_huge", '{"type": "synthesize", "id": "m6", "text": "hi", "speed": 1e309}'),
    ("rate_negative", '{"type": "synthesize", "id": "m7", "text": "hi", "sample_rate_hz": -1}'),
    ("too_long", json.dumps({"type": "synthesize", "id": "m8", "text": "word " * 1000})),
    ("binary", b"\x00\x01\x02"),
)  # fmt: skip
#: past ``VOXRELAY_WS_MAX_MESSAGE_BYTES``: close 1009, sent last.
OVERSIZE = "x" * 70_000


class MalformedWs(Attack):
    """Send each malformed frame, expecting an error frame; then a valid request on the same
    connection; then an over-size frame (close 1009)."""

    name = "malformed_ws"

    async def once(self, index: int, address: str) -> str:
        ws = await ws_connect(self.targets.ws_url, address)
        try:
            for name, payload in WS_PAYLOADS:
                if ws.state is not State.OPEN:
                    await ws.close()
                    ws = await ws_connect(self.targets.ws_url, address)
                await ws.send(payload)
                self.tally[f"{name}:{await self._reply(ws)}"] += 1
                await asyncio.sleep(0.1)
            if ws.state is not State.OPEN:
                return "usable:no, closed"
            frame = {"type": "synthesize", "id": self.next_id(), "mode": "speak", "text": "Fine."}
            await ws.send(json.dumps(frame))
            usable = await _read_ws(ws, 20)
            if ws.state is State.OPEN:
                await ws.send(OVERSIZE)
                self.tally[f"oversize:{await self._reply(ws)}"] += 1
            return f"usable:{usable}"
        finally:
            await ws.close()

    async def _reply(self, ws: ClientConnection) -> str:
        try:
            message = await asyncio.wait_for(ws.recv(), 5)
        except TimeoutError:
            return "no_reply"
        except ConnectionClosed as exc:
            return f"close:{exc.rcvd.code if exc.rcvd else None}"
        if isinstance(message, bytes):
            return "audio?"
        event = json.loads(message)
        return f"{event.get('type')}:{event.get('code', '')}"


def _grpc_payloads() -> tuple[tuple[str, bytes], ...]:
    def req(**fields: Any) -> bytes:
        message: bytes = pb.SynthesizeRequest(**fields).SerializeToString()
        return message

    return (
        ("invalid_utf8", b"\x0a\x03\xff\xfe\xfd"),
        ("garbage", b"\xff\xff\xff\xff\xff"),
        ("oversize", req(text="a" * 70_000)),
        ("mode_99", req(text="hi", mode=99)),
        ("format_99", req(text="hi", mode=pb.MODE_SPEAK, format=99)),
        ("speed_nan", req(text="hi", mode=pb.MODE_SPEAK, speed=math.nan)),
        ("rate_huge", req(text="hi", mode=pb.MODE_SPEAK, sample_rate_hz=4_000_000_000)),
        ("empty", b""),
    )


class MalformedGrpc(Attack):
    """Send undecodable or out-of-range requests as raw bytes; note each status."""

    name = "malformed_grpc"

    async def once(self, index: int, address: str) -> str:
        async with _channel(await self.targets.grpc_from(address)) as channel:
            method: Any = channel.unary_stream(GRPC_METHOD)  # raw bytes both ways
            for name, payload in _grpc_payloads():
                call = method(payload, timeout=20)
                self.tally[f"{name}:{await _read_grpc(call, 20)}"] += 1
                await asyncio.sleep(0.1)
        return "round"


class Cancels(Attack):
    """Ordinary requests abandoned at a random point, on both doors (even workers: gRPC)."""

    name = "cancels"

    async def once(self, index: int, address: str) -> str:
        mode = random.choice(("speak", "chat"))
        text = LONG_PROSE[:600] if mode == "speak" else "Tell me about the trains."
        fmt = random.choice(FORMATS)
        wait_audio = random.random() < 0.5
        delay = random.uniform(0.0, 2.0 if wait_audio else 0.4)
        if index % 2 == 0:
            return await self._grpc(address, mode, text, fmt, wait_audio, delay)
        return await self._ws(address, mode, text, fmt, wait_audio, delay)

    async def _grpc(
        self, address: str, mode: str, text: str, fmt: str, wait_audio: bool, delay: float
    ) -> str:
        async with _channel(await self.targets.grpc_from(address)) as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(
                pb.SynthesizeRequest(
                    text=text,
                    mode=pb.MODE_SPEAK if mode == "speak" else pb.MODE_CHAT,
                    format=GRPC_FORMATS[fmt],
                ),
                timeout=60,
            )
            point = "before_audio"
            if wait_audio:
                with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                    async with asyncio.timeout(30):
                        async for event in call:
                            if event.WhichOneof("event") == "audio":
                                point = "after_audio"
                                break
            await asyncio.sleep(delay)
            call.cancel()
            return f"grpc:cancel:{point}"

    async def _ws(
        self, address: str, mode: str, text: str, fmt: str, wait_audio: bool, delay: float
    ) -> str:
        request_id = self.next_id()
        frame = {"type": "synthesize", "id": request_id, "mode": mode, "text": text, "format": fmt}
        how = random.choice(("cancel_frame", "abort", "close"))
        ws = await ws_connect(self.targets.ws_url, address)
        try:
            await ws.send(json.dumps(frame))
            point = "before_audio"
            if wait_audio:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        async for message in ws:
                            if isinstance(message, bytes):
                                point = "after_audio"
                                break
            await asyncio.sleep(delay)
            if how == "cancel_frame":
                await ws.send(json.dumps({"type": "cancel", "id": request_id}))
                return f"ws:cancel_frame:{point}:{await _read_ws(ws, 10)}"
            if how == "abort":
                ws.transport.abort()
            return f"ws:{how}:{point}"
        finally:
            await ws.close()


class Faults(Attack):
    """Chat requests whose upstream call faults; any outcome is fine but a hang or a crash."""

    name = "faults"

    async def once(self, index: int, address: str) -> str:
        kind = random.choice(list(FAULTS))
        text = f"What happens now? [[fault:{kind}]]"
        if index % 2 == 0:
            async with _channel(await self.targets.grpc_from(address)) as channel:
                call = pb_grpc.SynthesizerStub(channel).Synthesize(
                    pb.SynthesizeRequest(text=text, mode=pb.MODE_CHAT), timeout=90
                )
                return f"grpc:{kind}:{await _read_grpc(call, 90)}"
        frame = {"type": "synthesize", "id": self.next_id(), "mode": "chat", "text": text}
        async with await ws_connect(self.targets.ws_url, address) as ws:
            await ws.send(json.dumps(frame))
            return f"ws:{kind}:{await _read_ws(ws, 90)}"


#: name: (class, workers); every worker stops when the run does.
ATTACKS: dict[str, tuple[type[Attack], int]] = {
    "huge_ws": (HugeWs, 2),
    "huge_grpc": (HugeGrpc, 1),
    "stall_grpc": (StallGrpc, 8),
    "stall_ws": (StallWs, 8),
    "malformed_ws": (MalformedWs, 1),
    "malformed_grpc": (MalformedGrpc, 1),
    "cancels": (Cancels, 4),
    "faults": (Faults, 2),
}


def make_attacks(targets: Targets, *, hold_s: float, scale: float = 1.0) -> list[Attack]:
    """Build every attack, each from its own block of loopback addresses."""
    return [
        cls(targets, workers=max(1, round(workers * scale)), block=10 + i, hold_s=hold_s)
        for i, (cls, workers) in enumerate(ATTACKS.values())
    ]


# The attack as a process of its own

#: the line an attack process prints once every attack runs; then, at its end, ``TALLY`` and
#: the JSON of every attack's outcomes.
ATTACKING = "attacking"
TALLY = "tally "


async def attack_until_terminated(
    grpc_target: str, ws_url: str, hold_s: float, scale: float
) -> None:
    """Run every attack until SIGTERM; then print what each attempt ended in."""
    hops = SourceHops(grpc_target)
    attacks = make_attacks(Targets(grpc_target, ws_url, hops), hold_s=hold_s, scale=scale)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(attack.run(stop)) for attack in attacks]
    print(ATTACKING, flush=True)
    await stop.wait()
    # The loops end between attempts; streams still held are cancelled after a moment.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await hops.aclose()
    print(TALLY + json.dumps({attack.name: dict(attack.tally) for attack in attacks}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak_attacks", description="the soak's attack, until SIGTERM"
    )
    p.add_argument("--grpc", required=True, help="voxrelay's gRPC host:port")
    p.add_argument("--ws", required=True, help="voxrelay's WebSocket URL")
    p.add_argument("--hold", type=float, required=True, help="seconds a stalled stream is held")
    p.add_argument("--scale", type=float, default=1.0, help="workers per attack, scaled")
    args = p.parse_args(argv)
    asyncio.run(attack_until_terminated(args.grpc, args.ws, args.hold, args.scale))


if __name__ == "__main__":
    main()
