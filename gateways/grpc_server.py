"""The gRPC door: ``voxrelay.v1.Synthesizer`` on grpc.aio, plus health and reflection.

A thin translation: protobuf messages in, :mod:`voxrelay.service.model` types to the core,
core events back out as protobuf, core errors as rich statuses; the translation itself is
:mod:`voxrelay.gateways.grpc_codec`, which the client shares.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from voxrelay.service import metrics, model
from voxrelay.service.auth import KeyStore, bearer_token
from voxrelay.service.errors import VoxrelayError
from voxrelay.service.relay import Relay
from voxrelay.service.settings import Settings
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

from .grpc_codec import MODES, to_request, to_response, to_status

__all__ = ["GrpcDoor"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Synthesizer"].full_name


class _GrpcSink:
    """Write a stream's events as ``SynthesizeResponse`` messages."""

    def __init__(
        self, context: grpc.aio.ServicerContext[pb.SynthesizeRequest, pb.SynthesizeResponse]
    ) -> None:
        self._context = context

    async def send(self, event: model.Event) -> None:
        await self._context.write(to_response(event))


class SynthesizerService(pb_grpc.SynthesizerServicer):
    """``voxrelay.v1.Synthesizer`` over the core."""

    def __init__(self, relay: Relay, keys: KeyStore) -> None:
        self.relay = relay
        self.keys = keys

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
            await context.abort_with_status(to_status(exc))
            return
        run = self.relay.open("grpc", peer, core_request, caller=caller, deadline=deadline)
        try:
            finished = await run.relay(_GrpcSink(context))
        except VoxrelayError as exc:
            await context.abort_with_status(to_status(exc))
            return
        await context.write(to_response(finished))

    async def ListVoices(
        self,
        request: pb.ListVoicesRequest,
        context: grpc.aio.ServicerContext[pb.ListVoicesRequest, pb.ListVoicesResponse],
    ) -> pb.ListVoicesResponse:
        voices = await self.relay.synthesizer.voices(request.language)
        return pb.ListVoicesResponse(
            voices=[pb.Voice(name=v.name, language=v.language) for v in voices]
        )


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


class GrpcDoor:
    """The grpc.aio server with the Synthesizer, health and (optionally) reflection."""

    def __init__(self, settings: Settings, relay: Relay, keys: KeyStore) -> None:
        self.settings = settings
        limit = settings.ws_max_message_bytes or -1
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(keys)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_SynthesizerServicer_to_server(SynthesizerService(relay, keys), self.server)
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

    async def begin_drain(self) -> None:
        """Report NOT_SERVING at once; streams in flight go on."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None) -> None:
        """Stop; streams still running after *grace* seconds end with UNAVAILABLE."""
        await self.server.stop(grace)
