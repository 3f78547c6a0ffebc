"""The WebSocket door: ``/v1/stream`` on the websockets asyncio server, plus a little HTTP.

A thin translation, like the gRPC door: JSON text frames in, :mod:`service.model` types
to the core, core events back out as JSON frames and binary audio frames; core errors
become ``error`` frames carrying :attr:`VoxrelayError.code`. What belongs to the
connection rather than to the core lives here: one stream in flight at a time, the
conversation memory, cancel, and the limits of a socket (idle, send stall, frame size).

The handshake is where a caller is let in or not, in this order: draining (503), the
``Origin`` (403), an ``Authorization`` header (401 when wrong), the connection caps
(503). The core decides each of these (:mod:`service.auth`, :mod:`service.limits`);
this door only reads the headers and answers in HTTP. A client without a header
authenticates with a first ``auth`` frame, else the connection closes 1008.
Frames are parsed and built in :mod:`gateways.ws_frames`.

The same port answers ``/healthz``, ``/readyz``, ``/version`` and ``/`` (the demo page)
as plain HTTP through ``process_request``; only ``/v1/stream`` upgrades.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import dataclasses
import hashlib
import http
import json
import logging
import re
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Data

from voxrelay.service import __version__, metrics, model
from voxrelay.service.auth import OriginPolicy, TrustedProxies, bearer_token, client_key
from voxrelay.service.errors import Busy, Internal, Unavailable, VoxrelayError
from voxrelay.service.limits import ConnectionLimits, Lease
from voxrelay.service.pipeline import MAX_HISTORY, Synthesizer
from voxrelay.service.telemetry import StreamRecord

from .errors import WS_CLOSE
from .ws_frames import (
    AudioClock,
    AuthFrame,
    BadFrame,
    CancelFrame,
    ClientFrame,
    ResetFrame,
    SynthesizeFrame,
    error_frame,
    event_frame,
    parse_frame,
)
from .ws_frames import dumps as _dumps

__all__ = [
    "AuthFrame",
    "BadFrame",
    "CancelFrame",
    "ClientFrame",
    "ResetFrame",
    "SynthesizeFrame",
    "WsDoor",
    "error_frame",
    "event_frame",
    "parse_frame",
]

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"
STATIC_DIR = Path(__file__).with_name("static")

# Timeouts
#: The whole opening handshake (TLS included) must be done within this.
HANDSHAKE_TIMEOUT_S = 10.0
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
#: A client without an ``Authorization`` header must send ``auth`` within this.
AUTH_TIMEOUT_S = 5.0
#: How long close_all() lets a stream the core just aborted send its error frame.
FINAL_FRAME_GRACE_S = 2.0

# Limits
#: The core refuses a history longer than this many times max_input_chars.
HISTORY_CHARS_PER_INPUT = 8
#: A small write buffer makes a client that stops reading block our sends quickly,
#: so the send-stall timer measures the client, not our buffering.
WRITE_LIMIT = 64 * 1024

# Connections


class _SendStalled(Exception):
    """The client stopped reading; the connection has been dropped."""


@dataclass(eq=False)
class _Flight:
    """The one stream in flight on a connection."""

    id: str
    clock: AudioClock = dataclasses.field(default_factory=AudioClock)
    task: asyncio.Task[None] | None = None
    #: why it would be cancelled now: a ``cancel`` frame, or the connection ending.
    cancel_reason: str = "client"


def _peer_address(connection: ServerConnection) -> tuple[str, int | None]:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return str(address or "unknown"), None


def _peer(connection: ServerConnection, client_ip: str | None = None) -> str:
    """Name the peer for logs: the client behind a trusted proxy, else the socket's."""
    host, port = _peer_address(connection)
    if client_ip is not None and client_ip != host:
        return client_ip
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class _Admitted:
    """What the handshake learnt about a connection it let in."""

    client_ip: str
    #: the key id of a good ``Authorization`` header; None without one (or when open).
    key_id: str | None


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


class _Session:
    """Serve one WebSocket connection: read frames, run its stream, keep its memory."""

    def __init__(
        self, door: WsDoor, connection: ServerConnection, admitted: _Admitted | None
    ) -> None:
        self.door = door
        self.ws = connection
        self.synthesizer = door.synthesizer
        self.settings = door.synthesizer.settings
        client_ip = admitted.client_ip if admitted is not None else _peer_address(connection)[0]
        self.peer = _peer(connection, client_ip)
        # Whom the per-caller limits count: the API key, else (open service) the address.
        self.caller: str | None = admitted.key_id if admitted is not None else None
        if not self.synthesizer.keys.required:
            self.caller = client_key(client_ip)
        self.flight: _Flight | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # Completed turns (user text, assistant reply); a reset bumps the epoch so a
        # stream in flight at the time is not remembered either.
        self.memory: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=self.settings.memory_turns
        )
        self.memory_epoch = 0
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
                except (ConnectionClosed, _SendStalled):
                    raise
                except Exception:
                    log.exception("internal error handling a frame", extra={"peer": self.peer})
                    error = Internal("internal error: the frame was not handled")
                    metrics.ERRORS.labels("ws", error.code).inc()
                    await self._send_json(error_frame(None, error))
        except (ConnectionClosed, _SendStalled):
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
        keys = self.synthesizer.keys
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
                StreamRecord(
                    "ws",
                    self.peer,
                    model.SynthesisRequest(text="", request_id=exc.request_id or ""),
                ).end(exc.code, error=exc)
            else:
                metrics.ERRORS.labels("ws", exc.code).inc()
            await self._send_json(error_frame(exc.request_id, exc))
            return
        match frame:
            case SynthesizeFrame():
                await self._start(frame)
            case CancelFrame():
                await self._cancel(frame.id)
            case ResetFrame():
                self.memory.clear()
                self.memory_epoch += 1
            case AuthFrame():
                pass  # admitted already (or the service is open): nothing to do

    # Streams

    async def _start(self, frame: SynthesizeFrame) -> None:
        request_id = frame.id or _new_id()
        request = frame.request
        history = self._history() if request.mode is model.Mode.CHAT else ()
        request = dataclasses.replace(request, request_id=request_id, history=history)
        error: VoxrelayError | None = None
        if self.door.draining:
            error = Unavailable(
                "voxrelay is shutting down: retry on another replica", retry_after_s=1.0
            )
        elif self.flight is not None:
            error = Busy(
                f"stream {self.flight.id!r} is still in flight on this connection:"
                " wait for its finished frame or cancel it"
            )
        if error is not None:
            StreamRecord("ws", self.peer, request).end(error.code, error=error)
            await self._send_json(error_frame(request_id, error))
            return
        flight = _Flight(request_id)
        self.flight = flight
        # Recorded from here: a cancel may stop the task before it ever runs, and the
        # stream must still end with one log line and one count. The record names its
        # stream in the task's own context, not in this reader's.
        context = contextvars.copy_context()
        record = context.run(
            StreamRecord, "ws", self.peer, request, log_text=self.settings.log_text
        )
        task = asyncio.create_task(
            self._run(flight, record, request, frame.stream),
            name=f"ws-stream-{request_id}",
            context=context,
        )
        flight.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        # Runs before whoever awaits the task (a cancel) goes on; a no-op if _run ended it.
        task.add_done_callback(lambda _: record.end("cancelled", audio_ms=flight.clock.audio_ms))

    def _history(self) -> tuple[model.ChatMessage, ...]:
        """Return the remembered turns, newest first kept, within what the core accepts."""
        budget = self.settings.max_input_chars * HISTORY_CHARS_PER_INPUT
        turns: list[tuple[str, str]] = []
        for user, reply in reversed(self.memory):
            cost = len(user) + len(reply)
            if len(turns) >= MAX_HISTORY // 2 or cost > budget:
                break
            budget -= cost
            turns.append((user, reply))
        return tuple(
            message
            for user, reply in reversed(turns)
            for message in (model.ChatMessage("user", user), model.ChatMessage("assistant", reply))
        )

    async def _cancel(self, request_id: str | None) -> None:
        flight = self.flight
        if flight is None or flight.task is None:
            return
        if request_id is not None and request_id != flight.id:
            return  # idempotent: only the stream in flight can be cancelled
        self._release(flight)
        flight.task.cancel()
        await asyncio.wait([flight.task])
        await self._send_json(
            {"type": "cancelled", "id": flight.id, "audio_ms": flight.clock.audio_ms}
        )

    def _release(self, flight: _Flight) -> None:
        """Free the connection's stream slot; from now on a cancel does not apply."""
        if self.flight is flight:
            self.flight = None
            idle = self.settings.idle_timeout_s
            if idle and self._idle_timer is not None:
                self._idle_timer.reschedule(asyncio.get_running_loop().time() + idle)

    async def _run(
        self,
        flight: _Flight,
        record: StreamRecord,
        request: model.SynthesisRequest,
        streaming: bool,
    ) -> None:
        """Relay one stream's events; the terminal frame goes out after the core stopped."""
        epoch = self.memory_epoch
        clock = flight.clock
        buffered: list[bytes] | None = None if streaming else []
        finished: model.StreamFinished | None = None
        error: VoxrelayError | None = None
        stream = self.synthesizer.stream(request, caller=self.caller)
        try:
            async with stream as events:
                async for event in events:
                    if isinstance(event, model.AudioChunk):
                        if buffered is not None:
                            buffered.append(event.data)
                        else:
                            await self._send(event.data)
                            clock.audio(len(event.data))
                            record.audio(len(event.data))
                    elif isinstance(event, model.StreamFinished):
                        finished = event
                    else:
                        if isinstance(event, model.StreamStarted):
                            record.started_stream(event.request_id, event.voice, event.format)
                            clock.started(event)
                        else:
                            clock.segment(event)
                        await self._send_json(event_frame(flight.id, event))
        except VoxrelayError as exc:
            error = exc
        except (ConnectionClosed, _SendStalled):
            # The client went away: nothing more can reach it.
            self._release(flight)
            record.end("cancelled", stream.figures, audio_ms=clock.audio_ms, reason="disconnect")
            return
        except asyncio.CancelledError:
            reason = flight.cancel_reason
            record.end("cancelled", stream.figures, audio_ms=clock.audio_ms, reason=reason)
            raise
        except Exception:
            log.exception("internal error in WebSocket stream %s", flight.id)
            error = Internal(f"internal error (request {flight.id})")
        if error is None and finished is None:
            error = Internal(f"stream {flight.id} ended without finishing")

        # No await until the slot is released: a cancel now would follow our last frame.
        self._release(flight)
        last: list[str | bytes] = []
        if error is not None:
            record.end(error.code, stream.figures, error=error)
            last.append(_dumps(error_frame(flight.id, error)))
        else:
            assert finished is not None
            if request.mode is model.Mode.CHAT and epoch == self.memory_epoch:
                self.memory.append((request.text, finished.reply_text))
            if buffered:
                audio = b"".join(buffered)
                record.audio(len(audio))
                last.append(audio)
            record.end("ok", finished)
            last.append(_dumps(event_frame(flight.id, finished)))
        try:
            for message in last:
                await self._send(message)
        except (ConnectionClosed, _SendStalled):
            pass  # the reader sees the closed connection and cleans up

    async def _stop_tasks(self) -> None:
        """Cancel this connection's stream and wait until its upstream calls are closed."""
        if self.flight is not None:
            self.flight.cancel_reason = "disconnect"
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

    async def _send(self, message: str | bytes) -> None:
        """Send a frame; drop the connection if the client has stopped reading."""
        stall = self.settings.send_stall_s
        if not stall:
            await self.ws.send(message)
            return
        try:
            async with asyncio.timeout(stall):
                await self.ws.send(message)
        except TimeoutError:
            # A close frame cannot reach a client that does not read, and close()
            # would wait close_timeout more: abort the TCP connection instead.
            log.warning(
                "dropping a client that stopped reading",
                extra={"event": "ws_send_stall", "peer": self.peer, "send_stall_s": stall},
            )
            self.ws.transport.abort()
            raise _SendStalled from None

    async def _send_json(self, frame: Mapping[str, Any]) -> None:
        await self._send(_dumps(frame))


# The door


class WsDoor:
    """The websockets server: ``/v1/stream`` plus health, readiness, version and demo."""

    def __init__(self, synthesizer: Synthesizer) -> None:
        self.synthesizer = synthesizer
        self.settings = synthesizer.settings
        self.port = 0
        self.draining = False
        self.origins = OriginPolicy.from_settings(self.settings)
        self.proxies = TrustedProxies.from_settings(self.settings)
        self.connections = ConnectionLimits.from_settings(self.settings)
        self._server: Server | None = None
        self._sessions: set[_Session] = set()
        self._admitted: dict[ServerConnection, _Admitted] = {}

    async def start(self) -> None:
        """Bind ``host:ws_port`` and start serving."""
        s = self.settings
        context: ssl.SSLContext | None = None
        if s.tls_cert and s.tls_key:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(s.tls_cert, s.tls_key)
        self._server = await serve(
            self._handle,
            s.host,
            s.ws_port,
            process_request=self._process_request,
            compression=None,  # audio does not compress; deflate costs memory
            server_header=f"voxrelay/{__version__}",
            # Timeouts
            open_timeout=HANDSHAKE_TIMEOUT_S,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
            # Limits
            max_size=s.ws_max_message_bytes or None,
            write_limit=WRITE_LIMIT,
            ssl=context,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def begin_drain(self) -> None:
        """Turn readiness 503 and refuse new connections and new streams at once."""
        self.draining = True

    async def close_all(self) -> None:
        """Close every connection with 1001, once streams the core aborted have said so."""
        sessions = list(self._sessions)

        async def close(session: _Session) -> None:
            await session.wait_streams(FINAL_FRAME_GRACE_S)
            await session.ws.close(WS_CLOSE["going_away"], "server shutting down")

        if sessions:
            await asyncio.gather(*(close(s) for s in sessions))

    async def stop(self) -> None:
        """Close the server and wait until every connection handler has returned."""
        if self._server is None:
            return
        self._server.close(close_connections=True)
        await self._server.wait_closed()

    # The handshake of /v1/stream

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Let a handshake through (None) or answer it with the HTTP refusal."""
        headers = request.headers
        if self.draining:
            return _respond(
                connection,
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "voxrelay is shutting down: retry on another replica\n",
                headers={"Retry-After": "1"},
            )
        peer_ip = _peer_address(connection)[0]
        client_ip = self.proxies.client_ip(peer_ip, headers.get_all("X-Forwarded-For"))
        origins = headers.get_all("Origin")
        hosts = headers.get_all("Host")
        # Behind a TLS-terminating proxy the page was https even though we are not.
        secure = self.settings.tls_cert is not None or (
            self.proxies.trusts(peer_ip) and headers.get_all("X-Forwarded-Proto")[-1:] == ["https"]
        )
        if len(origins) > 1 or not self.origins.allows(
            origins[0] if origins else None,
            host=hosts[0] if len(hosts) == 1 else None,
            secure=secure,
        ):
            return self._refuse(
                connection, http.HTTPStatus.FORBIDDEN, "forbidden", client_ip,
                "this page's origin may not open a voxrelay WebSocket\n",
            )  # fmt: skip
        key_id: str | None = None
        authorization = headers.get_all("Authorization")
        keys = self.synthesizer.keys
        if keys.required and authorization:
            token = bearer_token(authorization[0]) if len(authorization) == 1 else None
            key_id = keys.verify(token)
            if key_id is None:
                return self._refuse(
                    connection, http.HTTPStatus.UNAUTHORIZED, "unauthorized", client_ip,
                    "invalid API key: send 'Authorization: Bearer KEY'\n",
                    headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
        try:
            lease = self.connections.acquire(client_key(client_ip))
        except Busy as exc:
            return self._refuse(
                connection, http.HTTPStatus.SERVICE_UNAVAILABLE, exc.code, client_ip,
                exc.message + "\n",
                headers={"Retry-After": str(max(1, round(exc.retry_after_s or 1)))},
            )  # fmt: skip
        self._admitted[connection] = _Admitted(client_ip, key_id)
        # The slot is held until the TCP connection is gone, whether or not the
        # handshake completes and the handler runs.
        connection.connection_lost_waiter.add_done_callback(
            lambda _: self._forget(connection, lease)
        )
        return None

    def _forget(self, connection: ServerConnection, lease: Lease) -> None:
        lease.release()
        self._admitted.pop(connection, None)

    def _refuse(
        self,
        connection: ServerConnection,
        status: http.HTTPStatus,
        code: str,
        client_ip: str,
        body: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        metrics.ERRORS.labels("ws", code).inc()
        log.info(
            "refused a WebSocket handshake",
            extra={
                "event": "ws_refused",
                "peer": _peer(connection, client_ip),
                "status": int(status),
                "code": code,
            },
        )
        return _respond(connection, status, body, headers=headers)

    # Connections

    async def _handle(self, connection: ServerConnection) -> None:
        session = _Session(self, connection, self._admitted.get(connection))
        self._sessions.add(session)
        metrics.WS_CONNECTIONS.inc()
        try:
            await session.run()
        finally:
            metrics.WS_CONNECTIONS.dec()
            self._sessions.discard(session)

    # Plain HTTP

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == STREAM_PATH:
            return self._admit(connection, request)
        if path == "/healthz":
            return _respond(connection, http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.draining:
                return _respond(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return _respond(connection, http.HTTPStatus.OK, "ready\n")
        if path == "/version":
            return _respond(
                connection,
                http.HTTPStatus.OK,
                json.dumps({"version": __version__}) + "\n",
                content_type="application/json",
            )
        if path in ("/", "/index.html"):
            try:
                page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
            except OSError:
                return _respond(
                    connection,
                    http.HTTPStatus.NOT_FOUND,
                    "the demo page is not installed (gateways/static/index.html)\n",
                )
            return _respond(
                connection,
                http.HTTPStatus.OK,
                page,
                content_type="text/html; charset=utf-8",
                headers={"Cache-Control": "no-cache", "Content-Security-Policy": page_policy(page)},
            )
        return _respond(
            connection,
            http.HTTPStatus.NOT_FOUND,
            f"not found: the WebSocket endpoint is {STREAM_PATH}\n",
        )


_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def page_policy(page: str) -> str:
    """Return the ``Content-Security-Policy`` of the demo *page*.

    Only the page's own inline script and style run (by their SHA-256), it talks to
    nothing but its own origin (``'self'`` covers ws: and wss: there), plays its
    MediaSource audio (``blob:``), and no other site may frame it (clickjacking a key
    field and a Speak button).
    """
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    script, style = (" ".join(hashes[kind]) or "'none'" for kind in ("script", "style"))
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {script}",
            f"style-src {style}",
            "connect-src 'self'",
            "media-src blob:",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def _respond(
    connection: ServerConnection,
    status: http.HTTPStatus,
    body: str,
    *,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    response = connection.respond(status, body)
    response_headers: Headers = response.headers
    if content_type is not None:
        del response_headers["Content-Type"]
        response_headers["Content-Type"] = content_type
    response_headers["X-Content-Type-Options"] = "nosniff"
    for name, value in (headers or {}).items():
        response_headers[name] = value
    return response
