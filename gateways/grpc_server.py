"""The gRPC door: ``voxrelay.v1.Synthesizer`` on grpc.aio, plus health and reflection.

A thin translation: protobuf messages in, :mod:`voxrelay.service.model` types to the core,
core events back out as protobuf, core errors as rich statuses; the translation itself is
:mod:`voxrelay.gateways.grpc_codec`, which the client shares.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc  # channelz's queries (what grpcio-channelz wraps)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from voxrelay.service import metrics, model
from voxrelay.service.auth import KeyStore, bearer_token, client_key
from voxrelay.service.errors import InvalidRequest, VoxrelayError
from voxrelay.service.relay import ClientGone, Relay
from voxrelay.service.settings import Settings
from voxrelay.service.text_input import TextInput
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

from .grpc_codec import MODES, stream_config, to_request, to_response, to_status

__all__ = ["GrpcDoor"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Synthesizer"].full_name


class _GrpcSink:
    """Write a stream's events as ``SynthesizeResponse`` messages.

    A client that takes no message for ``send_stall_s`` is gone as far as the stream is
    concerned (:class:`SendStalled`): its slot and its upstream calls are freed. A write
    to a call that ended under it (the client cancelled, its connection dropped) is
    :class:`ClientGone` too: grpc cancels the handler's task for that, but the write's
    own failure can reach the task first.
    """

    def __init__(
        self,
        context: grpc.aio.ServicerContext[pb.SynthesizeRequest, pb.SynthesizeResponse],
        *,
        peer: str,
        stall_s: float,
    ) -> None:
        self._context = context
        self._peer = peer
        self._stall_s = stall_s

    async def send(self, event: model.Event) -> None:
        await self.write(to_response(event))

    async def write(self, message: pb.SynthesizeResponse) -> None:
        try:
            if not self._stall_s:
                await self._context.write(message)
                return
            async with asyncio.timeout(self._stall_s):
                await self._context.write(message)
        except cygrpc.ExecuteBatchError:
            raise ClientGone from None
        except TimeoutError:
            log.warning(
                "dropping a client that stopped reading",
                extra={
                    "event": "grpc_send_stall",
                    "peer": self._peer,
                    "send_stall_s": self._stall_s,
                },
            )
            raise SendStalled from None


async def _unless_gone(abort: Awaitable[None]) -> None:
    """Await *abort* (grpc's, which raises AbortError) unless the call ended under it.

    A call whose client is gone takes no status; grpc would log the failed send as an
    error of the servicer.
    """
    try:
        await abort
    except cygrpc.ExecuteBatchError:
        return


class SendStalled(ClientGone):
    """The client read nothing for ``send_stall_s``: its call is ended for it."""


class SynthesizerService(pb_grpc.SynthesizerServicer):
    """``voxrelay.v1.Synthesizer`` over the core."""

    def __init__(self, relay: Relay, keys: KeyStore, *, send_stall_s: float) -> None:
        self.relay = relay
        self.keys = keys
        self.send_stall_s = send_stall_s

    async def Synthesize(
        self,
        request: pb.SynthesizeRequest,
        context: grpc.aio.ServicerContext[pb.SynthesizeRequest, pb.SynthesizeResponse],
    ) -> None:
        # Read the peer now: grpcio has crashed reading it after the client cancelled.
        peer = _peer(context.peer())
        metadata = {k: v for k, v in (context.invocation_metadata() or ())}
        header_id = metadata.get("x-request-id", "")
        # The client's id (the field, else x-request-id), else ours: every log line has one.
        request_id = request.request_id or (
            header_id[:128] if isinstance(header_id, str) and header_id else uuid.uuid4().hex
        )
        remaining = context.time_remaining()
        deadline = asyncio.get_running_loop().time() + remaining if remaining is not None else None
        try:
            # The interceptor refused bad keys already; this names the caller for limits.
            caller = self.keys.authenticate(_token(metadata.items()))
            core_request = to_request(request, request_id)
        except VoxrelayError as exc:
            mode = MODES.get(request.mode, model.Mode.CHAT)
            self.relay.refuse("grpc", peer, exc, request_id=request_id, mode=mode)
            await _unless_gone(context.abort_with_status(to_status(exc)))
            return
        await self._relay(context, peer, core_request, caller, deadline)

    async def _relay(
        self,
        context: grpc.aio.ServicerContext[Any, pb.SynthesizeResponse],
        peer: str,
        core_request: model.SynthesisRequest,
        caller: str | None,
        deadline: float | None,
    ) -> None:
        """Run one stream into the call, and end the call with its outcome's status."""
        # Open, gRPC callers are only counted in the global caps, but they still take
        # turns at shared resources by address.
        share = caller or client_key(_host(peer))
        run = self.relay.open(
            "grpc", peer, core_request, caller=caller, deadline=deadline, share=share
        )
        sink = _GrpcSink(context, peer=peer, stall_s=self.send_stall_s)
        try:
            finished = await run.relay(sink)
            await sink.write(to_response(finished))
        except VoxrelayError as exc:
            await _unless_gone(context.abort_with_status(to_status(exc)))
        except SendStalled:
            # The stream is over for us; the status follows what the client has not read.
            await _unless_gone(
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"dropped: the client read nothing for {self.send_stall_s:g} s",
                )
            )
        except ClientGone:
            return  # the call has ended: nothing more can reach the client

    async def SynthesizeStream(
        self,
        requests: AsyncIterator[pb.SynthesizeStreamRequest | _Undecodable],
        context: grpc.aio.ServicerContext[pb.SynthesizeStreamRequest, pb.SynthesizeResponse],
    ) -> None:
        peer = _peer(context.peer())
        metadata = {k: v for k, v in (context.invocation_metadata() or ())}
        header_id = metadata.get("x-request-id", "")
        request_id = (
            header_id[:128] if isinstance(header_id, str) and header_id else uuid.uuid4().hex
        )
        remaining = context.time_remaining()
        deadline = asyncio.get_running_loop().time() + remaining if remaining is not None else None
        messages = aiter(requests)
        text_input = self.relay.text_input()
        try:
            caller = self.keys.authenticate(_token(metadata.items()))
            config = await _first_config(messages, text_input.idle_s)
            core_request = stream_config(config, request_id, text_input)
        except VoxrelayError as exc:
            self.relay.refuse("grpc", peer, exc, request_id=request_id, mode=model.Mode.SPEAK)
            await _unless_gone(context.abort_with_status(to_status(exc)))
            return
        reader = asyncio.create_task(_read_input(messages, text_input), name="grpc-input")
        try:
            await self._relay(context, peer, core_request, caller, deadline)
        finally:
            reader.cancel()
            await asyncio.wait([reader])

    async def ListVoices(
        self,
        request: pb.ListVoicesRequest,
        context: grpc.aio.ServicerContext[pb.ListVoicesRequest, pb.ListVoicesResponse],
    ) -> pb.ListVoicesResponse:
        voices = await self.relay.synthesizer.voices(request.language)
        return pb.ListVoicesResponse(
            voices=[pb.Voice(name=v.name, language=v.language) for v in voices]
        )


async def _first_config(
    messages: AsyncIterator[pb.SynthesizeStreamRequest | _Undecodable], idle_s: float
) -> pb.SynthesizeStreamConfig:
    """Read a ``SynthesizeStream`` call's first message, which must be its ``config``."""
    try:
        async with asyncio.timeout(idle_s or None):
            first = await anext(messages)
    except StopAsyncIteration:
        raise InvalidRequest("SynthesizeStream needs a config message first") from None
    except TimeoutError:
        raise InvalidRequest(
            f"no config message within {idle_s:g} s (VOXRELAY_INPUT_IDLE_S)"
        ) from None
    if isinstance(first, _Undecodable):
        raise _undecodable_error()
    if first.WhichOneof("input") != "config":
        raise InvalidRequest(
            "SynthesizeStream needs a config message first, then text pieces and flushes"
        )
    return first.config


async def _read_input(
    messages: AsyncIterator[pb.SynthesizeStreamRequest | _Undecodable], text_input: TextInput
) -> None:
    """Put a call's text pieces and flushes into *text_input*; the half-close ends it."""
    async for message in messages:
        if isinstance(message, _Undecodable):
            text_input.fail(_undecodable_error())
            return
        match message.WhichOneof("input"):
            case "text":
                text_input.append(message.text)
            case "flush":
                text_input.flush()
            case "config":
                text_input.fail(InvalidRequest("config comes once, as the first message"))
                return
            case _:
                text_input.fail(
                    InvalidRequest("a SynthesizeStreamRequest sets one of config, text or flush")
                )
                return
    text_input.end()


# Connections
#: Ping a connection this often, and drop it when the ping is not answered in time:
#: a peer that vanished without a FIN (a dead host, a dropped route) is found.
KEEPALIVE_S = 20.0
KEEPALIVE_TIMEOUT_S = 20.0
#: Clients may ping this often without calls in flight (grpc's default is 5 min).
CLIENT_PING_MIN_S = 10.0
#: A connection lives this long at most (clients reconnect, so load spreads anew) ...
MAX_CONNECTION_AGE_S = 1800.0
#: ... and its calls then get this long to finish (a stream of the longest audio).
MAX_CONNECTION_AGE_GRACE_S = 660.0


def _connection_options(settings: Settings) -> list[tuple[str, int]]:
    """grpc's connection management: keepalive, and idle and old connections closed."""
    options = [
        ("grpc.keepalive_time_ms", round(KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", round(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", round(CLIENT_PING_MIN_S * 1000)),
        ("grpc.max_connection_age_ms", round(MAX_CONNECTION_AGE_S * 1000)),
        ("grpc.max_connection_age_grace_ms", round(MAX_CONNECTION_AGE_GRACE_S * 1000)),
    ]
    if settings.idle_timeout_s:
        options.append(("grpc.max_connection_idle_ms", round(settings.idle_timeout_s * 1000)))
    return options


def _channelz_servers() -> set[int]:
    """The ids of this process's gRPC servers in channelz (grpc's own introspection)."""
    page = json.loads(cygrpc.channelz_get_servers(0))
    return {int(server["ref"]["serverId"]) for server in page.get("server", [])}


def _host(peer: str) -> str:
    """The address part of a peer named as :func:`_peer` names it."""
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return peer
    return host.strip("[]")


def _peer(peer: str) -> str:
    """Name a gRPC peer as the WebSocket door does: ``ipv4:1.2.3.4:5`` → ``1.2.3.4:5``."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            return peer.removeprefix(prefix)
    return peer


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _token(metadata: Any) -> str | None:
    """Return the bearer token of ``authorization`` metadata (pairs), if any."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    return bearer_token(values[0])


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse every ``voxrelay.v1.Synthesizer`` call without a valid API key.

    Health and reflection stay open: probes and tools carry no key.
    """

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not self.keys.required or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        try:
            self.keys.authenticate(_token(details.invocation_metadata))
        except VoxrelayError as exc:
            metrics.ERRORS.labels("grpc", exc.code).inc()
            log.info(
                "refused a call without a valid API key",
                extra={"event": "grpc_unauthorized", "method": method},
            )
            return _refusal(handler, exc)
        return handler


def _refusal(
    handler: grpc.RpcMethodHandler[_Req, _Resp], error: VoxrelayError
) -> grpc.RpcMethodHandler[_Req, _Resp]:
    """Return a handler of *handler*'s kind that ends the call with *error*'s status."""
    status = to_status(error)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort_with_status(status)

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort_with_status(status)
        yield  # pragma: no cover - abort raises; this makes a generator

    codec: dict[str, Any] = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    match handler.request_streaming, handler.response_streaming:
        case False, False:
            return grpc.unary_unary_rpc_method_handler(unary, **codec)
        case False, True:
            return grpc.unary_stream_rpc_method_handler(streaming, **codec)
        case True, False:
            return grpc.stream_unary_rpc_method_handler(unary, **codec)
    return grpc.stream_stream_rpc_method_handler(streaming, **codec)


class _Undecodable:
    """A request message that could not be parsed (e.g. a string field not UTF-8)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Refuse a request message that does not parse with ``INVALID_ARGUMENT``.

    grpc.aio answers a deserializer's exception with ``UNKNOWN`` and its repr; a string
    field that is not UTF-8 (a lone surrogate, say) is bad input like any other. The
    deserializer hands the failure on as a value and the method answers it.
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def decode(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as exc:
                return _Undecodable(str(exc))

        codec: dict[str, Any] = dict(
            request_deserializer=decode, response_serializer=handler.response_serializer
        )
        if handler.request_streaming:
            # The method reads the messages itself and refuses an undecodable one.
            if handler.stream_stream is None:
                return handler
            return grpc.stream_stream_rpc_method_handler(handler.stream_stream, **codec)
        method = handler.unary_stream if handler.response_streaming else handler.unary_unary
        assert method is not None
        if handler.response_streaming and inspect.isasyncgenfunction(method):
            generate = method

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _refuse_undecodable(request, context)
                async for response in generate(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(streaming, **codec)

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse_undecodable(request, context)
            return await method(request, context)

        if handler.response_streaming:  # a method that writes its responses itself
            return grpc.unary_stream_rpc_method_handler(unary, **codec)
        if handler.response_streaming:  # a method that writes its responses itself
            return grpc.unary_stream_rpc_method_handler(unary, **codec)
        return grpc.unary_unary_rpc_method_handler(unary, **codec)


def _undecodable_error() -> InvalidRequest:
    return InvalidRequest(
        "the request message is not valid protobuf; string fields must be valid UTF-8"
        " (no lone surrogates)"
    )


async def _refuse_undecodable(
    request: _Undecodable, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    error = _undecodable_error()
    metrics.ERRORS.labels("grpc", error.code).inc()
    await context.abort_with_status(to_status(error))


class GrpcDoor:
    """The grpc.aio server with the Synthesizer, health and (optionally) reflection."""

    def __init__(
        self, settings: Settings, relay: Relay, keys: KeyStore, *, reuse_port: bool = False
    ) -> None:
        """*reuse_port*: share the port with other workers (SO_REUSEPORT); else own it."""
        self.settings = settings
        limit = settings.ws_max_message_bytes or -1
        known = _channelz_servers()
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(keys), DecodeInterceptor()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", int(reuse_port)),
                *_connection_options(settings),
            ],
        )
        # The server channelz registered just now is ours: its sockets are our connections.
        ours = _channelz_servers() - known
        self._channelz_id = min(ours) if len(ours) == 1 else None
        metrics.GRPC_CONNECTIONS.set_function(self.connections)
        service = SynthesizerService(relay, keys, send_stall_s=settings.send_stall_s)
        pb_grpc.add_SynthesizerServicer_to_server(service, self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.grpc_reflection:
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    reflection.SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                ),
                self.server,
            )
        self.port = 0

    async def start(self) -> None:
        """Bind, start serving and report SERVING for the server and the Synthesizer."""
        settings = self.settings
        address = f"{settings.host}:{settings.grpc_port}"
        try:
            if settings.tls_cert and settings.tls_key:
                credentials = grpc.ssl_server_credentials(
                    [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
                )
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's only word for "cannot bind"
            raise OSError(errno.EADDRINUSE, f"cannot listen for gRPC on {address} ({exc})") from exc
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def connections(self) -> int:
        """Count the connections open to this server (grpc's channelz), -1 if unknown."""
        if self._channelz_id is None:
            return -1
        count, start = 0, 0
        while True:
            try:
                sockets = cygrpc.channelz_get_server_sockets(self._channelz_id, start, 1000)
            except ValueError:  # the server is gone: no connections
                return 0
            page = json.loads(sockets)
            refs = page.get("socketRef", [])
            count += len(refs)
            if page.get("end", True) or not refs:
                return count
            start = int(refs[-1]["socketId"]) + 1

    async def begin_drain(self) -> None:
        """Report NOT_SERVING at once; streams in flight go on."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None) -> None:
        """Stop; streams still running after *grace* seconds end with UNAVAILABLE."""
        await self.server.stop(grace)
