"""The client over gRPC: one grpc.aio channel, reused by every call."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from voxrelay.gateways.grpc_codec import (
    request_message,
    response_event,
    status_error,
    stream_config_message,
)
from voxrelay.service import model
from voxrelay.service.errors import VoxrelayError
from voxrelay.service.text_input import Flush
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

from .errors import ConnectionFailed
from .synthesis import Interruption

__all__ = ["GrpcTransport", "channel_credentials"]


def channel_credentials(
    tls: bool | str | os.PathLike[str] | ssl.SSLContext,
) -> grpc.ChannelCredentials | None:
    """Turn the client's ``tls`` option into channel credentials (``None``: plain text).

    A CA file is read now, so that a missing one fails at once. Of an
    :class:`ssl.SSLContext`, gRPC can use the CA certificates loaded from files.
    """
    if tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, ssl.SSLContext):
        certs = tls.get_ca_certs(binary_form=True)
        pem = "".join(ssl.DER_cert_to_PEM_cert(cert) for cert in certs)  # type: ignore[arg-type]
        return grpc.ssl_channel_credentials(root_certificates=pem.encode() or None)
    return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())


class GrpcTransport:
    """``voxrelay.v1.Synthesizer`` calls on one channel, opened at the first call."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        self.target = target
        self._credentials = credentials
        self._metadata = tuple(metadata)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SynthesizerStub | None = None

    def _synthesizer(self) -> pb_grpc.SynthesizerStub:
        # Made in the running loop, which grpc.aio binds the channel to.
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials)
            self._stub = pb_grpc.SynthesizerStub(self._channel)
        return self._stub

    async def synthesize(
        self,
        request: model.SynthesisRequest,
        *,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
        interruption: Interruption,
    ) -> AsyncIterator[model.Event]:
        """Run one ``Synthesize`` call; leaving early cancels it on the server.

        gRPC carries no playback position: *interruption* is left for the caller to read.
        """
        del interruption
        call = self._synthesizer().Synthesize(
            request_message(request), timeout=timeout, metadata=self._metadata
        )
        try:
            async for response in call:
                event = response_event(response)
                if event is not None:
                    yield event
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, timeout) from None
        finally:
            call.cancel()  # a no-op once the call is over

    async def synthesize_stream(
        self,
        request: model.SynthesisRequest,
        pieces: AsyncIterable[str | Flush],
        *,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
        interruption: Interruption,
    ) -> AsyncIterator[model.Event]:
        """Run one ``SynthesizeStream`` call, writing *pieces* while the events come back.

        The end of *pieces* half-closes the call; an error raised by *pieces* cancels it
        and is raised here. Leaving early cancels the call on the server; *interruption*
        is left for the caller to read, as for :meth:`synthesize`.
        """
        del interruption
        call = self._synthesizer().SynthesizeStream(timeout=timeout, metadata=self._metadata)
        failure: list[BaseException] = []

        async def write() -> None:
            try:
                await call.write(stream_config_message(request))
                async for piece in pieces:
                    if isinstance(piece, Flush):
                        await call.write(pb.SynthesizeStreamRequest(flush=pb.Flush()))
                    elif piece:
                        await call.write(pb.SynthesizeStreamRequest(text=piece))
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the call is over: its reader reports why
            except Exception as exc:
                failure.append(exc)
                call.cancel()

        writer = asyncio.create_task(write(), name="grpc-pieces")
        try:
            async for response in call:
                event = response_event(response)
                if event is not None:
                    yield event
            if failure:
                raise failure[0]
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, timeout) from None
        except asyncio.CancelledError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            call.cancel()
            writer.cancel()
            await asyncio.wait([writer])

    async def voices(
        self,
        language: str,
        *,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
    ) -> list[model.Voice]:
        """Call ``ListVoices``."""
        try:
            reply = await self._synthesizer().ListVoices(
                pb.ListVoicesRequest(language=language), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, timeout) from None
        return [model.Voice(v.name, v.language) for v in reply.voices]

    async def aclose(self) -> None:
        """Close the channel; calls still running end with ``CANCELLED``."""
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    def _error(self, exc: grpc.aio.AioRpcError, timeout: float | None) -> Exception:
        """Turn a failed call into the core error the server sent, or a client-side one."""
        code, details = exc.code(), exc.details() or ""
        status = _rich_status(exc)
        if status is None:  # grpc's own verdict, not the server's
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return TimeoutError(f"no answer within {timeout or 0:g} s (DEADLINE_EXCEEDED)")
            if code is grpc.StatusCode.UNAVAILABLE and (
                "failed to connect" in details or "errors resolving" in details
            ):
                return ConnectionFailed(
                    f"cannot reach the server at {self.target} (gRPC): {_reason(details)}"
                )
            if code is grpc.StatusCode.CANCELLED:
                return ConnectionFailed(f"the server ended the stream early (CANCELLED: {details})")
        error: VoxrelayError = status_error(code, details, status)
        return error


def _rich_status(exc: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """Return the ``google.rpc.Status`` a server attached to *exc*, if any."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # trailers that disagree with the call's status
        return None
    return status


def _reason(details: str) -> str:
    """Say in a few words why a channel could not connect."""
    if "Connection refused" in details:
        return "connection refused"
    if "errors resolving" in details or "Domain name not found" in details:
        return "the host name does not resolve"
    if "Socket closed" in details:
        return f"{details} (is this voxrelay's gRPC port, 50051 by default?)"
    return details
