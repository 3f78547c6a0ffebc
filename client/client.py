"""The client: one object, either door, the core's own event types."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from types import TracebackType
from typing import Literal, Protocol, Self, TypeVar

from voxrelay.service import model
from voxrelay.service.errors import InvalidRequest
from voxrelay.service.text_input import Flush

from .grpc_transport import GrpcTransport, channel_credentials
from .synthesis import Interruption, Synthesis
from .ws_transport import WsTransport, ssl_context

__all__ = ["DEFAULT_TIMEOUT_S", "STREAM_PATH", "TLS", "Client", "Transport", "Via"]

Via = Literal["grpc", "ws"]
#: ``True`` (the system's CAs), a CA certificate file, or a context of your own.
TLS = bool | str | os.PathLike[str] | ssl.SSLContext

#: The WebSocket path of the stream endpoint, added to a URL that names none.
STREAM_PATH = "/v1/stream"

# Timeouts
#: Each call's budget unless told otherwise: the longest stream a server makes by default
#: (``VOXRELAY_MAX_STREAM_AUDIO_S``) even when read at a listener's pace.
DEFAULT_TIMEOUT_S = 600.0


class Transport(Protocol):
    """What a door's client does; :class:`Client` holds one."""

    def synthesize(
        self,
        request: model.SynthesisRequest,
        *,
        timeout: float | None,
        interruption: Interruption,
    ) -> AsyncIterator[model.Event]: ...

    def synthesize_stream(
        self,
        request: model.SynthesisRequest,
        pieces: AsyncIterable[str | Flush],
        *,
        timeout: float | None,
        interruption: Interruption,
    ) -> AsyncIterator[model.Event]: ...

    async def voices(
        self,
        language: str,
        *,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
    ) -> list[model.Voice]: ...

    async def aclose(self) -> None: ...


class Client:
    """A client of one voxrelay server, over gRPC (the default) or WebSocket.

    ::

        async with Client("127.0.0.1:50051") as client:
            async for event in client.synthesize("Hello there.", mode="speak"):
                if isinstance(event, AudioChunk):
                    player.feed(event.data)

    *target* is ``HOST:PORT`` (gRPC, or WebSocket with ``via="ws"``) or a ``ws://`` /
    ``wss://`` URL (its path defaults to ``/v1/stream``). Both doors yield the same
    events: :class:`~voxrelay.service.model.StreamStarted`, then per segment a
    :class:`~voxrelay.service.model.SegmentStarted` and its
    :class:`~voxrelay.service.model.AudioChunk`\\ s, then
    :class:`~voxrelay.service.model.StreamFinished`.

    A refusal or failure raises the server's :class:`~voxrelay.service.errors.VoxrelayError`
    (``RateLimited``, ``TooLarge``, …, with ``retry_after_s`` where a wait helps);
    :class:`~voxrelay.client.ConnectionFailed` when the server cannot be reached or the
    connection is lost; :class:`TimeoutError` when *timeout* runs out.

    One channel or connection serves every call of the client. A WebSocket connection
    runs one stream at a time (calls take turns: open a client per concurrent stream)
    and remembers the chat turns of its streams, where gRPC takes ``history``.
    """

    def __init__(
        self,
        target: str,
        *,
        via: Via | None = None,
        api_key: str | None = None,
        tls: TLS = False,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Prepare a client; nothing connects before the first call.

        *api_key* goes in the ``authorization: Bearer`` metadata (gRPC) or the
        ``Authorization`` header (WebSocket). *timeout* is the default budget of each
        call, in seconds (``None``: no limit); a call may set its own.
        """
        self.via: Via
        self.timeout = timeout
        scheme, _, rest = target.partition("://")
        if rest:
            scheme = scheme.lower()
            if scheme not in ("ws", "wss"):
                raise ValueError(f"{target!r}: a URL must be ws:// or wss://")
            if via == "grpc":
                raise ValueError(f"{target!r} is a WebSocket URL, but via is 'grpc'")
            if scheme == "ws" and tls is not False:
                raise ValueError(f"{target!r}: use a wss:// URL for TLS")
            if scheme == "wss" and tls is False:
                tls = True  # the system's CAs
            self.via = "ws"
            url = target if "/" in rest.rstrip("/") else target.rstrip("/") + STREAM_PATH
        else:
            self.via = via or "grpc"
            url = f"{'wss' if tls is not False else 'ws'}://{target}{STREAM_PATH}"
        self.target = url if self.via == "ws" else target
        self._transport: Transport
        if self.via == "ws":
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            self._transport = WsTransport(url, ssl=ssl_context(tls), headers=headers)
        elif self.via == "grpc":
            metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
            self._transport = GrpcTransport(
                target, credentials=channel_credentials(tls), metadata=metadata
            )
        else:
            raise ValueError(f"via must be 'grpc' or 'ws', not {via!r}")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel or connection; a call still running ends."""
        await self._transport.aclose()

    def synthesize(
        self,
        text: str,
        *,
        mode: model.Mode | str = model.Mode.CHAT,
        voice: str = "",
        format: model.AudioFormat | str | None = None,
        sample_rate_hz: int = 0,
        speed: float = 0.0,
        instructions: str = "",
        history: Sequence[model.ChatMessage] = (),
        request_id: str = "",
        word_timestamps: bool = False,
        normalization: bool | None = None,
        timeout: float | None = None,
    ) -> Synthesis:
        """Stream the spoken answer to *text* (chat) or *text* itself (``mode="speak"``).

        Empty strings and zeros leave the choice to the server. With *word_timestamps*,
        each segment's :class:`~voxrelay.service.model.WordTimings` follow its audio;
        *normalization* True or False overrides the server's default. *timeout* (default:
        the client's) bounds the whole call. Leaving the ``async for`` early — ``break``,
        an exception, a cancelled task — cancels the stream on the server; to have that
        done before the next line runs, iterate inside
        ``async with contextlib.aclosing(client.synthesize(...)) as events``. A listener
        who stops playback calls ``await events.interrupt(played_ms)`` for the text heard.
        """
        request = model.SynthesisRequest(
            text=text,
            mode=_choice(model.Mode, mode, "mode"),
            voice=voice,
            format=None if format is None else _choice(model.AudioFormat, format, "format"),
            sample_rate_hz=sample_rate_hz,
            instructions=instructions,
            history=tuple(history),
            speed=speed,
            request_id=request_id,
            word_timestamps=word_timestamps,
            normalization=normalization,
        )
        interruption = Interruption()
        events = self._transport.synthesize(
            request, timeout=self._timeout(timeout), interruption=interruption
        )
        return Synthesis(events, interruption)

    def synthesize_stream(
        self,
        pieces: AsyncIterable[str | Flush],
        *,
        voice: str = "",
        format: model.AudioFormat | str | None = None,
        sample_rate_hz: int = 0,
        speed: float = 0.0,
        instructions: str = "",
        request_id: str = "",
        word_timestamps: bool = False,
        normalization: bool | None = None,
        timeout: float | None = None,
    ) -> Synthesis:
        """Speak *pieces* as they come: text of any size, and :data:`FLUSH` markers.

        For a caller that writes its text while it is spoken (its own LLM's tokens, a
        user typing): each sentence is spoken as soon as it is certain; ``FLUSH``
        speaks what is buffered now, even mid-sentence; the end of *pieces* ends the
        text. The events are those of :meth:`synthesize` (speak mode). An exception
        raised by *pieces* cancels the stream and is raised here.
        """
        request = model.SynthesisRequest(
            text="",
            mode=model.Mode.SPEAK,
            voice=voice,
            format=None if format is None else _choice(model.AudioFormat, format, "format"),
            sample_rate_hz=sample_rate_hz,
            instructions=instructions,
            speed=speed,
            request_id=request_id,
            word_timestamps=word_timestamps,
            normalization=normalization,
        )
        interruption = Interruption()
        events = self._transport.synthesize_stream(
            request, pieces, timeout=self._timeout(timeout), interruption=interruption
        )
        return Synthesis(events, interruption)

    async def voices(
        self,
        language: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline travels to the server
    ) -> list[model.Voice]:
        """List the server's voices, of *language* only if given (e.g. ``"en"``); gRPC only."""
        return await self._transport.voices(language, timeout=self._timeout(timeout))

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


_Choice = TypeVar("_Choice", model.Mode, model.AudioFormat)


def _choice(kind: type[_Choice], value: _Choice | str, what: str) -> _Choice:
    """Read *value* as a member of *kind*, or refuse it with the choices."""
    try:
        return kind(value.lower() if isinstance(value, str) else value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise InvalidRequest(f"{what} must be one of {choices}, not {value!r}") from None
