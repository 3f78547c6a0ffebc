"""The client over WebSocket: one connection, reused by every call, one stream at a time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl as ssl_module
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus, InvalidURI
from websockets.protocol import State
from websockets.typing import Data

from voxrelay.gateways.ws_frames import (
    Cancelled,
    ErrorFrame,
    append_frame,
    cancel_frame,
    close_error,
    dumps,
    end_frame,
    flush_frame,
    handshake_error,
    parse_server_frame,
    synthesize_frame,
)
from voxrelay.service import model
from voxrelay.service.errors import InvalidRequest, VoxrelayError
from voxrelay.service.text_input import Flush

from .errors import ConnectionFailed
from .synthesis import Interruption

__all__ = ["WsTransport", "ssl_context"]

# Limits
#: Far above a stream's usual frames, so that a whole reply in one message fits too.
MAX_FRAME_BYTES = 64 * 1024 * 1024

# Timeouts
#: How long a stream left early may take to confirm its cancel before the connection is
#: dropped instead (the server cancels the stream of a client that leaves).
CANCEL_WAIT_S = 5.0


def ssl_context(
    tls: bool | str | os.PathLike[str] | ssl_module.SSLContext,
) -> ssl_module.SSLContext | None:
    """Turn the client's ``tls`` option into an SSL context (``None``: plain text)."""
    if isinstance(tls, ssl_module.SSLContext):
        return tls
    if tls is False:
        return None
    if tls is True:
        return ssl_module.create_default_context()
    return ssl_module.create_default_context(cafile=os.fspath(tls))


def _timed_out(timeout: float | None) -> TimeoutError:
    if timeout is None:  # websockets' own limit on the opening handshake
        return TimeoutError("the server did not complete the WebSocket handshake in time")
    return TimeoutError(f"no answer within {timeout:g} s")


class WsTransport:
    """``/v1/stream`` on one connection, opened at the first call and again after a loss.

    The server runs one stream per connection, so calls take turns: a second
    :meth:`synthesize` waits until the first has ended (or been cancelled).
    """

    def __init__(
        self,
        url: str,
        *,
        ssl: ssl_module.SSLContext | None,
        headers: Mapping[str, str],
    ) -> None:
        self.url = url
        self._ssl = ssl
        self._headers = dict(headers)
        self._ws: ClientConnection | None = None
        self._turn = asyncio.Lock()

    async def synthesize(
        self,
        request: model.SynthesisRequest,
        *,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
        interruption: Interruption,
    ) -> AsyncIterator[model.Event]:
        """Run one stream; leaving early sends ``cancel`` and waits for ``cancelled``.

        The ``cancel`` carries *interruption*'s playback position, if set, and the
        server's ``heard_text`` is put back there.
        """
        request_id = request.request_id or uuid.uuid4().hex[:16]
        frame = dumps(synthesize_frame(request, request_id=request_id))
        # Closed with this generator, at once: its cancel must be done when we are.
        async with contextlib.aclosing(
            self._stream(request_id, frame, None, timeout, interruption)
        ) as events:
            async for event in events:
                yield event

    async def synthesize_stream(
        self,
        request: model.SynthesisRequest,
        pieces: AsyncIterable[str | Flush],
        *,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
        interruption: Interruption,
    ) -> AsyncIterator[model.Event]:
        """Run one streamed input: ``append`` each piece, ``flush`` each marker, then ``end``.

        An error raised by *pieces* cancels the stream and is raised here.
        """
        request_id = request.request_id or uuid.uuid4().hex[:16]
        frame = dumps(synthesize_frame(request, request_id=request_id, streamed_input=True))
        async with contextlib.aclosing(
            self._stream(request_id, frame, pieces, timeout, interruption)
        ) as events:
            async for event in events:
                yield event

    async def _stream(
        self,
        request_id: str,
        frame: str,
        pieces: AsyncIterable[str | Flush] | None,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
        interruption: Interruption,
    ) -> AsyncIterator[model.Event]:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        writer: asyncio.Task[None] | None = None
        failure: list[BaseException] = []

        async def write(ws: ClientConnection, pieces: AsyncIterable[str | Flush]) -> None:
            try:
                async for piece in pieces:
                    if isinstance(piece, Flush):
                        await ws.send(dumps(flush_frame(request_id)))
                    elif piece:
                        await ws.send(dumps(append_frame(request_id, piece)))
                await ws.send(dumps(end_frame(request_id)))
            except ConnectionClosed:
                pass  # the reader reports why
            except Exception as exc:
                # The pieces failed: cancel the stream; the reader raises this on `cancelled`.
                failure.append(exc)
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(dumps(cancel_frame(request_id)))

        try:
            async with asyncio.timeout_at(deadline):
                await self._turn.acquire()
        except TimeoutError:
            raise _timed_out(timeout) from None
        in_flight = False
        try:
            ws = await self._connection(deadline)
            await self._send(ws, frame)
            in_flight = True
            if pieces is not None:
                writer = asyncio.create_task(write(ws, pieces), name="ws-pieces")
            segment, seq = 0, 0
            while True:
                message = await self._recv(ws, deadline)
                if isinstance(message, bytes):
                    yield model.AudioChunk(segment, seq, message)
                    seq += 1
                    continue
                event = parse_server_frame(message)
                if isinstance(event, model.SegmentStarted):
                    segment = event.index
                elif isinstance(event, model.StreamFinished):
                    in_flight = False
                elif isinstance(event, ErrorFrame):
                    in_flight = False
                    raise event.error
                elif isinstance(event, Cancelled):
                    in_flight = False
                    if failure:
                        raise failure[0]
                    raise ConnectionFailed("the server cancelled the stream")
                if event is not None:
                    yield event
                if not in_flight:
                    return
        except TimeoutError:  # the deadline, from _connection or _recv
            raise _timed_out(timeout) from None
        finally:
            if writer is not None:
                writer.cancel()
                await asyncio.wait([writer])
            try:
                if in_flight and self._ws is not None:
                    await self._cancel(self._ws, request_id, interruption)
            finally:
                self._turn.release()

    async def voices(
        self,
        language: str,
        *,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
    ) -> list[model.Voice]:
        """Refuse: the WebSocket protocol has no way to list voices."""
        raise InvalidRequest("voices are listed over gRPC only: use a gRPC client for them")

    async def aclose(self) -> None:
        """Close the connection (a stream in flight is cancelled by the server)."""
        if self._ws is not None:
            ws, self._ws = self._ws, None
            await ws.close()

    async def _connection(self, deadline: float | None) -> ClientConnection:
        """Return the open connection, opening one if there is none (any more)."""
        if self._ws is not None and self._ws.state is State.OPEN:
            return self._ws
        self._ws = None
        options = {"ssl": self._ssl} if self._ssl is not None else {}
        try:
            async with asyncio.timeout_at(deadline):
                self._ws = await connect(
                    self.url,
                    additional_headers=self._headers,
                    compression=None,  # audio does not compress; the server turns it off too
                    max_size=MAX_FRAME_BYTES,
                    **options,
                )
        except TimeoutError:  # the deadline, or websockets' own open_timeout
            raise
        except InvalidStatus as exc:
            status = exc.response.status_code
            error = handshake_error(status)
            raise error or ConnectionFailed(
                f"the server refused the WebSocket connection (HTTP {status})"
            ) from None
        except InvalidMessage:
            raise ConnectionFailed(
                f"{self.url} did not answer as a WebSocket server: is it voxrelay's WebSocket"
                " port (8765 by default)?"
            ) from None
        except InvalidURI as exc:
            raise InvalidRequest(str(exc)) from None
        except ssl_module.SSLError as exc:
            raise ConnectionFailed(f"TLS with {self._where} failed: {exc}") from None
        except ConnectionRefusedError:
            raise self._unreachable("connection refused") from None
        except socket.gaierror:
            raise self._unreachable("the host name does not resolve") from None
        except OSError as exc:
            raise self._unreachable(str(exc)) from None
        return self._ws

    @property
    def _where(self) -> str:
        return self.url.split("://", 1)[-1].split("/", 1)[0]

    def _unreachable(self, reason: str) -> ConnectionFailed:
        return ConnectionFailed(f"cannot reach the server at {self._where} (WebSocket): {reason}")

    async def _send(self, ws: ClientConnection, frame: str) -> None:
        try:
            await ws.send(frame)
        except ConnectionClosed as exc:
            raise self._closed(exc) from None

    async def _recv(self, ws: ClientConnection, deadline: float | None) -> Data:
        try:
            async with asyncio.timeout_at(deadline):
                return await ws.recv()
        except ConnectionClosed as exc:
            raise self._closed(exc) from None

    def _closed(self, exc: ConnectionClosed) -> VoxrelayError:
        self._ws = None
        error = close_error(exc.rcvd, token_sent="Authorization" in self._headers)
        if error is not None:
            return error
        if exc.rcvd is None:
            return ConnectionFailed("the connection was lost before the stream finished")
        return ConnectionFailed(f"the server closed the connection with {exc.rcvd}")

    async def _cancel(
        self, ws: ClientConnection, request_id: str, interruption: Interruption
    ) -> None:
        """Cancel the stream in flight and read up to its end, or drop the connection.

        Whatever interrupts this (even a second cancel of the task), the connection is
        left either clean for the next call or closed.
        """
        clean = False
        try:
            async with asyncio.timeout(CANCEL_WAIT_S):
                await ws.send(dumps(cancel_frame(request_id, interruption.played_ms)))
                while True:
                    message = await ws.recv()
                    if not isinstance(message, str):
                        continue
                    end = parse_server_frame(message)
                    if isinstance(end, Cancelled):
                        interruption.heard_text = end.heard_text
                    if isinstance(end, Cancelled | ErrorFrame | model.StreamFinished):
                        clean = True
                        return
        except (TimeoutError, ConnectionClosed, VoxrelayError):
            pass
        finally:
            if not clean:
                self._ws = None
                ws.transport.abort()
