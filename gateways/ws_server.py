"""The WebSocket door: ``/v1/stream`` on the websockets asyncio server, plus a little HTTP.

A thin translation, like the gRPC door: JSON text frames in, :mod:`service.model` types
to the core, core events back out as JSON frames and binary audio frames; core errors
become ``error`` frames carrying :attr:`VoxrelayError.code`. What belongs to the
connection rather than to the core lives here: one stream in flight at a time, the
conversation memory, cancel, and the limits of a socket (idle, send stall, frame size).

The same port answers ``/healthz``, ``/readyz``, ``/version`` and ``/`` (the demo page)
as plain HTTP through ``process_request``; only ``/v1/stream`` upgrades.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import http
import json
import logging
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

from service import __version__, metrics, model
from service.errors import Busy, Internal, InvalidRequest, Unavailable, VoxrelayError
from service.pipeline import MAX_HISTORY, Synthesizer
from service.telemetry import StreamRecord

from .errors import WS_CLOSE

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
MAX_ID_CHARS = 128
MAX_SAMPLE_RATE_HZ = 384_000

# Timeouts
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
AUTH_TIMEOUT_S = 5.0
#: How long close_all() lets a stream the core just aborted send its error frame.
FINAL_FRAME_GRACE_S = 2.0

# Limits
#: The core refuses a history longer than this many times max_input_chars.
HISTORY_CHARS_PER_INPUT = 8
#: A small write buffer makes a client that stops reading block our sends quickly,
#: so the send-stall timer measures the client, not our buffering.
WRITE_LIMIT = 64 * 1024

_MODES = {m.value: m for m in model.Mode}
_FORMATS = {f.value: f for f in model.AudioFormat}
#: Bytes per sample of the formats whose size says their duration.
_SAMPLE_WIDTH = {
    model.AudioFormat.PCM: 2,
    model.AudioFormat.WAV: 2,
    model.AudioFormat.MULAW: 1,
    model.AudioFormat.ALAW: 1,
}


# Client frames


@dataclass(frozen=True, slots=True)
class SynthesizeFrame:
    """``synthesize``: a request; ``id`` is empty when the client sent none."""

    id: str
    request: model.SynthesisRequest
    stream: bool = True


@dataclass(frozen=True, slots=True)
class CancelFrame:
    """``cancel``: stop the stream in flight (``id`` ``None`` means whichever it is)."""

    id: str | None = None


@dataclass(frozen=True, slots=True)
class ResetFrame:
    """``reset``: forget this connection's conversation."""


@dataclass(frozen=True, slots=True)
class AuthFrame:
    """``auth``: an API key, for browsers that cannot set headers."""

    token: str


ClientFrame = SynthesizeFrame | CancelFrame | ResetFrame | AuthFrame


class BadFrame(InvalidRequest):
    """A client frame that cannot be served as written.

    ``request_id`` is the frame's id when it could be read; ``is_request`` says the
    frame was a ``synthesize`` (so it counts as a refused request).
    """

    def __init__(
        self, message: str, request_id: str | None = None, *, is_request: bool = False
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.is_request = is_request


def parse_frame(message: Data) -> ClientFrame:
    """Decode one client frame, or raise :class:`BadFrame` saying what is wrong."""
    if not isinstance(message, str):
        raise BadFrame("binary frames are not accepted: send JSON text frames")
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):
        raise BadFrame("frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadFrame('frame must be a JSON object with a "type"')
    frame_id = data.get("id")
    if frame_id is not None and (not isinstance(frame_id, str) or len(frame_id) > MAX_ID_CHARS):
        raise BadFrame(f"id must be a string of at most {MAX_ID_CHARS} characters")
    request_id = frame_id or None
    kind = data.get("type")
    if kind == "synthesize":
        return _synthesize_frame(data, request_id or "")
    if kind == "cancel":
        return CancelFrame(request_id)
    if kind == "reset":
        return ResetFrame()
    if kind == "auth":
        token = data.get("token")
        if not isinstance(token, str):
            raise BadFrame('auth needs a "token" string', request_id)
        return AuthFrame(token)
    shown = json.dumps(kind)[:40]
    raise BadFrame(f"unknown frame type {shown}: use synthesize, cancel, reset or auth", request_id)


def _synthesize_frame(data: Mapping[str, Any], request_id: str) -> SynthesizeFrame:
    def bad(message: str) -> BadFrame:
        return BadFrame(message, request_id or None, is_request=True)

    def optional(name: str, kinds: tuple[type, ...], what: str) -> Any:
        value = data.get(name)
        if value is None:
            return None
        # bool is an int in Python, but true is not a number on the wire.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise bad(f"{name} must be {what}")
        return value

    text = data.get("text")
    if not isinstance(text, str):
        raise bad('synthesize needs "text": the words to answer or speak')
    mode_name = optional("mode", (str,), '"chat" or "speak"')
    mode = _MODES.get(mode_name.lower()) if mode_name is not None else model.Mode.CHAT
    if mode is None:
        raise bad('mode must be "chat" or "speak"')
    format_name = optional("format", (str,), "a format name")
    fmt = _FORMATS.get(format_name.lower()) if format_name is not None else None
    if format_name is not None and fmt is None:
        raise bad(f"format must be one of {', '.join(_FORMATS)}")
    rate = optional("sample_rate_hz", (int,), "a whole number of Hz") or 0
    if not 0 <= rate <= MAX_SAMPLE_RATE_HZ:
        raise bad("sample_rate_hz must be 0 (the default) or a rate in Hz")
    speed = optional("speed", (int, float), "a number (1.0 is normal speed)") or 0.0
    stream = optional("stream", (bool,), "true or false")
    return SynthesizeFrame(
        id=request_id,
        request=model.SynthesisRequest(
            text=text,
            mode=mode,
            voice=optional("voice", (str,), "a string") or "",
            format=fmt,
            sample_rate_hz=rate,
            instructions=optional("instructions", (str,), "a string") or "",
            speed=float(speed),
            request_id=request_id,
        ),
        stream=True if stream is None else stream,
    )


# Server frames


def event_frame(
    request_id: str, event: model.StreamStarted | model.SegmentStarted | model.StreamFinished
) -> dict[str, Any]:
    """Translate one core event (not audio) into its JSON frame."""
    match event:
        case model.StreamStarted():
            return {
                "type": "started",
                "id": request_id,
                "format": event.format.value,
                "content_type": event.content_type,
                "sample_rate_hz": event.sample_rate_hz,
                "channels": event.channels,
                "voice": event.voice,
                "llm_model": event.llm_model,
                "tts_model": event.tts_model,
            }
        case model.SegmentStarted():
            return {
                "type": "segment",
                "id": request_id,
                "index": event.index,
                "text": event.text,
                "start_ms": event.start_ms,
            }
        case model.StreamFinished():
            figures = {
                f.name: getattr(event, f.name)
                for f in dataclasses.fields(event)
                if f.name != "extra"
            }
            return {"type": "finished", "id": request_id, **figures}
    raise TypeError(f"unknown event {event!r}")


def error_frame(request_id: str | None, error: VoxrelayError) -> dict[str, Any]:
    """Build the ``error`` frame for *error*."""
    return {
        "type": "error",
        "id": request_id,
        "code": error.code,
        "message": error.message,
        "retryable": error.retryable,
        "retry_after_ms": error.retry_after_ms,
    }


def _dumps(frame: Mapping[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


# Connections


class _SendStalled(Exception):
    """The client stopped reading; the connection has been dropped."""


class _AudioClock:
    """Estimate how much audio a client has been sent, for ``cancelled``.

    Formats with a fixed sample size are counted exactly; for compressed ones the
    current segment's ``start_ms`` is exact and its bytes so far are scaled by the
    bytes-per-millisecond of the segments before it.
    """

    def __init__(self) -> None:
        self.format: model.AudioFormat | None = None
        self.rate = 0
        self.segment_start_ms = 0
        self.segment_bytes = 0
        self.earlier_bytes = 0

    def started(self, event: model.StreamStarted) -> None:
        self.format, self.rate = event.format, event.sample_rate_hz

    def segment(self, event: model.SegmentStarted) -> None:
        self.earlier_bytes += self.segment_bytes
        self.segment_bytes = 0
        self.segment_start_ms = event.start_ms

    def audio(self, nbytes: int) -> None:
        self.segment_bytes += nbytes

    @property
    def audio_ms(self) -> int:
        sent = self.earlier_bytes + self.segment_bytes
        if not sent:
            return 0
        width = _SAMPLE_WIDTH.get(self.format) if self.format is not None else None
        if width and self.rate:
            return sent // width * 1000 // self.rate
        if self.earlier_bytes and self.segment_start_ms:
            return self.segment_start_ms + (
                self.segment_bytes * self.segment_start_ms // self.earlier_bytes
            )
        return self.segment_start_ms


@dataclass(eq=False)
class _Flight:
    """The one stream in flight on a connection."""

    id: str
    clock: _AudioClock = dataclasses.field(default_factory=_AudioClock)
    task: asyncio.Task[None] | None = None


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address or "unknown")


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


class _Session:
    """Serve one WebSocket connection: read frames, run its stream, keep its memory."""

    def __init__(self, door: WsDoor, connection: ServerConnection) -> None:
        self.door = door
        self.ws = connection
        self.synthesizer = door.synthesizer
        self.settings = door.synthesizer.settings
        self.peer = _peer(connection)
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

        The hook for API keys: a wrong header was already refused with 401 at the
        handshake; a client without one must send ``auth`` within 5 s, else 1008.
        """
        door = self.door
        if not door.keys or door.header_key_ok(self.ws.request) is True:
            return True
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                message = await self.ws.recv()
        except TimeoutError:
            await self.ws.close(WS_CLOSE["policy"], "authentication required")
            return False
        try:
            frame = parse_frame(message)
        except BadFrame:
            frame = None
        if isinstance(frame, AuthFrame) and door.key_ok(frame.token):
            return True
        await self.ws.close(WS_CLOSE["policy"], "authentication failed")
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
        task = asyncio.create_task(
            self._run(flight, request, frame.stream), name=f"ws-stream-{request_id}"
        )
        flight.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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

    async def _run(self, flight: _Flight, request: model.SynthesisRequest, streaming: bool) -> None:
        """Relay one stream's events; the terminal frame goes out after the core stopped."""
        record = StreamRecord("ws", self.peer, request, log_text=self.settings.log_text)
        epoch = self.memory_epoch
        clock = flight.clock
        buffered: list[bytes] | None = None if streaming else []
        finished: model.StreamFinished | None = None
        error: VoxrelayError | None = None
        try:
            async with self.synthesizer.stream(request) as events:
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
            record.end("cancelled", audio_ms=clock.audio_ms)
            return
        except asyncio.CancelledError:
            record.end("cancelled", audio_ms=clock.audio_ms)
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
            record.end(error.code, error=error)
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
        self.keys = tuple(key.encode() for key in self.settings.all_api_keys())
        self._server: Server | None = None
        self._sessions: set[_Session] = set()

    async def start(self) -> None:
        """Bind ``host:ws_port`` and start serving."""
        s = self.settings
        context: ssl.SSLContext | None = None
        if s.tls_cert and s.tls_key:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(s.tls_cert, s.tls_key)
        self._server = await serve(
            self._handle,
            s.host,
            s.ws_port,
            process_request=self._process_request,
            compression=None,  # audio does not compress; deflate costs memory
            server_header=f"voxrelay/{__version__}",
            # Timeouts
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

    # API keys (the hook SPEC's Limits table describes)

    def key_ok(self, token: str) -> bool:
        """Say whether *token* is a configured key, in constant time."""
        candidate = token.encode()
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(candidate, key)
        return found

    def header_key_ok(self, request: Request | None) -> bool | None:
        """Check ``Authorization: Bearer K``: ``None`` when the header is absent."""
        header = request.headers.get("Authorization") if request is not None else None
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and self.key_ok(token.strip())

    # Connections

    async def _handle(self, connection: ServerConnection) -> None:
        session = _Session(self, connection)
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
            if self.draining:
                return _respond(
                    connection,
                    http.HTTPStatus.SERVICE_UNAVAILABLE,
                    "voxrelay is shutting down: retry on another replica\n",
                )
            if self.keys and self.header_key_ok(request) is False:
                return _respond(connection, http.HTTPStatus.UNAUTHORIZED, "invalid API key\n")
            return None
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
                headers={"Cache-Control": "no-cache"},
            )
        return _respond(
            connection,
            http.HTTPStatus.NOT_FOUND,
            f"not found: the WebSocket endpoint is {STREAM_PATH}\n",
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
