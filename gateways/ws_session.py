"""One WebSocket connection of ``/v1/stream``: its frames, its one stream, its memory.

What belongs to the connection rather than to the core lives here: one stream in flight
at a time, the conversation memory, cancel, and the limits of a socket (idle, send stall).
A stream's events reach the client through a sink; the stream runs in the core's
:class:`~voxrelay.service.relay.Relay`, like every door's. Frames are parsed and built in
:mod:`.ws_frames`.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.typing import Data

from voxrelay.service import metrics, model
from voxrelay.service.auth import KeyStore, client_key
from voxrelay.service.conversation import Conversation
from voxrelay.service.errors import Busy, Internal, InvalidRequest, Unauthorized, VoxrelayError
from voxrelay.service.relay import ClientGone, Relay, RelayedStream
from voxrelay.service.settings import Settings
from voxrelay.service.text_input import TextInput

from .errors import WS_CLOSE
from .ws_frames import (
    AppendFrame,
    AuthFrame,
    BadFrame,
    CancelFrame,
    EndFrame,
    FlushFrame,
    InputFrame,
    ResetFrame,
    SynthesizeFrame,
    error_frame,
    event_frame,
    parse_frame,
)
from .ws_frames import dumps as _dumps

__all__ = ["Admitted", "Session", "peer_address", "peer_name"]

log = logging.getLogger(__name__)

#: A client without an ``Authorization`` header must send ``auth`` within this.
AUTH_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Flight:
    """The one stream in flight on a connection."""

    id: str
    run: RelayedStream
    task: asyncio.Task[None] | None = None
    #: where its ``append``, ``flush`` and ``end`` go, for a streamed input.
    input: TextInput | None = None


def peer_address(connection: ServerConnection) -> tuple[str, int | None]:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return str(address or "unknown"), None


def peer_name(connection: ServerConnection, client_ip: str | None = None) -> str:
    """Name the peer for logs: the client behind a trusted proxy, else the socket's."""
    host, port = peer_address(connection)
    if client_ip is not None and client_ip != host:
        return client_ip
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the handshake learnt about a connection it let in."""

    client_ip: str
    #: the key id of a good ``Authorization`` header; None without one (or when open).
    key_id: str | None


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


class Session:
    """Serve one WebSocket connection: read frames, run its stream, keep its memory."""

    def __init__(
        self,
        connection: ServerConnection,
        admitted: Admitted | None,
        *,
        settings: Settings,
        relay: Relay,
        keys: KeyStore,
    ) -> None:
        self.ws = connection
        self.settings = settings
        self.relay = relay
        self.keys = keys
        client_ip = admitted.client_ip if admitted is not None else peer_address(connection)[0]
        self.peer = peer_name(connection, client_ip)
        # Whom the per-caller limits count: the API key, else (open service) the address.
        self.caller: str | None = admitted.key_id if admitted is not None else None
        if not self.keys.required:
            self.caller = client_key(client_ip)
        self.flight: _Flight | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.conversation = Conversation(
            max_turns=self.settings.memory_turns,
            history_chars=relay.synthesizer.planner.history_budget,
        )
        self._idle_timer: asyncio.Timeout | None = None

    # Reading

    async def run(self) -> None:
        """Serve frames until the connection closes, then stop the stream in flight."""
        try:
            if not await self._authenticate():
                return
            while True:
                try:
                    message = await self._recv()
                except TimeoutError:
                    log.info(
                        "closing idle connection",
                        extra={
                            "event": "ws_idle",
                            "peer": self.peer,
                            "idle_timeout_s": self.settings.idle_timeout_s,
                        },
                    )
                    await self.ws.close(1000, "idle")  # a normal closure, not a failure
                    return
                try:
                    await self._dispatch(message)
                except (ConnectionClosed, ClientGone):
                    raise
                except Exception:
                    log.exception("internal error handling a frame", extra={"peer": self.peer})
                    error = Internal("internal error: the frame was not handled")
                    metrics.ERRORS.labels("ws", error.code).inc()
                    await self._send_json(error_frame(None, error))
        except (ConnectionClosed, ClientGone):
            pass
        finally:
            await self._stop_tasks()

    async def _recv(self) -> Data:
        """Receive a frame; time out when idle (a stream in flight is not idle)."""
        idle = self.settings.idle_timeout_s
        if not idle:
            return await self.ws.recv()
        loop = asyncio.get_running_loop()
        deadline = None if self.flight is not None else loop.time() + idle
        # Cancelling recv() is safe in websockets: no message is lost.
        async with asyncio.timeout_at(deadline) as timer:
            self._idle_timer = timer
            try:
                return await self.ws.recv()
            finally:
                self._idle_timer = None

    async def _authenticate(self) -> bool:
        """Admit the connection: open service, a good header, or a first ``auth`` frame.

        A wrong header was already refused with 401 at the handshake; a client without
        one must send ``auth`` within :data:`AUTH_TIMEOUT_S`, else the close is 1008.
        """
        keys = self.keys
        if not keys.required or self.caller is not None:
            return True
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                message = await self.ws.recv()
        except TimeoutError:
            return await self._refuse("authentication required")
        try:
            frame = parse_frame(message)
        except BadFrame:
            frame = None
        if not isinstance(frame, AuthFrame):
            return await self._refuse("authentication required")
        self.caller = keys.verify(frame.token)
        if self.caller is None:
            return await self._refuse("authentication failed")
        return True

    async def _refuse(self, reason: str) -> bool:
        metrics.ERRORS.labels("ws", "unauthorized").inc()
        log.info(
            "refused a connection without a valid API key",
            extra={"event": "ws_unauthorized", "peer": self.peer, "reason": reason},
        )
        await self.ws.close(WS_CLOSE["policy"], reason)
        return False

    async def _dispatch(self, message: Data) -> None:
        try:
            frame = parse_frame(message)
        except BadFrame as exc:
            if exc.is_request:
                self.relay.refuse("ws", self.peer, exc, request_id=exc.request_id or "")
            else:
                metrics.ERRORS.labels("ws", exc.code).inc()
            await self._send_json(error_frame(exc.request_id, exc))
            return
        match frame:
            case SynthesizeFrame() if self._revoked():
                error = Unauthorized("the API key of this connection is no longer valid")
                request_id = frame.id or None
                self.relay.refuse("ws", self.peer, error, request_id=request_id or "")
                await self._send_json(error_frame(request_id, error))
                await self.ws.close(WS_CLOSE["policy"], "API key revoked")
            case SynthesizeFrame():
                await self._start(frame)
            case CancelFrame():
                await self._cancel(frame.id, frame.played_ms)
            case AppendFrame() | FlushFrame() | EndFrame():
                await self._input(frame)
            case ResetFrame():
                self.conversation.reset()
            case AuthFrame():
                pass  # admitted already (or the service is open): nothing to do

    def _revoked(self) -> bool:
        """Whether the key this connection came in with is no longer in force (SIGHUP)."""
        if not self.keys.required:
            return False
        return self.caller is None or not self.keys.holds(self.caller)

    # Streams

    async def _start(self, frame: SynthesizeFrame) -> None:
        request_id = frame.id or _new_id()
        request = frame.request
        chat = request.mode is model.Mode.CHAT
        history = self.conversation.history() if chat else ()
        request = dataclasses.replace(request, request_id=request_id, history=history)
        text_input: TextInput | None = None
        if frame.streamed_input:
            text_input = self.relay.text_input()
            request = dataclasses.replace(request, text="", input=text_input)
        try:
            self.relay.check_open()  # a draining process refuses first
            if self.flight is not None:
                raise Busy(
                    f"stream {self.flight.id!r} is still in flight on this connection:"
                    " wait for its finished frame or cancel it"
                )
        except VoxrelayError as error:
            self.relay.refuse("ws", self.peer, error, request=request)
            await self._send_json(error_frame(request_id, error))
            return
        # Recorded from here: a cancel may stop the task before it ever runs, and the
        # stream must still end with one log line and one count. The record names its
        # stream in the task's own context, not in this reader's.
        context = contextvars.copy_context()
        run = context.run(self.relay.open, "ws", self.peer, request, caller=self.caller)
        flight = _Flight(request_id, run, input=text_input)
        self.flight = flight
        if text_input is not None:
            text_input.append(frame.request.text)  # an optional first piece
        task = asyncio.create_task(
            self._run(flight, frame.stream), name=f"ws-stream-{request_id}", context=context
        )
        flight.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        # Runs before whoever awaits the task (a cancel) goes on; a no-op if it ended.
        task.add_done_callback(lambda _: run.end_cancelled(run.cancel_reason or "client"))

    async def _cancel(self, request_id: str | None, played_ms: int | None) -> None:
        flight = self.flight
        if flight is None or flight.task is None:
            return
        if request_id is not None and request_id != flight.id:
            return  # idempotent: only the stream in flight can be cancelled
        epoch = self.conversation.epoch
        self._release(flight)
        flight.task.cancel()
        await asyncio.wait([flight.task])
        cancelled: dict[str, Any] = {
            "type": "cancelled",
            "id": flight.id,
            "audio_ms": flight.run.audio_ms,
        }
        if played_ms is not None:
            heard = cancelled["heard_text"] = flight.run.heard_text(played_ms)
            request = flight.run.request
            if request.mode is model.Mode.CHAT:
                # The next turn's LLM call learns where its last reply was interrupted.
                self.conversation.remember(request.text, heard, epoch=epoch)
        await self._send_json(cancelled)

    async def _input(self, frame: InputFrame) -> None:
        """Hand an ``append``, ``flush`` or ``end`` to the streamed input it names."""
        flight = self.flight
        text_input = None
        if flight is not None and frame.id in (None, flight.id):
            text_input = flight.input
        if text_input is None or text_input.closed:
            kind = type(frame).__name__.removesuffix("Frame").lower()
            named = f"{frame.id!r}" if frame.id is not None else "this connection"
            error = InvalidRequest(
                f"{kind}: no streamed input of {named} is taking text (send synthesize with"
                ' "input":"stream" first; after end, start a new one)'
            )
            metrics.ERRORS.labels("ws", error.code).inc()
            await self._send_json(error_frame(frame.id, error))
            return
        match frame:
            case AppendFrame():
                text_input.append(frame.text)
            case FlushFrame():
                text_input.flush()
            case EndFrame():
                text_input.end()

    def _release(self, flight: _Flight) -> None:
        """Free the connection's stream slot; from now on a cancel does not apply."""
        if self.flight is flight:
            self.flight = None
            idle = self.settings.idle_timeout_s
            if idle and self._idle_timer is not None:
                self._idle_timer.reschedule(asyncio.get_running_loop().time() + idle)

    async def _run(self, flight: _Flight, streaming: bool) -> None:
        """Relay one stream's events; the terminal frame goes out after the core stopped."""
        epoch = self.conversation.epoch
        request = flight.run.request
        sink = _Sink(self, flight.id, streaming)
        last: list[str | bytes | list[bytes]] = []
        try:
            finished = await flight.run.relay(sink)
        except VoxrelayError as exc:
            last.append(_dumps(error_frame(flight.id, exc)))
        except ClientGone:
            self._release(flight)  # nothing more can reach the client
            return
        else:
            if request.mode is model.Mode.CHAT:
                self.conversation.remember(request.text, finished.reply_text, epoch=epoch)
            if sink.held:
                last.append(sink.held)
            last.append(_dumps(event_frame(flight.id, finished)))
        # No await until the slot is released: a cancel now would follow our last frame.
        self._release(flight)
        try:
            for message in last:
                await self._send(message)
        except (ConnectionClosed, ClientGone):
            pass  # the reader sees the closed connection and cleans up

    async def _stop_tasks(self) -> None:
        """Cancel this connection's stream and wait until its upstream calls are closed."""
        if self.flight is not None:
            self.flight.run.cancel_reason = "disconnect"
        self.flight = None
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def wait_streams(self, grace_s: float) -> None:
        """Wait up to *grace_s* seconds for the stream in flight to send its last frame."""
        tasks = list(self.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)

    # Writing

    async def _send(self, message: str | bytes | list[bytes]) -> None:
        """Send a frame, or a list of parts as one message in fragments.

        A client that stops reading for ``send_stall_s`` is dropped; the timer measures
        progress (each fragment restarts it), not how long a large message takes.
        """
        stall = self.settings.send_stall_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(stall or None) as timer:
                if isinstance(message, list):
                    await self.ws.send(_fragments(message, timer, stall, loop))
                else:
                    await self.ws.send(message)
        except TimeoutError:
            # A close frame cannot reach a client that does not read, and close()
            # would wait close_timeout more: abort the TCP connection instead.
            log.warning(
                "dropping a client that stopped reading",
                extra={"event": "ws_send_stall", "peer": self.peer, "send_stall_s": stall},
            )
            self.ws.transport.abort()
            raise ClientGone from None

    async def _send_json(self, frame: Mapping[str, Any]) -> None:
        await self._send(_dumps(frame))


class _Sink:
    """Put a stream's events on its connection: JSON frames, and audio as binary frames.

    With ``"stream":false`` the audio is held and sent after the last segment, whole.
    """

    def __init__(self, session: Session, request_id: str, streaming: bool) -> None:
        self._session = session
        self._id = request_id
        self.held: list[bytes] | None = None if streaming else []

    async def send(
        self,
        event: model.StreamStarted | model.SegmentStarted | model.AudioChunk | model.WordTimings,
    ) -> None:
        try:
            if not isinstance(event, model.AudioChunk):
                await self._session._send_json(event_frame(self._id, event))
            elif self.held is not None:
                self.held.append(event.data)
            else:
                await self._session._send(event.data)
        except ConnectionClosed:
            raise ClientGone from None


#: A ``"stream":false`` reply goes out in fragments of about this size.
FRAGMENT_BYTES = 64 * 1024


async def _fragments(
    parts: list[bytes], timer: asyncio.Timeout, stall: float, loop: asyncio.AbstractEventLoop
) -> AsyncIterator[bytes]:
    """Yield *parts* as fragments of about :data:`FRAGMENT_BYTES`, restarting *timer* each.

    Small parts are joined into one fragment; a large part goes out as it is, uncopied.
    """
    batch: list[bytes] = []
    size = 0
    for part in parts:
        batch.append(part)
        size += len(part)
        if size >= FRAGMENT_BYTES:
            yield batch[0] if len(batch) == 1 else b"".join(batch)
            batch, size = [], 0
            if stall:
                timer.reschedule(loop.time() + stall)
    if batch:
        yield batch[0] if len(batch) == 1 else b"".join(batch)
