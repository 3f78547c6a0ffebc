"""Serve the subset of the OpenAI API voxrelay uses, over real HTTP/1.1, for tests and demos.

:class:`FakeOpenAI` listens on a local port and answers

- ``POST /v1/chat/completions``: with ``"stream": true``, Server-Sent Events in the shape the
  real API sends (a role delta, one content delta per token, a ``finish_reason`` chunk, a
  usage chunk with empty ``choices`` when ``stream_options.include_usage`` is set, then
  ``data: [DONE]``); without it, one ``chat.completion`` object;
- ``POST /v1/audio/speech``: raw PCM (s16le, mono, 24 kHz) in a chunked body, 20 ms a chunk;
- ``GET /v1/models``: a minimal list.

The reply is cut into word-ish tokens that keep their leading space and trailing punctuation,
so "$3.50" arrives as "$3." then "50", as it may from a real model. Speech lasts
:data:`MS_PER_CHAR` milliseconds per input character, divided by ``speed``; the signal is a
tone whose pitch glides and whose loudness pulses like syllables, never silent.

Timing follows a :class:`Latency` that tests may change while the server runs. Faults are
queued per endpoint (``fake.chat_faults.append(status(429, retry_after=2))``) and consumed one
per request; ``fake.chat_faults.always(...)`` makes one sticky. Every request is recorded as a
:class:`RecordedRequest` with its timings, including when the server noticed the client close
the connection before the response was complete; tests await those with :meth:`wait_for`
rather than sleeping. All times are :func:`time.monotonic` seconds (the asyncio loop's clock).

Run ``python -m fakes.openai_upstream --port 8000`` to serve until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import re
import socket
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import uvloop

from .base import FakeServer, Latency, Reply

__all__ = [
    "CHUNK_MS",
    "DEFAULT_REPLY",
    "MS_PER_CHAR",
    "SAMPLE_RATE",
    "FakeOpenAI",
    "Fault",
    "FaultQueue",
    "Latency",
    "RecordedRequest",
    "expected_pcm_bytes",
    "hang",
    "main",
    "malformed",
    "pcm_duration_s",
    "reset_after",
    "serve_from_command_line",
    "slow_first_byte",
    "status",
    "tokenize",
    "voice_pcm",
]

SAMPLE_RATE = 24_000
#: speech lasts this many milliseconds per input character (at speed 1.0).
MS_PER_CHAR = 60
#: audio per chunk of a speech response.
CHUNK_MS = 20

DEFAULT_REPLY = (
    "Sure, here is what I found. "
    "A single ticket costs $3.50 for adults. "
    "Children under five ride for free! "
    "Trains leave every 12 minutes until midnight. "
    "Would you like me to check the next departure? "
    "Have a pleasant trip."
)

_TOKEN = re.compile(r"\s*[^\s.,!?;:]+[.,!?;:]*|\s*[.,!?;:]+|\s+$")
_MAX_HEAD = 64 * 1024
_MAX_BODY = 4 * 1024 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def tokenize(text: str) -> list[str]:
    """Split *text* into model-like tokens whose concatenation is *text*."""
    return _TOKEN.findall(text)


def pcm_duration_s(text: str, speed: float = 1.0) -> float:
    """Return how long the fake speaks *text*: 60 ms per character, divided by *speed*."""
    return len(text) * MS_PER_CHAR / 1000 / (speed or 1.0)


def expected_pcm_bytes(text: str, speed: float = 1.0) -> int:
    """Return the exact PCM byte count the fake sends for *text*."""
    return round(pcm_duration_s(text, speed) * SAMPLE_RATE) * 2


# Timing and faults


FaultKind = Literal["status", "reset_after", "hang", "malformed", "slow_first_byte"]


@dataclass(frozen=True, slots=True)
class Fault:
    """One misbehaviour of the upstream, applied to one request (or all, when sticky)."""

    kind: FaultKind
    status: int = 0
    retry_after: str | None = None
    retry_after_ms: str | None = None
    message: str | None = None
    count: int = 0
    seconds: float = 0.0


def status(
    code: int,
    *,
    retry_after: float | str | None = None,
    retry_after_ms: int | None = None,
    message: str | None = None,
) -> Fault:
    """Answer with HTTP *code* and an OpenAI-style JSON error (``Retry-After`` if given)."""
    return Fault(
        "status",
        status=code,
        retry_after=None if retry_after is None else _header_number(retry_after),
        retry_after_ms=None if retry_after_ms is None else str(retry_after_ms),
        message=message,
    )


def reset_after(n: int) -> Fault:
    """Send the headers and *n* tokens (chat) or audio chunks (speech), then reset the TCP."""
    return Fault("reset_after", count=n)


def hang() -> Fault:
    """Read the request and never answer, until the client goes away."""
    return Fault("hang")


def malformed() -> Fault:
    """Send an SSE frame that is not JSON (chat), or a web page instead of audio (speech)."""
    return Fault("malformed")


def slow_first_byte(seconds: float) -> Fault:
    """Wait *seconds* more before the first byte of the response."""
    return Fault("slow_first_byte", seconds=seconds)


class FaultQueue:
    """Faults for one endpoint: queued ones are used once each, then the sticky one."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()
        self.sticky: Fault | None = None

    def append(self, fault: Fault) -> None:
        """Apply *fault* to one future request."""
        self._queue.append(fault)

    def extend(self, faults: Iterable[Fault]) -> None:
        """Apply *faults* to the next requests, in order."""
        self._queue.extend(faults)

    def always(self, fault: Fault | None) -> None:
        """Apply *fault* to every request once the queue is empty (``None`` stops it)."""
        self.sticky = fault

    def clear(self) -> None:
        """Forget queued and sticky faults."""
        self._queue.clear()
        self.sticky = None

    def take(self) -> Fault | None:
        """Return the fault for the request being served, if any."""
        return self._queue.popleft() if self._queue else self.sticky

    def __len__(self) -> int:
        return len(self._queue)


@dataclass(slots=True, eq=False)
class RecordedRequest:
    """One request the fake received, and how its answer went."""

    index: int
    method: str
    path: str
    #: header names in lower case.
    headers: dict[str, str]
    #: the parsed JSON body, or ``None``.
    body: Any
    started_at: float
    fault: Fault | None = None
    status: int | None = None
    first_byte_at: float | None = None
    finished_at: float | None = None
    #: when the client closed the connection before the response was complete.
    client_gone_at: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)

    @property
    def api_key(self) -> str | None:
        """Return the bearer token the client sent."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" else None

    def first(self, kind: str) -> float | None:
        """Return the time of the first event of *kind*."""
        return next((at for at, k in self.events if k == kind), None)


# HTTP/1.1 plumbing


class _BadRequest(Exception):
    pass


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class _Connection:
    """One client connection: parse requests, write responses, notice the client leave."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_gone: Callable[[float], None],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.gone = asyncio.Event()
        self.aborted = False
        self._buffer = bytearray()
        self._watcher: asyncio.Task[None] | None = None
        self._sleeper: asyncio.Future[None] | None = None  # the pause in progress
        self._on_gone = on_gone

    async def _fill(self) -> bool:
        try:
            data = await self.reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        self._buffer.extend(data)
        return bool(data)

    async def _read_until(self, marker: bytes, limit: int) -> bytes | None:
        while (end := self._buffer.find(marker)) < 0:
            if len(self._buffer) > limit:
                raise _BadRequest("request head too large")
            if not await self._fill():
                if self._buffer:
                    raise _BadRequest("connection closed mid-request")
                return None
        data = bytes(self._buffer[: end + len(marker)])
        del self._buffer[: end + len(marker)]
        return data

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._fill():
                raise _BadRequest("connection closed mid-body")
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read_request(self) -> _Request | None:
        """Return the next request, or ``None`` when the client closed an idle connection."""
        head = await self._read_until(b"\r\n\r\n", _MAX_HEAD)
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            raise _BadRequest("bad request line") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("bad header line")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = await self._read_until(b"\r\n", _MAX_HEAD)
                if size_line is None:
                    raise _BadRequest("connection closed mid-body")
                size = int(size_line.split(b";")[0], 16)
                body += await self._read_exactly(size + 2)
                del body[-2:]
                if size == 0:
                    break
                if len(body) > _MAX_BODY:
                    raise _BadRequest("body too large")
        else:
            length = int(headers.get("content-length", "0") or 0)
            if length > _MAX_BODY:
                raise _BadRequest("body too large")
            body = bytearray(await self._read_exactly(length))
        return _Request(method.upper(), target, headers, bytes(body))

    # Noticing the client leave

    def start_watching(self) -> None:
        """Watch for EOF while a response is written (clients do not pipeline)."""
        self._watcher = asyncio.create_task(self._watch())

    async def stop_watching(self) -> None:
        """Stop watching; bytes that arrived meanwhile stay buffered for the next request."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        while await self._fill():
            pass
        self._mark_gone()

    def _mark_gone(self) -> None:
        if not self.gone.is_set():
            self.gone.set()
            if self._sleeper is not None:
                _wake(self._sleeper)
            self._on_gone(time.monotonic())

    # Writing

    async def write(self, data: bytes) -> bool:
        """Send *data*; return whether the client is still there."""
        if self.gone.is_set() or self.writer.transport.is_closing():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            self._mark_gone()
            return False
        return True

    async def pause(self, seconds: float) -> bool:
        """Wait *seconds*, waking early if the client leaves; return whether it stayed.

        A bare future and one timer, as :func:`asyncio.sleep` does it: a speech response
        pauses before each 20 ms chunk, hundreds of times a second in a benchmark.
        """
        if seconds > 0 and not self.gone.is_set():
            loop = asyncio.get_running_loop()
            self._sleeper = wake = loop.create_future()
            timer = loop.call_later(seconds, _wake, wake)
            try:
                await wake
            finally:
                timer.cancel()
                self._sleeper = None
        return not self.gone.is_set()

    async def flush(self) -> None:
        """Wait until the kernel took every byte written so far."""
        for _ in range(100):
            if self.writer.transport.get_write_buffer_size() == 0:
                return
            await asyncio.sleep(0.005)

    def abort(self) -> None:
        """Reset the TCP connection (RST, not FIN)."""
        self.aborted = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def _head(code: int, headers: Mapping[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Unknown')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_LAST_CHUNK = b"0\r\n\r\n"


def _sse(payload: Mapping[str, Any]) -> bytes:
    return _chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _header_number(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _error_body(code: int, message: str | None, *, key: str | None = None) -> dict[str, Any]:
    """Return the JSON error OpenAI sends for *code* (a 401 echoes a masked key, as it does)."""
    kind, err_code, text = "invalid_request_error", None, message
    if code == 401:
        masked = f"{key[:3]}***{key[-2:]}" if key and len(key) > 6 else "***"
        err_code = "invalid_api_key"
        text = text or (
            f"Incorrect API key provided: {masked}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
    elif code == 429:
        kind, err_code = "requests", "rate_limit_exceeded"
        text = text or "Rate limit reached for requests. Please try again shortly."
    elif code >= 500:
        kind = "server_error"
        text = text or "The server had an error while processing your request. Sorry about that!"
    return {"error": {"message": text or "error", "type": kind, "param": None, "code": err_code}}


# The synthetic voice, rendered once and sliced


_voice_second: bytes = b""


def voice_pcm(samples: int) -> bytes:
    """Return *samples* of a gliding, pulsing tone (s16le), the same every time."""
    global _voice_second
    if not _voice_second:
        one_second = array("h")
        for i in range(SAMPLE_RATE):
            t = i / SAMPLE_RATE
            # pitch 150 ± 40 Hz gliding at 3 Hz; the phase is the integral of that frequency,
            # so the whole signal repeats every second and one second is all we render.
            phase = 2 * math.pi * 150 * t - (40 / 3) * math.cos(2 * math.pi * 3 * t) + 40 / 3
            loudness = 0.35 + 0.65 * abs(math.sin(math.pi * 4 * t))  # four "syllables" a second
            tone = (math.sin(phase) + 0.3 * math.sin(2 * phase)) / 1.3  # a little overtone
            one_second.append(round(9000 * loudness * tone))
        _voice_second = one_second.tobytes()
    repeats = samples // SAMPLE_RATE + 1
    return (_voice_second * repeats)[: samples * 2]


# The server


class FakeOpenAI(FakeServer):
    """A local OpenAI-compatible upstream speaking real HTTP/1.1 and SSE."""

    def __init__(
        self,
        *,
        latency: Latency | None = None,
        reply: Reply = DEFAULT_REPLY,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_history: bool = True,
        leading_silence_ms: int = 0,
    ) -> None:
        super().__init__(
            latency=latency,
            reply=reply,
            api_key=api_key,
            host=host,
            port=port,
            keep_history=keep_history,
        )
        #: digital silence in front of every speech response, as engines send before
        #: their first sound (docs/performance.md says where figures come from).
        self.leading_silence_ms = leading_silence_ms
        self.chat_faults = FaultQueue()
        self.speech_faults = FaultQueue()
        #: usage figures reported instead of the counted ones (a faulty upstream's).
        self.usage: dict[str, Any] = {}
        self.requests: list[RecordedRequest] = []
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._request_ids = itertools.count()

    @property
    def base_url(self) -> str:
        """Return the URL to give an OpenAI client, ending in ``/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """Return the chat completion requests so far."""
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    @property
    def speech_requests(self) -> list[RecordedRequest]:
        """Return the speech requests so far."""
        return [r for r in self.requests if r.path == "/v1/audio/speech"]

    # Lifecycle

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free one, read it back from :attr:`port`."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # Waiting for things to happen

    async def wait_for_event(
        self,
        kind: str,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> float:
        """Return the time of the *count*-th event of *kind*, waiting for it."""
        times: list[float] = []

        def seen() -> bool:
            times[:] = [at for at, k, _ in self.events if k == kind]
            return len(times) >= count

        await self.wait_for(seen, timeout)
        return times[count - 1]

    def _event(self, record: RecordedRequest, kind: str, at: float | None = None) -> float:
        at = time.monotonic() if at is None else at
        record.events.append((at, kind))
        if self.keep_history:
            self.events.append((at, kind, record.index))
        self._notify()
        return at

    # Serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        # Only the latest request: a keep-alive connection's records would pile up for as
        # long as it lives (with keep_history off nothing else holds them).
        current: RecordedRequest | None = None

        def on_gone(at: float) -> None:
            if current is not None and current.finished_at is None:
                current.client_gone_at = at
                self._event(current, "client_gone", at)

        conn = _Connection(reader, writer, on_gone)
        self._connections.add(conn)
        self.open_connections += 1
        self.connections_total += 1
        self._notify()
        try:
            while not conn.aborted:
                try:
                    request = await conn.read_request()
                except (_BadRequest, ValueError) as exc:
                    body = json.dumps(_error_body(400, f"bad HTTP request: {exc}")).encode()
                    await conn.write(_head(400, _json_headers(body, close=True)) + body)
                    break
                if request is None:
                    break
                record = current = self._record(request)
                conn.start_watching()
                try:
                    keep = await self._respond(conn, request, record)
                finally:
                    await conn.stop_watching()
                    if record.finished_at is None:
                        record.finished_at = time.monotonic()
                    self._notify()
                if not keep or conn.gone.is_set():
                    break
                if request.headers.get("connection", "").lower() == "close":
                    break
        except Exception:  # a test double must not crash its loop; the client sees a reset
            conn.abort()
        finally:
            if not conn.aborted:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            self._connections.discard(conn)
            self.open_connections -= 1
            self._tasks.discard(task)
            self._notify()

    def _record(self, request: _Request) -> RecordedRequest:
        try:
            body = request.json()
        except ValueError:
            body = None
        record = RecordedRequest(
            index=next(self._request_ids),
            method=request.method,
            path=request.target.split("?", 1)[0],
            headers=dict(request.headers),
            body=body,
            started_at=time.monotonic(),
        )
        if self.keep_history:
            self.requests.append(record)
        self._event(record, "request_received", record.started_at)
        return record

    async def _send(self, conn: _Connection, record: RecordedRequest, data: bytes) -> bool:
        if record.first_byte_at is None:
            record.first_byte_at = self._event(record, "first_byte")
        return await conn.write(data)

    async def _send_json(
        self,
        conn: _Connection,
        record: RecordedRequest,
        code: int,
        payload: Any,
        extra: Mapping[str, str] | None = None,
    ) -> bool:
        body = json.dumps(payload).encode()
        record.status = code
        headers = {**_json_headers(body), "x-request-id": f"req_fake_{record.index}"}
        headers.update(extra or {})
        sent = await self._send(conn, record, _head(code, headers) + body)
        record.finished_at = time.monotonic()
        return sent

    async def _respond(self, conn: _Connection, request: _Request, record: RecordedRequest) -> bool:
        route = (request.method, record.path)
        if route == ("GET", "/v1/models"):
            models = [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                for m in ("gpt-4o-mini", "gpt-4o-mini-tts")
            ]
            return await self._send_json(conn, record, 200, {"object": "list", "data": models})
        if route == ("POST", "/v1/chat/completions"):
            faults, handler = self.chat_faults, self._chat
        elif route == ("POST", "/v1/audio/speech"):
            faults, handler = self.speech_faults, self._speech
        else:
            code = 405 if record.path in ("/v1/chat/completions", "/v1/audio/speech") else 404
            message = f"Invalid URL ({request.method} {record.path})"
            return await self._send_json(conn, record, code, _error_body(code, message))

        fault = record.fault = faults.take()
        slow = fault is not None and fault.kind == "slow_first_byte"
        if slow and fault is not None and not await conn.pause(fault.seconds):
            return False
        if fault is not None and fault.kind == "hang":
            self._event(record, "hanging")
            await conn.gone.wait()
            return False
        if fault is not None and fault.kind == "status":
            extra = {}
            if fault.retry_after is not None:
                extra["retry-after"] = fault.retry_after
            if fault.retry_after_ms is not None:
                extra["retry-after-ms"] = fault.retry_after_ms
            body = _error_body(fault.status, fault.message, key=record.api_key)
            return await self._send_json(conn, record, fault.status, body, extra)
        if self.api_key is not None and record.api_key != self.api_key:
            refusal = _error_body(401, None, key=record.api_key)
            return await self._send_json(conn, record, 401, refusal)
        problem = _check_chat(record.body) if handler == self._chat else _check_speech(record.body)
        if problem is not None:
            return await self._send_json(conn, record, 400, _error_body(400, problem))
        return await handler(conn, record, fault)

    def _reply_text(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self.reply(messages) if callable(self.reply) else self.reply

    async def _chat(self, conn: _Connection, record: RecordedRequest, fault: Fault | None) -> bool:
        body = record.body
        messages = body["messages"]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        tokens = tokenize(self._reply_text(messages))
        finish = "length" if limit is not None and len(tokens) > limit else "stop"
        tokens = tokens[:limit] if limit is not None else tokens
        usage = {
            "prompt_tokens": sum(len(tokenize(str(m.get("content") or ""))) for m in messages),
            "completion_tokens": len(tokens),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        usage.update(self.usage)
        base = {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            if not await conn.pause(self.latency.ttft_s + self.latency.token_s * len(tokens)):
                return False
            message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            payload = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return await self._send_json(conn, record, 200, payload)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base["object"] = "chat.completion.chunk"
        if include_usage:
            base["usage"] = None

        def frame(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _sse({**base, "choices": [choice]})

        record.status = 200
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "transfer-encoding": "chunked",
            "cache-control": "no-cache",
            "x-request-id": f"req_fake_{record.index}",
        }
        if not await self._send(conn, record, _head(200, headers)):
            return False
        if not await conn.pause(self.latency.ttft_s):
            return False
        if not await conn.write(frame({"role": "assistant", "content": "", "refusal": None})):
            return False
        for i, token in enumerate(tokens):
            if i and not await conn.pause(self.latency.token_s):
                return False
            if fault is not None and fault.kind == "reset_after" and i == fault.count:
                return await self._reset(conn, record)
            if fault is not None and fault.kind == "malformed" and i == min(2, len(tokens) - 1):
                await conn.write(_chunk(b'data: {"id": "chatcmpl-broken", "choices": [{"delta\n\n'))
                self._event(record, "malformed_sent")
            if not await conn.write(frame({"content": token})):
                return False
            self._event(record, "chat_first_token" if i == 0 else "chat_token_sent")
        if fault is not None and fault.kind == "reset_after":
            return await self._reset(conn, record)
        tail = frame({}, finish)
        if include_usage:
            tail += _sse({**base, "choices": [], "usage": usage})
        tail += _chunk(b"data: [DONE]\n\n") + _LAST_CHUNK
        if not await conn.write(tail):
            return False
        record.finished_at = self._event(record, "chat_done")
        return True

    async def _speech(
        self, conn: _Connection, record: RecordedRequest, fault: Fault | None
    ) -> bool:
        body = record.body
        loop = asyncio.get_running_loop()
        if not await conn.pause(self.latency.tts_first_byte_s):
            return False
        record.status = 200
        headers = {"transfer-encoding": "chunked", "x-request-id": f"req_fake_{record.index}"}
        if fault is not None and fault.kind == "malformed":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            headers["content-type"] = "text/html; charset=utf-8"
            sent = await self._send(conn, record, _head(200, headers) + _chunk(page) + _LAST_CHUNK)
            record.finished_at = self._event(record, "tts_done")
            return sent
        headers["content-type"] = "audio/pcm"
        speed = float(body.get("speed") or 1.0)
        samples = round(pcm_duration_s(body["input"], speed) * SAMPLE_RATE)
        pcm = bytes(SAMPLE_RATE * self.leading_silence_ms // 1000 * 2) + voice_pcm(samples)
        step = SAMPLE_RATE * CHUNK_MS // 1000 * 2
        if not await self._send(conn, record, _head(200, headers)):
            return False
        started = loop.time()
        for i, offset in enumerate(range(0, len(pcm), step)):
            if fault is not None and fault.kind == "reset_after" and i == fault.count:
                return await self._reset(conn, record)
            due = started + i * CHUNK_MS / 1000 * self.latency.tts_rtf
            if not await conn.pause(due - loop.time()):
                return False
            if not await conn.write(_chunk(pcm[offset : offset + step])):
                return False
            self._event(record, "tts_first_byte" if i == 0 else "tts_chunk_sent")
        if fault is not None and fault.kind == "reset_after":
            return await self._reset(conn, record)
        if not await conn.write(_LAST_CHUNK):
            return False
        record.finished_at = self._event(record, "tts_done")
        return True

    async def _reset(self, conn: _Connection, record: RecordedRequest) -> bool:
        await conn.flush()
        record.finished_at = self._event(record, "reset")
        conn.abort()
        return False


def _json_headers(body: bytes, *, close: bool = False) -> dict[str, str]:
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    if close:
        headers["connection"] = "close"
    return headers


def _check_chat(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return "each message needs a 'role'"
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            return f"'{name}' must be a positive integer"
    return None


def _check_speech(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    for name in ("model", "input"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"'{name}' is required and must be a non-empty string"
    voice = body.get("voice")
    if not (isinstance(voice, str) and voice) and not (isinstance(voice, dict) and "id" in voice):
        return "'voice' is required"
    if body.get("response_format") != "pcm":
        return "this fake only speaks response_format 'pcm'"
    speed = body.get("speed", 1.0)
    if not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
        return "'speed' must be between 0.25 and 4.0"
    return None


# Command line


async def _serve_forever(fake: Any, title: str) -> None:
    async with fake:
        # A benchmark's upstream: keep start-up's heap out of full collections' pauses.
        gc.collect()
        gc.freeze()
        print(f"{title} on {fake.base_url} ({fake.latency})", flush=True)
        await asyncio.Event().wait()


def serve_from_command_line(
    make: Callable[..., Any], argv: Sequence[str] | None, *, prog: str, port: int, title: str
) -> None:
    """Parse the fakes' common options, build the fake with *make* and serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--ttft-ms", type=float, default=200.0, help="time to the first token")
    parser.add_argument("--token-ms", type=float, default=20.0, help="delay between tokens")
    parser.add_argument("--tts-first-byte-ms", type=float, default=150.0)
    parser.add_argument("--tts-rtf", type=float, default=0.2, help="speech real-time factor")
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="the reply text")
    parser.add_argument("--api-key", default=None, help="refuse other bearer tokens with 401")
    parser.add_argument(
        "--leading-silence-ms", type=int, default=0, help="silence before each speech response"
    )
    args = parser.parse_args(argv)
    extra = {"leading_silence_ms": args.leading_silence_ms} if args.leading_silence_ms else {}
    latency = Latency(
        ttft_s=args.ttft_ms / 1000,
        token_s=args.token_ms / 1000,
        tts_first_byte_s=args.tts_first_byte_ms / 1000,
        tts_rtf=args.tts_rtf,
    )
    fake = make(
        latency=latency,
        reply=args.reply,
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        keep_history=False,
        **extra,
    )
    # uvloop, as voxrelay runs: the fake shares a core with the benchmark's load generator.
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as r,
    ):
        r.run(_serve_forever(fake, title))


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the fake until Ctrl-C."""
    serve_from_command_line(
        FakeOpenAI,
        argv,
        prog="python -m fakes.openai_upstream",
        port=8000,
        title="fake OpenAI upstream",
    )


if __name__ == "__main__":
    main()
