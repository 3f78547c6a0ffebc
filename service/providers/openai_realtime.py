"""Write and speak a reply with OpenAI's Realtime API: one upstream that replaces chat + TTS.

OpenAI announced the shutdown of its Speech API models on 2027-01-06 and points to the
Realtime API instead. :class:`OpenAIRealtime` is a
:class:`~voxrelay.service.providers.base.SpeakingModel`: for each request it opens one session with
the SDK's ``client.realtime.connect(...)``, configures it (instructions, voice, speed, PCM
at 24 kHz out, the output cap), adds the conversation as items, asks for one response and
yields the transcript and audio deltas as they come, then the usage. Input is text only.

One session per request, with the conversation replayed as items: no state lives upstream
between requests, so a cancelled or failed request leaves nothing behind, and ``reset`` on
the WebSocket door needs no upstream call. Leaving the iterator early (a client cancel, a
disconnect, a timeout) sends ``response.cancel`` and closes the session at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import ssl
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.websocket_connection_options import WebSocketConnectionOptions
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)

from ..descriptors import out_of_descriptors, shortage_error
from ..errors import UpstreamError, UpstreamTimeout
from ..logs import redact
from ..model import ChatMessage, Voice
from .base import SpokenDelta, token_count, valid_text
from .openai_upstream import build_client, status_error, upstream_said

__all__ = ["REALTIME_VOICES", "OpenAIRealtime", "realtime_errors"]

#: The Realtime API's built-in voices (``marin`` and ``cedar`` sound best).
REALTIME_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
)  # fmt: skip
#: The Realtime API's ``speed`` range is 0.25–1.5.
MAX_SPEED = 1.5
#: the most ``max_output_tokens`` the Realtime API accepts (else ``"inf"``).
MAX_OUTPUT_TOKENS = 4096

# Timeouts
#: A session that does not answer its close frame is dropped after this.
CLOSE_TIMEOUT_S = 0.5
#: ``response.cancel`` is sent on the way out only if the socket takes it this fast.
CANCEL_SEND_S = 0.05

# Limits
#: The largest server event accepted (audio deltas are a few KiB to ~100 KiB).
MAX_EVENT_BYTES = 16 * 1024 * 1024

_AUDIO_DELTAS = frozenset({"response.output_audio.delta", "response.audio.delta"})
_TRANSCRIPT_DELTAS = frozenset(
    {"response.output_audio_transcript.delta", "response.audio_transcript.delta"}
)
#: What an error type looks like ("server_error"); anything else is not passed on.
_ERROR_TYPE = re.compile(r"[a-z_]{1,40}")
#: error types and codes after which the same request may succeed later.
_RETRYABLE_ERRORS = frozenset({"server_error", "rate_limit_exceeded", "session_expired"})


@contextmanager
def realtime_errors(api_key: str) -> Iterator[None]:
    """Translate WebSocket and protocol failures of one session into core errors."""
    try:
        yield
    except InvalidStatus as exc:
        response = exc.response
        body = response.body.decode("utf-8", "replace") if response.body else ""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            message = json.loads(body)["error"]["message"]
            body = message if isinstance(message, str) else body
        detail = redact(" ".join(body.split())[:300])
        raise status_error("realtime", response.status_code, detail, response.headers) from exc
    except InvalidMessage as exc:
        # The connection broke during the handshake (a reset, a proxy hanging up).
        raise UpstreamError("realtime upstream connection failed during the handshake") from exc
    except (InvalidURI, InvalidHandshake) as exc:
        raise UpstreamError(
            f"realtime upstream refused the WebSocket handshake ({type(exc).__name__})",
            retryable=False,
        ) from exc
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        raise UpstreamError(f"realtime session closed mid-response (code {code})") from exc
    except TimeoutError as exc:
        # websockets' open_timeout: the connection or its handshake took too long.
        raise UpstreamTimeout("realtime upstream did not accept the connection in time") from exc
    except (OSError, ssl.SSLError) as exc:
        if out_of_descriptors(exc):
            raise shortage_error("realtime") from exc
        raise UpstreamError(f"realtime upstream connection failed ({type(exc).__name__})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, binascii.Error) as exc:
        raise UpstreamError("realtime upstream sent a malformed event", retryable=False) from exc


def _error(error: Any, api_key: str, *, context: str) -> UpstreamError:
    """Return the error for an ``error`` event's (or a failed response's) error object."""
    error = error if isinstance(error, dict) else {}
    kind = error.get("type")
    kind = kind if isinstance(kind, str) and _ERROR_TYPE.fullmatch(kind) else "error"
    code = error.get("code")
    message = error.get("message")
    detail = str(code) if code else ""
    if isinstance(message, str) and message.strip():
        detail += f": {' '.join(message.split())[:300]}"
    upstream_said("realtime", kind, redact(detail))
    retryable = kind in _RETRYABLE_ERRORS or code in _RETRYABLE_ERRORS
    return UpstreamError(f"realtime upstream {context}: {kind}", retryable=retryable)


async def _close(conn: AsyncRealtimeConnection) -> None:
    """Close the session; a cancel that arrives meanwhile waits for it to be closed.

    An interrupted close could leave the socket open (and websockets' keepalive task
    running) with nobody left to close it.
    """
    closing = asyncio.ensure_future(conn.close())
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        await asyncio.wait([closing])
        raise
    except Exception:  # already closed or broken: nothing is left to release
        return
    finally:
        if closing.done() and not closing.cancelled():
            closing.exception()  # retrieved: a failed close is not worth a warning


def _item(message: ChatMessage) -> dict[str, Any]:
    part = "output_text" if message.role == "assistant" else "input_text"
    return {
        "type": "message",
        "role": message.role,
        "content": [{"type": part, "text": message.content}],
    }


class OpenAIRealtime:
    """A :class:`~voxrelay.service.providers.base.SpeakingModel` over the Realtime API."""

    name = "realtime"
    sample_rate = 24_000
    max_speed = MAX_SPEED

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        model: str,
        default_voice: str = "alloy",
        # Timeouts
        connect_timeout: float = 5.0,
    ) -> None:
        self.model = model
        self.default_voice = default_voice
        #: OpenAI's own list is complete; a compatible server may have voices of its own.
        self.validates_voices = base_url is None
        self._api_key = api_key
        self._client = build_client(
            api_key=api_key, base_url=base_url, connect_timeout=connect_timeout, max_connections=1
        )
        # Keys the SDK's TypedDict does not list go straight to websockets' connect().
        self._ws_options = cast(
            WebSocketConnectionOptions,
            {
                "open_timeout": connect_timeout,
                "close_timeout": CLOSE_TIMEOUT_S,
                "max_size": MAX_EVENT_BYTES,
                "compression": None,
            },
        )

    async def voices(self) -> list[Voice]:
        """List the Realtime API's built-in voices."""
        return [Voice(name=name, language="multilingual") for name in REALTIME_VOICES]

    def _session(
        self, messages: Sequence[ChatMessage], voice: str, speed: float, max_output_tokens: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Return the session configuration and the conversation items for *messages*."""
        instructions = ""
        items = []
        for i, message in enumerate(messages):
            if i == 0 and message.role == "system":
                instructions = message.content
            else:
                items.append(_item(message))
        output: dict[str, Any] = {
            "format": {"type": "audio/pcm", "rate": self.sample_rate},
            "voice": voice or self.default_voice,
        }
        if speed and speed != 1.0:
            output["speed"] = speed
        session: dict[str, Any] = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {"output": output},
            "max_output_tokens": max_output_tokens or "inf",
        }
        if instructions:
            session["instructions"] = instructions
        return session, items

    async def respond(
        self,
        messages: Sequence[ChatMessage],
        *,
        voice: str,
        speed: float,
        max_output_tokens: int,
        timeout: float,  # noqa: ASYNC109 - the core bounds every wait; kept for the Protocol
    ) -> AsyncGenerator[SpokenDelta, None]:
        """Yield the transcript and PCM of one response as they come, then its usage."""
        session, items = self._session(messages, voice, speed, max_output_tokens)
        with realtime_errors(self._api_key):
            conn = await self._client.realtime.connect(
                model=self.model, websocket_connection_options=self._ws_options
            ).enter()
            done = False
            try:
                # Sent back to back: the upstream handles a session's events in order.
                await conn.session.update(session=cast(Any, session))
                for item in items:
                    await conn.conversation.item.create(item=cast(Any, item))
                await conn.response.create()
                while True:
                    # Raw JSON: audio deltas are large and only two fields are read.
                    event = json.loads(await conn.recv_bytes())
                    kind = event.get("type") if isinstance(event, dict) else None
                    if kind in _AUDIO_DELTAS:
                        pcm = base64.b64decode(event.get("delta") or "", validate=True)
                        if pcm:
                            yield SpokenDelta(pcm=pcm)
                    elif kind in _TRANSCRIPT_DELTAS:
                        text = event.get("delta")
                        if isinstance(text, str) and text:
                            yield SpokenDelta(text=valid_text(text))
                    elif kind == "response.done":
                        done = True
                        usage = self._finish(event.get("response"))
                        if usage is not None:
                            yield usage
                        return
                    elif kind == "error":
                        done = True  # nothing runs upstream after an error of ours
                        raise _error(event.get("error"), self._api_key, context="failed")
                    elif kind is None:
                        raise UpstreamError(
                            "realtime upstream sent a malformed event", retryable=False
                        )
            finally:
                if not done:
                    # Stop the model at once; closing the session would stop it too, a
                    # round trip later.
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(CANCEL_SEND_S):
                            await conn.response.cancel()
                await _close(conn)

    def _finish(self, response: Any) -> SpokenDelta | None:
        """Check how a response ended; return its usage (raise if it failed)."""
        response = response if isinstance(response, dict) else {}
        status = response.get("status")
        details = response.get("status_details") or {}
        if status == "failed":
            raise _error(details.get("error"), self._api_key, context="response failed")
        if status == "cancelled":
            reason = details.get("reason") or "unknown reason"
            raise UpstreamError(f"realtime upstream cancelled the response ({reason})")
        # "incomplete" (the output cap, a content filter) ends the reply where it stopped.
        usage = response.get("usage")
        if not isinstance(usage, dict):
            return None
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
        return SpokenDelta(
            prompt_tokens=token_count(prompt), completion_tokens=token_count(completion)
        )

    async def aclose(self) -> None:
        """Close the SDK client."""
        await self._client.close()
