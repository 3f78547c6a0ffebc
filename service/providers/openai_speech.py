"""Stream speech from OpenAI's Speech API or any compatible server (Kokoro, LocalAI, …).

OpenAI announced the shutdown of its Speech API models (``tts-1``, ``tts-1-hd``,
``gpt-4o-mini-tts``) on 2027-01-06, pointing to the Realtime API instead. This engine stays
useful for the many servers that speak the same ``/v1/audio/speech`` protocol.

It asks for ``response_format="pcm"`` (s16le mono at 24 kHz) and yields the bytes as they
arrive; voxrelay's own encoder makes every other format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

import aiohttp
import httpx2

from ..errors import UpstreamError
from ..model import Voice
from ..words import WordMark
from .base import ReadHold
from .openai_upstream import build_client, call_timeout, upstream_errors

__all__ = ["OPENAI_VOICES", "OpenAISpeech"]

#: OpenAI's built-in voices; all speak many languages, tuned for English.
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova",
    "onyx", "sage", "shimmer", "verse", "marin", "cedar",
)  # fmt: skip

# Bodies that are not audio: a JSON error or a proxy's page answered with 200.
_NOT_AUDIO = ("application/json", "text/", "application/problem+json")


class OpenAISpeech:
    """A :class:`~voxrelay.service.providers.base.SpeechEngine` over ``/v1/audio/speech``."""

    name = "openai"
    sample_rate = 24_000
    max_speed = 4.0
    #: compatible servers have voices of their own, so unknown names go to the upstream.
    validates_voices = False
    reports_words = False

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        model: str,
        default_voice: str = "alloy",
        # Timeouts
        connect_timeout: float = 5.0,
        # Limits
        max_connections: int = 256,
    ) -> None:
        self.model = model
        self.default_voice = default_voice
        self._api_key = api_key
        self._connect_timeout = connect_timeout
        self._client = build_client(
            api_key=api_key,
            base_url=base_url,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
        )

    async def voices(self) -> list[Voice]:
        """List OpenAI's built-in voices (a compatible server may offer others)."""
        return [Voice(name=name, language="multilingual") for name in OPENAI_VOICES]

    async def synthesize(
        self,
        text: str,
        *,
        voice: str,
        speed: float,
        instructions: str,
        timeout: float,  # noqa: ASYNC109 - the SDK's per-call network timeout
        caller: str | None = None,
        marks: list[WordMark] | None = None,
        hold: ReadHold | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Yield PCM for *text* as the upstream sends it (*caller* plays no part).

        While it reads, the response's socket is named to *hold*.

        ``speed`` 0 or 1.0 and empty ``instructions`` are left out of the request, so
        servers that know neither still answer.
        """
        body: dict[str, object] = {
            "model": self.model,
            "voice": voice or self.default_voice,
            "input": text,
            "response_format": "pcm",
        }
        if speed and speed != 1.0:
            body["speed"] = speed
        if instructions:
            body["instructions"] = instructions
        with upstream_errors("speech", self._api_key):
            # The SDK's request and errors, and the body as it streams in: what
            # ``audio.speech.with_streaming_response.create`` does, less its typed-params
            # transform and response wrappers, a fifth of the CPU of a sentence's request.
            response = await self._client.post(
                "/audio/speech",
                body=body,
                cast_to=httpx2.Response,
                options={
                    "headers": {"Accept": "application/octet-stream"},
                    "timeout": call_timeout(timeout, self._connect_timeout),
                },
                stream=True,
            )
            # Leaving (aclose, cancel, error) closes the HTTP response, and with it the
            # connection, at once.
            try:
                content_type = response.headers.get("content-type", "").lower()
                if content_type.startswith(_NOT_AUDIO):
                    raise UpstreamError(
                        f"speech upstream sent a malformed reply ({content_type[:60]}, not audio)",
                        retryable=False,
                        status=response.status_code,
                    )
                if hold is not None:
                    hold.reading(_socket_of(response))
                async for chunk in response.aiter_bytes():
                    if chunk:
                        yield chunk
            finally:
                if hold is not None:
                    hold.reading(None)
                await response.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.close()


def _socket_of(response: httpx2.Response) -> Callable[[], asyncio.Transport | None] | None:
    """Return how to find the socket *response*'s body is read from, if the transport says.

    The SDK's aiohttp transport keeps aiohttp's response beneath httpx2's stream; its
    connection is None once the body is in and the socket back in the pool, where it may
    be serving another request.
    """
    stream = getattr(response.stream, "_stream", None)
    inner = getattr(stream, "_aiohttp_response", None)
    if not isinstance(inner, aiohttp.ClientResponse):
        return None
    body: aiohttp.ClientResponse = inner

    def socket() -> asyncio.Transport | None:
        connection = body.connection
        return None if connection is None else connection.transport

    return socket
