"""The OpenAI-compatible speech door: ``POST /v1/audio/speech`` and friends on aiohttp.

A thin translation, like the other doors: OpenAI's request body in, a speak-mode
:class:`~voxrelay.service.model.SynthesisRequest` to the core's
:class:`~voxrelay.service.relay.Relay`, the stream's audio back out as a chunked body
(``stream_format: audio``) or as OpenAI's Server-Sent Events (``sse``). Core errors become
OpenAI's error body with the status an OpenAI client expects
(:data:`voxrelay.gateways.errors.HTTP_STATUS`).

The status line and headers wait for the first audio: a request that fails before any
audio gets its proper status. A failure after that can only end the body: a chunked body
is cut off (the transport is aborted, so the client sees a truncated body, never a short
file that looks whole); an SSE body gets an ``error`` event.

aiohttp cancels a handler whose client disconnects (``handler_cancellation``), and the
relay then closes the stream's upstream calls.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import math
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from voxrelay.service import metrics, model
from voxrelay.service.auth import KeyStore, TrustedProxies, bearer_token, client_key
from voxrelay.service.errors import InvalidRequest, TooLarge, VoxrelayError
from voxrelay.service.relay import ClientGone, Relay
from voxrelay.service.settings import Settings

from .errors import HTTP_STATUS

__all__ = ["HttpDoor", "SpeechCall", "error_body", "parse_speech"]

log = logging.getLogger(__name__)

SPEECH_PATH = "/v1/audio/speech"
#: OpenAI's built-in voices: an engine without one of them speaks in its default voice.
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
     "sage", "shimmer", "verse"}
)  # fmt: skip
#: OpenAI's speech models: accepted in ``model`` and listed, whatever engine speaks.
OPENAI_SPEECH_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
FORMATS = {fmt.value: fmt for fmt in model.AudioFormat}
#: OpenAI's ``pcm`` is 24 kHz s16le mono whatever the engine's rate.
PCM_RATE = 24_000
STREAM_FORMATS = ("audio", "sse")

# Timeouts
#: The whole request body must arrive within this (a slow client holds no handler longer).
BODY_TIMEOUT_S = 10.0
#: How long stop() lets handlers whose stream the core just aborted write their end.
FINAL_WRITE_GRACE_S = 2.0

# Limits
#: Body bytes allowed per character of input and instructions: a JSON escape of an
#: astral character (a surrogate pair, ``\\ud83d\\ude00``) takes 12.
BODY_BYTES_PER_CHAR = 12
#: Room for the rest of the body (model, voice, format, ...).
BODY_SLACK = 16 * 1024


# The request


class BadParam(InvalidRequest):
    """A field of the request body is missing or wrong; ``param`` names it."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SpeechCall:
    """A decoded ``POST /v1/audio/speech``."""

    request: model.SynthesisRequest
    #: the ``model`` the client named (accepted whatever it is; the engine speaks).
    model: str
    #: ``audio`` (the bytes, chunked) or ``sse`` (OpenAI's speech events).
    stream_format: str


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "a number" if kind == (int, float) else "a string"
        raise BadParam(f"'{name}' must be {expected}", name)
    return value


def parse_speech(body: Any, request_id: str) -> SpeechCall:
    """Translate OpenAI's speech request body, refusing what is not OpenAI's shape."""
    if not isinstance(body, dict):
        raise BadParam("the body must be a JSON object (OpenAI's speech request)", None)
    text = body.get("input")
    if not isinstance(text, str):
        raise BadParam("'input' is required: a string, the text to speak", "input")
    model_name = _field(body, "model", str, "")
    voice = body.get("voice")
    if isinstance(voice, dict):  # a custom voice: {"id": "..."}
        voice = voice.get("id")
        if not isinstance(voice, str):
            raise BadParam("'voice' as an object needs a string 'id'", "voice")
    elif voice is None:
        voice = ""
    elif not isinstance(voice, str):
        raise BadParam("'voice' must be a voice name or {\"id\": name}", "voice")
    fmt_name = _field(body, "response_format", str, "mp3")
    fmt = FORMATS.get(fmt_name)
    if fmt is None:
        raise BadParam(
            f"response_format {fmt_name[:20]!r} is not one of {', '.join(FORMATS)}",
            "response_format",
        )
    speed = _field(body, "speed", (int, float), 1.0)
    if not math.isfinite(speed) or speed <= 0:
        raise BadParam(f"speed {speed!r} is out of range 0.25–4", "speed")
    instructions = _field(body, "instructions", str, "")
    stream_format = _field(body, "stream_format", str, "audio")
    if stream_format not in STREAM_FORMATS:
        raise BadParam(
            f"stream_format {stream_format[:20]!r} is not one of audio, sse", "stream_format"
        )
    normalization = _field(body, "normalization", str, "")
    if normalization not in ("", "on", "off"):
        raise BadParam('\'normalization\' must be "on" or "off"', "normalization")
    word_timestamps = body.get("word_timestamps", False)
    if not isinstance(word_timestamps, bool):
        raise BadParam("'word_timestamps' must be true or false", "word_timestamps")
    request = model.SynthesisRequest(
        text=text,
        mode=model.Mode.SPEAK,
        voice=voice,
        format=fmt,
        sample_rate_hz=PCM_RATE if fmt is model.AudioFormat.PCM else 0,
        instructions=instructions,
        speed=float(speed),
        request_id=request_id,
        # Word timings travel only in SSE bodies (an event type OpenAI's clients skip).
        word_timestamps=word_timestamps and stream_format == "sse",
        normalization=None if not normalization else normalization == "on",
    )
    return SpeechCall(request, model_name, stream_format)


# Errors


def error_body(error: VoxrelayError) -> dict[str, Any]:
    """Return OpenAI's error object for *error* (``{"message", "type", "param", "code"}``)."""
    _, kind = HTTP_STATUS.get(error.code, (500, "server_error"))
    return {
        "message": error.message,
        "type": kind,
        "param": getattr(error, "param", None),
        "code": error.code,
    }


def error_response(error: VoxrelayError, *, request_id: str | None = None) -> web.Response:
    """Answer *error* with its status, OpenAI's body and, where a wait helps, the wait."""
    status, _ = HTTP_STATUS.get(error.code, (500, "server_error"))
    headers: dict[str, str] = {}
    if request_id:
        headers["X-Request-Id"] = request_id
    wait = error.retry_after_s  # clamped by the error itself
    if wait is not None:
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
        # OpenAI's SDKs prefer this one: the exact wait.
        headers["Retry-After-Ms"] = str(round(wait * 1000))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response({"error": error_body(error)}, status=status, headers=headers)


def _plain_error(status: int, message: str, code: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's own refusals (unknown path, wrong method) in OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "invalid_request")
        response = _plain_error(exc.status, f"{exc.reason}: {request.method} {request.path}", code)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


# The response


class _SpeechBody:
    """Write one stream as a response body; the headers go out with the first audio.

    ``sse`` wraps each audio chunk in a ``speech.audio.delta`` event and ends with
    ``speech.audio.done``; ``audio`` writes the bytes as they come, chunked.
    """

    def __init__(
        self, request: web.Request, request_id: str, peer: str, *, sse: bool, send_stall_s: float
    ) -> None:
        self._request = request
        self._request_id = request_id
        self._peer = peer
        self._sse = sse
        self._stall = send_stall_s or None
        self.started: model.StreamStarted | None = None
        self.response: web.StreamResponse | None = None

    async def send(
        self,
        event: model.StreamStarted | model.SegmentStarted | model.AudioChunk | model.WordTimings,
    ) -> None:
        if isinstance(event, model.StreamStarted):
            self.started = event
        elif isinstance(event, model.WordTimings):
            words = [dataclasses.asdict(word) for word in event.words]
            await self._write(
                _sse(
                    {
                        "type": "voxrelay.words",
                        "segment_index": event.segment_index,
                        "estimated": event.estimated,
                        "words": words,
                    }
                )
            )
        elif isinstance(event, model.AudioChunk):
            if self._sse:
                payload = base64.b64encode(event.data).decode("ascii")
                await self._write(_sse({"type": "speech.audio.delta", "audio": payload}))
            else:
                await self._write(event.data)

    async def finish(self, finished: model.StreamFinished) -> web.StreamResponse:
        """End the body after the last audio (the SSE body with ``speech.audio.done``)."""
        if self._sse:
            usage = {
                "input_tokens": finished.prompt_tokens,
                "output_tokens": finished.completion_tokens,
                "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            }
            done = {"type": "speech.audio.done", "usage": usage, "voxrelay": _figures(finished)}
            await self._write(_sse(done))
        response = await self._open()
        await self._guarded(response.write_eof())
        return response

    async def fail(self, error: VoxrelayError) -> web.StreamResponse:
        """Put *error* on the wire: as the response, or as the end of a started body."""
        response = self.response
        if response is None:
            return error_response(error, request_id=self._request_id)
        if self._sse:
            await self._write(_sse({"type": "error", "error": error_body(error)}))
            await self._guarded(response.write_eof())
        else:
            # The audio so far is a valid prefix; only a cut-off body says it is not all.
            transport = self._request.transport
            if transport is not None:
                transport.abort()
        return response

    async def _open(self) -> web.StreamResponse:
        if self.response is not None:
            return self.response
        started = self.started
        response = web.StreamResponse(status=200)
        headers = response.headers
        headers["X-Request-Id"] = self._request_id
        if self._sse:
            headers["Content-Type"] = "text/event-stream"
            headers["Cache-Control"] = "no-cache"
        elif started is not None:
            headers["Content-Type"] = started.content_type
        if started is not None:
            headers["X-Voxrelay-Model"] = started.tts_model
            headers["X-Voxrelay-Voice"] = started.voice
            headers["X-Voxrelay-Audio-Type"] = started.content_type
            headers["X-Voxrelay-Sample-Rate"] = str(started.sample_rate_hz)
        response.enable_chunked_encoding()
        self.response = response
        await self._guarded(response.prepare(self._request))
        return response

    async def _write(self, data: bytes) -> None:
        response = await self._open()
        await self._guarded(response.write(data))

    async def _guarded(self, write: Awaitable[Any]) -> None:
        """Await a write; a client that left or stopped reading is :class:`ClientGone`."""
        try:
            async with asyncio.timeout(self._stall):
                await write
        except TimeoutError:
            log.warning(
                "dropping a client that stopped reading",
                extra={"event": "http_send_stall", "peer": self._peer, "send_stall_s": self._stall},
            )
            transport = self._request.transport
            if transport is not None:
                transport.abort()
            raise ClientGone from None
        except ConnectionError:
            raise ClientGone from None


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _figures(finished: model.StreamFinished) -> dict[str, int]:
    """voxrelay's own figures of a stream, beside OpenAI's usage (clients ignore them)."""
    return {
        "segments": finished.segments,
        "audio_bytes": finished.audio_bytes,
        "audio_ms": finished.audio_ms,
        "time_to_first_audio_ms": finished.time_to_first_audio_ms,
        "total_ms": finished.total_ms,
        "tts_first_byte_ms": finished.tts_first_byte_ms,
    }


# The door


class HttpDoor:
    """The aiohttp server: OpenAI's speech, voices and models endpoints."""

    def __init__(self, settings: Settings, relay: Relay, keys: KeyStore) -> None:
        self.settings = settings
        self.relay = relay
        self.keys = keys
        self.proxies = TrustedProxies.from_settings(settings)
        self.port = 0
        self.body_limit = BODY_BYTES_PER_CHAR * 2 * settings.max_input_chars + BODY_SLACK
        self._runner: web.AppRunner | None = None
        self._created = int(time.time())
        #: OpenAI voice names already reported as spoken in the default voice.
        self._mapped: set[str] = set()

    async def start(self, *, reuse_port: bool = False) -> None:
        """Bind ``host:http_port`` and start serving."""
        s = self.settings
        app = web.Application(client_max_size=self.body_limit, middlewares=[_openai_errors])
        app.router.add_post(SPEECH_PATH, self._speech)
        app.router.add_get("/v1/audio/voices", self._voices)
        app.router.add_get("/v1/audio/models", self._speech_models)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        context: ssl.SSLContext | None = None
        if s.tls_cert and s.tls_key:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(s.tls_cert, s.tls_key)
        runner = web.AppRunner(
            app,
            # A client that disconnects cancels its handler, and so its stream.
            handler_cancellation=True,
            access_log=None,  # every stream logs one line of its own
            shutdown_timeout=FINAL_WRITE_GRACE_S,
        )
        await runner.setup()
        self._runner = runner
        # With workers, each binds the supervisor's port beside the others (SO_REUSEPORT).
        site = web.TCPSite(
            runner, s.host, s.http_port or 0, ssl_context=context, reuse_port=reuse_port or None
        )
        await site.start()
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listener and connections; handlers get a moment to write their end."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Who is calling

    def _client(self, request: web.Request) -> tuple[str, str]:
        """Return (peer for logs, client address) of *request*."""
        transport = request.transport
        address = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(address, tuple) and len(address) >= 2:
            host, port = str(address[0]), int(address[1])
        else:
            host, port = str(address or "unknown"), None
        client_ip = self.proxies.client_ip(host, request.headers.getall("X-Forwarded-For", []))
        if client_ip != host or port is None:
            return client_ip, client_ip
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), client_ip

    def _caller(self, request: web.Request, client_ip: str) -> str | None:
        """Authenticate; return whom per-caller limits count (the key, else the address)."""
        values = request.headers.getall("Authorization", [])
        token = bearer_token(values[0]) if len(values) == 1 else None
        key = self.keys.authenticate(token)
        return key if key is not None else client_key(client_ip)

    # Endpoints

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        peer, client_ip = self._client(request)
        header_id = request.headers.get("X-Request-Id", "")
        request_id = header_id[:128] if header_id else uuid.uuid4().hex
        try:
            self.relay.check_open()  # a draining process refuses first
            caller = self._caller(request, client_ip)
            call = parse_speech(await self._json(request), request_id)
            core = replace(call.request, voice=await self._voice(call.request.voice))
        except VoxrelayError as exc:
            self.relay.refuse("http", peer, exc, request_id=request_id, mode=model.Mode.SPEAK)
            return self._refusal(request, exc, request_id)
        run = self.relay.open("http", peer, core, caller=caller)
        # This handler is cancelled only when its client disconnects (or the server stops).
        run.cancel_reason = "disconnect"
        body = _SpeechBody(
            request,
            request_id,
            peer,
            sse=call.stream_format == "sse",
            send_stall_s=self.settings.send_stall_s,
        )
        try:
            finished = await run.relay(body)
        except VoxrelayError as exc:
            if body.response is None:
                return self._refusal(request, exc, request_id)
            return await _ended(body.fail(exc), body)
        except ClientGone:
            return body.response or web.Response(status=499)
        return await _ended(body.finish(finished), body)

    async def _voices(self, request: web.Request) -> web.StreamResponse:
        try:
            self._caller(request, self._client(request)[1])
        except VoxrelayError as exc:
            metrics.ERRORS.labels("http", exc.code).inc()
            return error_response(exc)
        language = request.query.get("language", "")
        voices = await self.relay.synthesizer.voices(language)
        # "id" beside SPEC's fields: speech UIs (Open WebUI) key their voice lists by it.
        return web.json_response(
            {"voices": [{"id": v.name, "name": v.name, "language": v.language} for v in voices]}
        )

    async def _speech_models(self, request: web.Request) -> web.StreamResponse:
        """List the speech models as speech UIs ask for them (``{"models": [{"id"}]}``)."""
        try:
            self._caller(request, self._client(request)[1])
        except VoxrelayError as exc:
            metrics.ERRORS.labels("http", exc.code).inc()
            return error_response(exc)
        return web.json_response({"models": [{"id": m} for m in self._model_ids()]})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        try:
            self._caller(request, self._client(request)[1])
        except VoxrelayError as exc:
            metrics.ERRORS.labels("http", exc.code).inc()
            return error_response(exc)
        return web.json_response(
            {"object": "list", "data": [self._model_object(m) for m in self._model_ids()]}
        )

    async def _model(self, request: web.Request) -> web.StreamResponse:
        try:
            self._caller(request, self._client(request)[1])
        except VoxrelayError as exc:
            metrics.ERRORS.labels("http", exc.code).inc()
            return error_response(exc)
        name = request.match_info["model"]
        if name not in self._model_ids():
            return _plain_error(404, f"the model {name[:64]!r} does not exist here", "not_found")
        return web.json_response(self._model_object(name))

    # Helpers

    def _model_ids(self) -> list[str]:
        """The configured speech model first, then OpenAI's names it answers to."""
        speech = self.relay.synthesizer.engines.speech.model
        return list(dict.fromkeys((speech, *OPENAI_SPEECH_MODELS)))

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "voxrelay"}

    async def _json(self, request: web.Request) -> Any:
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                raw = await request.read()
        except TimeoutError:
            raise InvalidRequest(
                f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise TooLarge(
                f"the request body is over {self.body_limit} bytes: shorten 'input'"
            ) from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadParam("the body is not valid JSON", None) from None

    async def _voice(self, voice: str) -> str:
        """Map an OpenAI voice name the engine lacks to the engine's default (``""``)."""
        if voice.lower() not in OPENAI_VOICES:
            return voice
        engine = self.relay.synthesizer.engines.speech
        if not engine.validates_voices:
            return voice  # the engine takes any name: an OpenAI-compatible upstream
        known = {v.name.lower() for v in await self.relay.synthesizer.voices()}
        if voice.lower() in known:
            return voice
        if voice.lower() not in self._mapped:
            self._mapped.add(voice.lower())
            log.info(
                "OpenAI voice %s speaks in the engine's default voice %s",
                voice.lower(),
                engine.default_voice,
                extra={
                    "event": "voice_mapped",
                    "voice": voice.lower(),
                    "engine_voice": engine.default_voice,
                },
            )
        return ""

    def _refusal(self, request: web.Request, error: VoxrelayError, request_id: str) -> web.Response:
        response = error_response(error, request_id=request_id)
        if self.relay.synthesizer.runtime.draining:
            response.force_close()  # a keep-alive client moves to another replica
        return response


async def _ended(ending: Awaitable[web.StreamResponse], body: _SpeechBody) -> web.StreamResponse:
    """Await the end of a body whose client may be gone by now."""
    try:
        return await ending
    except ClientGone:
        return body.response or web.Response(status=499)
