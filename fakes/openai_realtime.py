"""Serve the subset of the OpenAI Realtime API voxrelay uses, over a real WebSocket, for tests.

:class:`FakeRealtime` listens on a local port and upgrades ``GET /v1/realtime?model=M`` (what
the openai SDK's ``client.realtime.connect(model=M)`` asks for when given
``base_url=fake.base_url``). Any other path gets an HTTP 404; when :attr:`FakeRealtime.api_key`
is set, another bearer token gets an HTTP 401 with OpenAI's JSON error. Once upgraded it sends
``session.created`` and then answers these client events (JSON text frames):

- ``session.update``: merged into the session (``session.type`` must be ``"realtime"``; only
  ``audio/pcm`` at 24 kHz is spoken), answered with ``session.updated``;
- ``conversation.item.create`` (message items, text content) and ``conversation.item.delete``:
  answered with ``conversation.item.added`` + ``conversation.item.done`` or
  ``conversation.item.deleted``;
- ``response.create``: a response in the shape the GA API streams (``response.created``,
  ``response.output_item.added``, ``conversation.item.added``,
  ``response.content_part.added``, then per token one
  ``response.output_audio_transcript.delta`` followed by that token's
  ``response.output_audio.delta`` chunks, then the ``*.done`` events and ``response.done``
  with usage). A second one while a response runs gets ``error``
  ``conversation_already_has_active_response``;
- ``response.cancel``: stops the response at once; it ends with ``response.done`` whose status
  is ``cancelled`` (``error`` ``response_cancel_not_active`` when nothing runs).

Anything else, or a frame that is not a JSON event, gets an ``error`` with code
``invalid_event``. With ``"output_modalities": ["text"]`` a response streams
``response.output_text.delta`` and no audio.

The reply (a string, or a function of the conversation as ``{"role", "content"}`` dicts) is cut
into tokens by :func:`~fakes.openai_upstream.tokenize`, and ``max_output_tokens`` caps
their number (status ``incomplete``). A token of *n* characters is followed by
``n * MS_PER_CHAR / speed`` ms of the HTTP fake's synthetic voice, in chunks of at most
:data:`AUDIO_CHUNK_MS`; the sample boundaries are rounded cumulatively, so a response's PCM is
exactly :func:`expected_pcm_bytes` of its transcript. The finished assistant item joins the
conversation, as it does on the real API.

Timing follows a :class:`Latency`: ``ttft_s`` before ``response.created``, ``token_s`` between
transcript deltas, ``tts_first_byte_s`` before the first audio chunk and ``tts_rtf`` seconds per
second of audio after it. Faults are queued per phase, ``fake.connect_faults`` for the HTTP
upgrade and ``fake.response_faults`` (one per ``response.create``), with the HTTP fake's
constructors plus :func:`error_event` and :func:`close_after`. Every connection is recorded as
a :class:`RecordedSession` with the client's events, its responses (:class:`RecordedResponse`)
and timed events; tests await those with :meth:`FakeRealtime.wait_for` and
:meth:`FakeRealtime.wait_for_event` rather than sleeping. All times are :func:`time.monotonic`
seconds (the asyncio loop's clock).

Run ``python -m fakes.openai_realtime --port 8001`` to serve until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import math
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .base import FakeServer, Latency, Reply
from .openai_upstream import (
    DEFAULT_REPLY,
    MS_PER_CHAR,
    SAMPLE_RATE,
    Fault,
    FaultQueue,
    _error_body,
    expected_pcm_bytes,
    hang,
    malformed,
    pcm_duration_s,
    reset_after,
    serve_from_command_line,
    slow_first_byte,
    status,
    tokenize,
    voice_pcm,
)

__all__ = [
    "AUDIO_CHUNK_MS",
    "DEFAULT_REPLY",
    "MS_PER_AUDIO_TOKEN",
    "MS_PER_CHAR",
    "SAMPLE_RATE",
    "FakeRealtime",
    "Fault",
    "FaultQueue",
    "Latency",
    "RealtimeFault",
    "RecordedResponse",
    "RecordedSession",
    "close_after",
    "error_event",
    "expected_pcm_bytes",
    "hang",
    "main",
    "malformed",
    "reset_after",
    "slow_first_byte",
    "status",
    "tokenize",
]

#: the most audio one ``response.output_audio.delta`` carries.
AUDIO_CHUNK_MS = 100
#: usage counts one audio output token per this much audio.
MS_PER_AUDIO_TOKEN = 50

_CHUNK_SAMPLES = SAMPLE_RATE * AUDIO_CHUNK_MS // 1000
_SAMPLES_PER_AUDIO_TOKEN = SAMPLE_RATE * MS_PER_AUDIO_TOKEN // 1000
_TEXT_PARTS = ("input_text", "output_text", "text")
_ROLES = ("user", "assistant", "system")
_MALFORMED_FRAME = '{"type": "response.output_audio.delta", "delta'
_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"


# Faults only a WebSocket session has


@dataclass(frozen=True, slots=True)
class RealtimeFault(Fault):
    """A fault the HTTP fake has no kind for; it goes in the same :class:`FaultQueue`."""

    #: ``"error_event"`` or ``"close_after"``.
    kind: str  # type: ignore[assignment]  # widens the HTTP fake's kinds
    error_type: str = "server_error"
    error_code: str | None = None
    #: an ``error_event`` mid-response: after this many transcript deltas.
    after: int | None = None
    close_code: int = 1011


def error_event(
    type: str = "server_error",
    code: str | None = None,
    message: str | None = None,
    *,
    after: int | None = None,
) -> RealtimeFault:
    """Answer ``response.create`` with an ``error`` event and no response.

    With *after*, the response starts and, after that many transcript deltas, the error is sent
    and the response ends with ``response.done`` status ``failed``. As a connect fault, the
    error follows ``session.created`` and the session stays open.
    """
    text = message or (_SERVER_ERROR if type == "server_error" else "error")
    return RealtimeFault("error_event", message=text, error_type=type, error_code=code, after=after)


def close_after(n: int, code: int = 1011, reason: str = "") -> RealtimeFault:
    """Close the WebSocket with *code* after *n* transcript deltas of the response.

    As a connect fault, the close follows ``session.created``.
    """
    return RealtimeFault("close_after", count=n, close_code=code, message=reason)


# Records


@dataclass(slots=True, eq=False)
class RecordedResponse:
    """One ``response.create`` the fake accepted, and how the response went."""

    id: str
    #: the index of its :class:`RecordedSession`.
    session: int
    requested_at: float
    fault: Fault | None = None
    #: ``in_progress``, then ``completed``, ``incomplete``, ``cancelled`` or ``failed``;
    #: ``aborted`` when the connection went away first; ``None`` after an ``error_event``
    #: fault, which makes no response.
    status: str | None = None
    #: what it meant to say (the reply, after ``max_output_tokens``).
    text: str = ""
    #: what it sent of that.
    transcript: str = ""
    pcm_bytes: int = 0
    created_at: float | None = None
    first_transcript_at: float | None = None
    first_audio_at: float | None = None
    cancel_received_at: float | None = None
    done_at: float | None = None


@dataclass(slots=True, eq=False)
class RecordedSession:
    """One connection to the fake: its handshake, its events and how it ended."""

    index: int
    #: when the TCP connection was accepted.
    opened_at: float
    path: str | None = None
    #: the ``model`` query parameter.
    model: str | None = None
    query: dict[str, str] = field(default_factory=dict)
    #: header names in lower case.
    headers: dict[str, str] = field(default_factory=dict)
    #: the connect fault applied to the handshake.
    fault: Fault | None = None
    #: 101 once upgraded, else the HTTP status the handshake was refused with.
    status: int | None = None
    connected_at: float | None = None
    #: when the TCP connection closed, for any reason.
    closed_at: float | None = None
    #: the close code the client sent (``None`` when no close frame came).
    close_code: int | None = None
    close_reason: str | None = None
    #: the session configuration as it stands.
    session: dict[str, Any] = field(default_factory=dict)
    #: the conversation's items as they stand.
    items: list[dict[str, Any]] = field(default_factory=list)
    responses: list[RecordedResponse] = field(default_factory=list)
    #: every client event, parsed (``{"_raw": text}`` when it was not a JSON object).
    client_events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)

    @property
    def api_key(self) -> str | None:
        """Return the bearer token the client sent."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" else None

    @property
    def conversation(self) -> list[dict[str, str]]:
        """Return the conversation as a callable reply sees it."""
        return _conversation(self.items)

    def first(self, kind: str) -> float | None:
        """Return the time of the first event of *kind*."""
        return next((at for at, k in self.events if k == kind), None)


# Per-connection state


class _Stop(Exception):
    """The response ended early (a fault closed or reset the connection)."""


@dataclass(eq=False)
class _Active:
    record: RecordedResponse
    options: dict[str, Any]
    conversation: list[dict[str, str]]
    tokens: list[str]
    capped: bool
    text_mode: bool
    speed: float
    add_to_conversation: bool
    item_id: str
    previous_item_id: str | None = None
    task: asyncio.Task[None] | None = None
    item_added: bool = False
    part_added: bool = False
    finishing: bool = False
    tokens_sent: int = 0
    samples_sent: int = 0


@dataclass(eq=False)
class _Live:
    conn: _Connection
    record: RecordedSession
    #: set when the TCP connection is gone.
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    #: set when it is gone or the fake stops.
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    active: _Active | None = None
    #: the task of the latest response.
    task: asyncio.Task[None] | None = None


class _Connection(ServerConnection):
    """A server connection that tells its fake when the TCP connection opens and closes."""

    fake: ClassVar[FakeRealtime]
    live: _Live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.live = self.fake._opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.fake._lost(self.live)


def _abort(conn: ServerConnection) -> None:
    """Reset the TCP connection (RST, no close frame)."""
    sock = conn.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.transport.abort()


# The server


class FakeRealtime(FakeServer):
    """A local OpenAI Realtime API speaking real WebSocket frames."""

    def __init__(
        self,
        *,
        latency: Latency | None = None,
        reply: Reply = DEFAULT_REPLY,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_history: bool = True,
    ) -> None:
        super().__init__(
            latency=latency,
            reply=reply,
            api_key=api_key,
            host=host,
            port=port,
            keep_history=keep_history,
        )
        #: applied to the HTTP upgrade, one per connection.
        self.connect_faults = FaultQueue()
        #: applied to responses, one per accepted ``response.create``.
        self.response_faults = FaultQueue()
        self.sessions: list[RecordedSession] = []
        self.responses_active = 0
        self.responses_total = 0
        self._server: Server | None = None
        self._live: set[_Live] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._ids = itertools.count(1)
        self._event_ids = itertools.count(1)
        self._session_ids = itertools.count()

    @property
    def base_url(self) -> str:
        """Return the URL to give an OpenAI client, ending in ``/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def url(self) -> str:
        """Return the WebSocket URL, without the ``model`` query parameter."""
        return f"ws://{self.host}:{self.port}/v1/realtime"

    @property
    def responses(self) -> list[RecordedResponse]:
        """Return every recorded response, session by session."""
        return [r for s in self.sessions for r in s.responses]

    # Lifecycle

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free one, read it back from :attr:`port`."""
        owner = self

        class _Bound(_Connection):
            fake = owner

        self._stopping = False
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            create_connection=_Bound,
            compression=None,
            open_timeout=None,  # a hung handshake is held until the client leaves
            ping_interval=None,
            close_timeout=1.0,
            max_size=16 * 1024 * 1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, stop every response and close every connection (code 1001)."""
        self._stopping = True
        for live in list(self._live):
            live.gone.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # Waiting for things to happen

    async def wait_for_event(
        self,
        kind: str,
        count: int = 1,
        *,
        session: int | RecordedSession | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> float:
        """Return the time of the *count*-th event of *kind* (in *session*, if given)."""
        index = session.index if isinstance(session, RecordedSession) else session
        times: list[float] = []

        def seen() -> bool:
            times[:] = [
                at for at, k, i in self.events if k == kind and (index is None or i == index)
            ]
            return len(times) >= count

        await self.wait_for(seen, timeout)
        return times[count - 1]

    def _event(self, record: RecordedSession, kind: str, at: float | None = None) -> float:
        at = time.monotonic() if at is None else at
        if self.keep_history:
            record.events.append((at, kind))
            self.events.append((at, kind, record.index))
        self._notify()
        return at

    # Connections

    def _opened(self, conn: _Connection) -> _Live:
        record = RecordedSession(index=next(self._session_ids), opened_at=time.monotonic())
        live = _Live(conn, record)
        self._live.add(live)
        if self._stopping:
            live.gone.set()
        if self.keep_history:
            self.sessions.append(record)
        self.open_connections += 1
        self.connections_total += 1
        self._notify()
        return live

    def _lost(self, live: _Live) -> None:
        record = live.record
        record.closed_at = time.monotonic()
        rcvd = live.conn.protocol.close_rcvd
        if rcvd is not None:
            record.close_code, record.close_reason = rcvd.code, rcvd.reason
        live.lost.set()
        live.gone.set()
        self._abort_response(live)  # stop producing at once
        self._live.discard(live)
        self.open_connections -= 1
        self._event(record, "closed", record.closed_at)

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        assert isinstance(connection, _Connection)
        live = connection.live
        record = live.record
        target = urlsplit(request.path)
        record.path = target.path
        record.query = dict(parse_qsl(target.query))
        record.model = record.query.get("model")
        for name, value in request.headers.raw_items():
            key = name.lower()
            record.headers[key] = (
                f"{record.headers[key]}, {value}" if key in record.headers else value
            )
        self._event(record, "handshake")
        if not record.path.endswith("/realtime"):
            return self._refuse(connection, record, 404, f"Invalid URL (GET {record.path})")

        fault = record.fault = self.connect_faults.take()
        if fault is not None and fault.kind == "slow_first_byte":
            self._event(record, "fault:slow_first_byte")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fault.seconds):
                    await live.gone.wait()
        if fault is not None and fault.kind == "hang":
            self._event(record, "fault:hang")
            await live.gone.wait()
        if fault is not None and fault.kind == "reset_after":
            self._event(record, "fault:reset_after")
            _abort(connection)
        if live.gone.is_set() or (fault is not None and fault.kind == "reset_after"):
            if not live.lost.is_set():
                connection.transport.abort()
                await live.lost.wait()
            return connection.respond(503, "gone\n")  # not sent: the connection is closed
        if fault is not None and fault.kind == "malformed":
            self._event(record, "fault:malformed")
            page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
            response = connection.respond(200, page)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            record.status = 200
            return response
        if fault is not None and fault.kind == "status":
            self._event(record, "fault:status")
            extra = {}
            if fault.retry_after is not None:
                extra["Retry-After"] = fault.retry_after
            if fault.retry_after_ms is not None:
                extra["Retry-After-Ms"] = fault.retry_after_ms
            return self._refuse(connection, record, fault.status, fault.message, extra)
        if self.api_key is not None and record.api_key != self.api_key:
            return self._refuse(connection, record, 401, None)
        return None

    def _refuse(
        self,
        connection: ServerConnection,
        record: RecordedSession,
        code: int,
        message: str | None,
        extra: Mapping[str, str] | None = None,
    ) -> Response:
        body = json.dumps(_error_body(code, message, key=record.api_key))
        response = connection.respond(code, body)
        headers = response.headers
        del headers["Content-Type"]
        headers["Content-Type"] = "application/json"
        headers["X-Request-Id"] = f"req_fake_{record.index}"
        for name, value in (extra or {}).items():
            headers[name] = value
        record.status = code
        self._event(record, "refused")
        return response

    async def _handle(self, connection: ServerConnection) -> None:
        assert isinstance(connection, _Connection)
        live = connection.live
        record = live.record
        record.status = 101
        record.session = _default_session(record.model, record.index)
        try:
            record.connected_at = self._event(record, "connected")
            await self._send(live, {"type": "session.created", "session": record.session})
            fault = record.fault
            if isinstance(fault, RealtimeFault) and fault.kind == "error_event":
                self._event(record, "fault:error_event")
                await self._error(live, fault.error_code, fault.message, type=fault.error_type)
            if isinstance(fault, RealtimeFault) and fault.kind == "close_after":
                self._event(record, "fault:close_after")
                await connection.close(fault.close_code, fault.message or "")
                return
            async for message in connection:
                await self._on_message(live, message)
        except ConnectionClosed:
            pass
        finally:
            await self._abandon(live)

    def _abort_response(self, live: _Live) -> None:
        """Stop the response in progress, if any, and record it as aborted."""
        active = live.active
        if active is None:
            return
        live.active = None
        self.responses_active -= 1
        active.record.status = "aborted"
        if active.task is not None:
            active.task.cancel()
        self._event(live.record, "response_aborted")

    async def _abandon(self, live: _Live) -> None:
        """The connection is closing: stop its response and wait until it stopped."""
        task = live.task
        self._abort_response(live)
        if task is not None and not task.done():
            await asyncio.wait([task])

    # Sending

    async def _send(self, live: _Live, event: dict[str, Any]) -> None:
        payload = {"type": event["type"], "event_id": f"event_{next(self._event_ids)}", **event}
        await live.conn.send(json.dumps(payload, separators=(",", ":")))

    async def _error(
        self,
        live: _Live,
        code: str | None,
        message: str | None,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        event_id: str | None = None,
    ) -> None:
        error = {
            "type": type,
            "code": code,
            "message": message or "error",
            "param": param,
            "event_id": event_id,
        }
        await self._send(live, {"type": "error", "error": error})
        self._event(live.record, "error_sent")

    # Client events

    async def _on_message(self, live: _Live, message: str | bytes) -> None:
        now = time.monotonic()
        event: Any = None
        if isinstance(message, str):
            with contextlib.suppress(ValueError):
                event = json.loads(message)
        if self.keep_history:
            logged = event if isinstance(event, dict) else {"_raw": message}
            live.record.client_events.append((now, logged))
        kind = event.get("type") if isinstance(event, dict) else None
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if not isinstance(event, dict) or handler is None:
            if not isinstance(event, dict):
                text = "The server could not parse the event: expected a JSON object."
            else:
                text = f"Invalid value: {kind!r}. This fake does not know that event type."
            client_id = event.get("event_id") if isinstance(event, dict) else None
            await self._error(live, "invalid_event", text, event_id=_str_or_none(client_id))
            return
        try:
            await handler(self, live, event, now)
        except ConnectionClosed:
            raise
        except Exception as exc:  # a test double must not crash its session on odd input
            message_text = f"{_SERVER_ERROR} ({type(exc).__name__}: {exc})"
            await self._error(live, None, message_text, type="server_error")

    async def _session_update(self, live: _Live, event: dict[str, Any], now: float) -> None:
        update = event.get("session")
        client_id = _str_or_none(event.get("event_id"))
        if not isinstance(update, dict):
            text = "Missing required parameter: 'session'."
            await self._error(live, "missing_required_parameter", text, event_id=client_id)
            return
        if update.get("type") != "realtime":
            param = "session.type"
            code = "missing_required_parameter" if "type" not in update else "invalid_value"
            text = f"Missing or unsupported parameter: '{param}' (this fake speaks 'realtime')."
            await self._error(live, code, text, param=param, event_id=client_id)
            return
        problem = _check_config(update)
        if problem is not None:
            await self._error(live, "invalid_value", problem, event_id=client_id)
            return
        live.record.session = _merged(live.record.session, update)
        self._event(live.record, "session_updated")
        await self._send(live, {"type": "session.updated", "session": live.record.session})

    async def _item_create(self, live: _Live, event: dict[str, Any], now: float) -> None:
        item = event.get("item")
        client_id = _str_or_none(event.get("event_id"))
        problem = _check_item(item)
        if problem is not None:
            await self._error(live, "invalid_value", problem, event_id=client_id)
            return
        assert isinstance(item, dict)
        items = live.record.items
        item_id = item.get("id") or f"item_{next(self._ids)}"
        if any(existing["id"] == item_id for existing in items):
            text = f"Item with id '{item_id}' already exists."
            await self._error(live, "item_already_exists", text, event_id=client_id)
            return
        stored = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": item["role"],
            "content": copy.deepcopy(item["content"]),
        }
        previous = items[-1]["id"] if items else None
        items.append(stored)
        self._event(live.record, "item_created")
        for kind in ("conversation.item.added", "conversation.item.done"):
            await self._send(live, {"type": kind, "previous_item_id": previous, "item": stored})

    async def _item_delete(self, live: _Live, event: dict[str, Any], now: float) -> None:
        item_id = event.get("item_id")
        items = live.record.items
        found = next((i for i, item in enumerate(items) if item["id"] == item_id), None)
        if found is None:
            text = f"Item with item_id '{item_id}' not found."
            client_id = _str_or_none(event.get("event_id"))
            await self._error(live, "item_not_found", text, param="item_id", event_id=client_id)
            return
        del items[found]
        self._event(live.record, "item_deleted")
        await self._send(live, {"type": "conversation.item.deleted", "item_id": item_id})

    async def _response_create(self, live: _Live, event: dict[str, Any], now: float) -> None:
        client_id = _str_or_none(event.get("event_id"))
        if live.active is not None:
            text = (
                "Conversation already has an active response in progress: "
                f"{live.active.record.id}. Wait until the response is finished before creating "
                "a new one."
            )
            code = "conversation_already_has_active_response"
            await self._error(live, code, text, event_id=client_id)
            return
        options = event.get("response") or {}
        problem = "'response' must be an object" if not isinstance(options, dict) else None
        problem = problem or _check_config(options)
        if problem is not None:
            await self._error(live, "invalid_value", problem, event_id=client_id)
            return
        config = _merged(live.record.session, {k: v for k, v in options.items() if k != "input"})
        items: Sequence[dict[str, Any] | None]
        if isinstance(options.get("input"), list):
            items = [_resolve(live.record.items, entry) for entry in options["input"]]
        else:
            items = live.record.items
        conversation = _conversation(i for i in items if i is not None)
        record = RecordedResponse(
            id=f"resp_{next(self._ids)}", session=live.record.index, requested_at=now
        )
        if self.keep_history:
            live.record.responses.append(record)
        self._event(live.record, "response_requested", now)
        fault = record.fault = self.response_faults.take()
        if isinstance(fault, RealtimeFault) and fault.kind == "error_event" and fault.after is None:
            self._event(live.record, "fault:error_event")
            await self._error(live, fault.error_code, fault.message, type=fault.error_type)
            return
        reply = self.reply(conversation) if callable(self.reply) else self.reply
        tokens = tokenize(reply)
        limit = config.get("max_output_tokens")
        capped = isinstance(limit, int) and len(tokens) > limit
        if capped:
            tokens = tokens[:limit]
        record.text = "".join(tokens)
        record.status = "in_progress"
        output = _get(config, "audio", "output") or {}
        active = _Active(
            record=record,
            options=config,
            conversation=conversation,
            tokens=tokens,
            capped=capped,
            text_mode=config.get("output_modalities") == ["text"],
            speed=float(output.get("speed") or 1.0),
            add_to_conversation=config.get("conversation", "auto") != "none",
            item_id=f"item_{next(self._ids)}",
        )
        live.active = active
        self.responses_active += 1
        self.responses_total += 1
        task = asyncio.create_task(self._run(live, active))
        active.task = live.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _response_cancel(self, live: _Live, event: dict[str, Any], now: float) -> None:
        active = live.active
        if active is None:
            text = "Cancellation failed: no active response found"
            client_id = _str_or_none(event.get("event_id"))
            await self._error(live, "response_cancel_not_active", text, event_id=client_id)
            return
        active.record.cancel_received_at = self._event(live.record, "cancel_received", now)
        if active.finishing:  # too late: it is sending its done events already
            return
        assert active.task is not None
        active.task.cancel()
        await asyncio.wait([active.task])
        if live.active is active:
            details = {"type": "cancelled", "reason": "client_cancelled"}
            await self._finish(live, active, "cancelled", details)

    _handlers: ClassVar[dict[str, Callable[..., Any]]] = {
        "session.update": _session_update,
        "conversation.item.create": _item_create,
        "conversation.item.delete": _item_delete,
        "response.create": _response_create,
        "response.cancel": _response_cancel,
    }

    # Responses

    async def _run(self, live: _Live, active: _Active) -> None:
        with contextlib.suppress(_Stop, ConnectionClosed):
            await self._produce(live, active)

    def _item(self, active: _Active, status: str, *, empty: bool = False) -> dict[str, Any]:
        text = active.record.transcript
        if active.text_mode:
            part = {"type": "output_text", "text": text}
        else:
            part = {"type": "output_audio", "transcript": text}
        return {
            "id": active.item_id,
            "object": "realtime.item",
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [] if empty else [part],
        }

    def _response(
        self,
        live: _Live,
        active: _Active,
        status: str,
        details: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        config = active.options
        item_status = "completed" if status == "completed" else "incomplete"
        output = _get(config, "audio", "output") or {}
        return {
            "object": "realtime.response",
            "id": active.record.id,
            "status": status,
            "status_details": details,
            "output": [self._item(active, item_status)] if active.item_added else [],
            "conversation_id": (
                f"conv_fake{live.record.index}" if active.add_to_conversation else None
            ),
            "output_modalities": config.get("output_modalities", ["audio"]),
            "max_output_tokens": config.get("max_output_tokens", "inf"),
            "audio": {"output": {"format": output.get("format"), "voice": output.get("voice")}},
            "metadata": config.get("metadata"),
            "usage": usage,
        }

    async def _produce(self, live: _Live, active: _Active) -> None:
        record, fault, latency = active.record, active.record.fault, self.latency
        loop = asyncio.get_running_loop()
        if fault is not None and fault.kind == "hang":
            self._event(live.record, "fault:hang")
            await loop.create_future()  # until cancelled: by response.cancel or a disconnect
        if latency.ttft_s > 0:
            await asyncio.sleep(latency.ttft_s)
        ids = {"response_id": record.id, "item_id": active.item_id}
        where = {**ids, "output_index": 0, "content_index": 0}
        response = self._response(live, active, "in_progress")
        await self._send(live, {"type": "response.created", "response": response})
        record.created_at = self._event(live.record, "response_created")
        item = self._item(active, "in_progress", empty=True)
        await self._send(
            live,
            {
                "type": "response.output_item.added",
                "response_id": record.id,
                "output_index": 0,
                "item": item,
            },
        )
        previous = live.record.items[-1]["id"] if live.record.items else None
        active.previous_item_id = previous
        await self._send(
            live, {"type": "conversation.item.added", "previous_item_id": previous, "item": item}
        )
        active.item_added = True
        part = (
            {"type": "text", "text": ""}
            if active.text_mode
            else {"type": "audio", "transcript": ""}
        )
        await self._send(live, {"type": "response.content_part.added", **where, "part": part})
        active.part_added = True

        tokens = active.tokens
        bounds = [0]
        for i in range(len(tokens)):
            spoken = "".join(tokens[: i + 1])
            bounds.append(round(pcm_duration_s(spoken, active.speed) * SAMPLE_RATE))
        pcm = b"" if active.text_mode else voice_pcm(bounds[-1])
        delta_type = (
            "response.output_text.delta"
            if active.text_mode
            else "response.output_audio_transcript.delta"
        )
        started = due = loop.time()
        audio_started: float | None = None
        bad_at = min(2, len(tokens) - 1)
        for i, token in enumerate(tokens):
            await self._fault_point(live, active, i, final=False)
            due = max(started + i * latency.token_s, due)
            await _until(loop, due)
            if fault is not None and fault.kind == "malformed" and i == bad_at:
                await live.conn.send(_MALFORMED_FRAME)
                self._event(live.record, "fault:malformed")
            await self._send(live, {"type": delta_type, **where, "delta": token})
            record.transcript += token
            active.tokens_sent += 1
            if record.first_transcript_at is None:
                record.first_transcript_at = self._event(live.record, "first_transcript")
            self._event(live.record, "transcript_delta")
            if active.text_mode:
                continue
            for start in range(bounds[i], bounds[i + 1], _CHUNK_SAMPLES):
                end = min(start + _CHUNK_SAMPLES, bounds[i + 1])
                if audio_started is None:
                    extra = latency.tts_first_byte_s
                    if fault is not None and fault.kind == "slow_first_byte":
                        extra += fault.seconds
                        self._event(live.record, "fault:slow_first_byte")
                    audio_started = max(loop.time(), due) + extra
                due = max(audio_started + start / SAMPLE_RATE * latency.tts_rtf, due)
                await _until(loop, due)
                chunk = base64.b64encode(pcm[start * 2 : end * 2]).decode("ascii")
                await self._send(
                    live, {"type": "response.output_audio.delta", **where, "delta": chunk}
                )
                active.samples_sent = end
                record.pcm_bytes = end * 2
                if record.first_audio_at is None:
                    record.first_audio_at = self._event(live.record, "first_audio")
                self._event(live.record, "audio_delta")
        await self._fault_point(live, active, len(tokens), final=True)
        if active.capped:
            await self._finish(
                live, active, "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
            )
        else:
            await self._finish(live, active, "completed", None)

    async def _fault_point(self, live: _Live, active: _Active, sent: int, *, final: bool) -> None:
        """Apply a mid-response fault once *sent* transcript deltas are out."""
        fault = active.record.fault
        kind: str = "" if fault is None else fault.kind
        if fault is None or kind not in ("close_after", "reset_after", "error_event"):
            return
        count = (
            fault.after
            if isinstance(fault, RealtimeFault) and fault.after is not None
            else fault.count
        )
        if not (final or sent >= count):
            return
        self._event(live.record, f"fault:{kind}")
        if kind == "error_event":
            assert isinstance(fault, RealtimeFault)
            await self._error(live, fault.error_code, fault.message, type=fault.error_type)
            error = {"type": fault.error_type, "code": fault.error_code, "message": fault.message}
            await self._finish(live, active, "failed", {"type": "failed", "error": error})
            raise _Stop
        if kind == "close_after":
            assert isinstance(fault, RealtimeFault)
            await live.conn.close(fault.close_code, fault.message or "")
            raise _Stop
        _abort(live.conn)
        raise _Stop

    async def _finish(
        self, live: _Live, active: _Active, status: str, details: dict[str, Any] | None
    ) -> None:
        """Send the done events of what was started, then ``response.done``."""
        active.finishing = True
        record = active.record
        transcript = record.transcript
        where = {
            "response_id": record.id,
            "item_id": active.item_id,
            "output_index": 0,
            "content_index": 0,
        }
        item_status = "completed" if status == "completed" else "incomplete"
        if active.part_added and status != "failed":
            if active.text_mode:
                await self._send(
                    live, {"type": "response.output_text.done", **where, "text": transcript}
                )
                part = {"type": "text", "text": transcript}
            else:
                await self._send(live, {"type": "response.output_audio.done", **where})
                await self._send(
                    live,
                    {
                        "type": "response.output_audio_transcript.done",
                        **where,
                        "transcript": transcript,
                    },
                )
                part = {"type": "audio", "transcript": transcript}
            await self._send(live, {"type": "response.content_part.done", **where, "part": part})
        if active.item_added and status != "failed":
            item = self._item(active, item_status)
            await self._send(
                live,
                {
                    "type": "response.output_item.done",
                    "response_id": record.id,
                    "output_index": 0,
                    "item": item,
                },
            )
            previous = active.previous_item_id
            await self._send(
                live, {"type": "conversation.item.done", "previous_item_id": previous, "item": item}
            )
            if active.add_to_conversation:
                live.record.items.append(item)
        config = active.options
        instructions = config.get("instructions") or ""
        input_tokens = len(tokenize(instructions)) + sum(
            len(tokenize(message["content"])) for message in active.conversation
        )
        audio_tokens = math.ceil(active.samples_sent / _SAMPLES_PER_AUDIO_TOKEN)
        output_tokens = active.tokens_sent + audio_tokens
        usage = {
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_token_details": {
                "text_tokens": input_tokens,
                "audio_tokens": 0,
                "image_tokens": 0,
                "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {
                "text_tokens": active.tokens_sent,
                "audio_tokens": audio_tokens,
            },
        }
        response = self._response(live, active, status, details, usage)
        live.active = None  # before the send: the client may answer response.done at once
        self.responses_active -= 1
        record.status = status
        await self._send(live, {"type": "response.done", "response": response})
        record.done_at = self._event(live.record, "response_done")
        if status != "completed":
            self._event(live.record, f"response_{status}", record.done_at)


# Helpers


async def _until(loop: asyncio.AbstractEventLoop, due: float) -> None:
    delay = due - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _get(mapping: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _merged(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Return *base* with *update* merged in, nested objects key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _item_text(item: Mapping[str, Any]) -> str:
    parts = item.get("content") or []
    return "".join(
        str(part.get("text") or part.get("transcript") or "")
        for part in parts
        if isinstance(part, dict)
    )


def _conversation(items: Any) -> list[dict[str, str]]:
    return [
        {"role": item["role"], "content": _item_text(item)}
        for item in items
        if isinstance(item, dict) and item.get("type") == "message"
    ]


def _resolve(items: Sequence[dict[str, Any]], entry: Any) -> dict[str, Any] | None:
    """Return a ``response.input`` entry as an item (``item_reference`` looks it up)."""
    if isinstance(entry, dict) and entry.get("type") == "item_reference":
        return next((item for item in items if item["id"] == entry.get("id")), None)
    return entry if isinstance(entry, dict) else None


def _default_session(model: str | None, index: int) -> dict[str, Any]:
    audio_format = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    turn_detection = {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    }
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": f"sess_fake{index}",
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "include": None,
        "expires_at": int(time.time()) + 3600,
        "audio": {
            "input": {
                "format": dict(audio_format),
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": turn_detection,
            },
            "output": {"format": dict(audio_format), "voice": "alloy", "speed": 1.0},
        },
    }


def _check_config(config: Mapping[str, Any]) -> str | None:
    """Return what is wrong with a session update or response options, if anything."""
    modalities = config.get("output_modalities")
    if modalities is not None and modalities not in (["audio"], ["text"]):
        return "'output_modalities' must be ['audio'] or ['text']"
    instructions = config.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        return "'instructions' must be a string"
    limit = config.get("max_output_tokens")
    if limit not in (None, "inf") and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 4096
    ):
        return "'max_output_tokens' must be an integer from 1 to 4096, or 'inf'"
    audio = config.get("audio")
    if audio is not None and not isinstance(audio, dict):
        return "'audio' must be an object"
    output = _get(config, "audio", "output")
    if output is not None and not isinstance(output, dict):
        return "'audio.output' must be an object"
    audio_format = _get(config, "audio", "output", "format")
    if audio_format is not None and (
        not isinstance(audio_format, dict)
        or audio_format.get("type") != "audio/pcm"
        or audio_format.get("rate", SAMPLE_RATE) != SAMPLE_RATE
    ):
        return f"this fake only speaks audio/pcm at {SAMPLE_RATE} Hz"
    speed = _get(config, "audio", "output", "speed")
    if speed is not None and (
        isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 1.5
    ):
        return "'audio.output.speed' must be a number from 0.25 to 1.5"
    voice = _get(config, "audio", "output", "voice")
    if voice is not None and not isinstance(voice, str | dict):
        return "'audio.output.voice' must be a string"
    return None


def _check_item(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "Missing required parameter: 'item'."
    if item.get("type") != "message":
        return "this fake only stores items of type 'message'"
    if item.get("role") not in _ROLES:
        return "'item.role' must be one of 'user', 'assistant', 'system'"
    if item.get("id") is not None and not isinstance(item["id"], str):
        return "'item.id' must be a string"
    content = item.get("content")
    if not isinstance(content, list) or not content:
        return "'item.content' must be a non-empty array"
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            return "this fake only takes content parts of type 'input_text' or 'output_text'"
        if not isinstance(part.get("text"), str):
            return "each content part needs a 'text' string"
    return None


# Command line


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the fake until Ctrl-C."""
    serve_from_command_line(
        FakeRealtime,
        argv,
        prog="python -m fakes.openai_realtime",
        port=8001,
        title="fake OpenAI Realtime",
    )


if __name__ == "__main__":
    main()
