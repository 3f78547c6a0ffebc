"""A WebSocket client for one request: what ``voxrelay say --via ws`` runs."""

from __future__ import annotations

import json
import ssl as ssl_module
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus, InvalidURI
from websockets.frames import Close

__all__ = ["Writable", "WsSayError", "say_ws"]

#: Far above a stream's usual frames, so a ``"stream": false`` reply also fits.
MAX_FRAME_BYTES = 64 * 1024 * 1024

#: What the server's close codes mean (SPEC: WebSocket close codes).
CLOSE_MEANINGS = {
    1001: "the server is shutting down: retry in a moment",
    1008: "refused by policy",
    1009: "a frame was too large",
    1011: "internal server error",
    1013: "the server is over capacity: retry in a moment",
}

#: The HTTP statuses the handshake can be refused with, as error codes and hints.
HANDSHAKE_REFUSALS = {
    401: ("unauthorized", "the server refused the API key (HTTP 401)"),
    403: ("forbidden", "the server refused this client's Origin (HTTP 403)"),
    404: ("invalid_request", "no WebSocket endpoint at this URL (HTTP 404)"),
    503: ("busy", "the server has too many connections (HTTP 503): retry in a moment"),
}


class Writable(Protocol):
    """Where the audio goes: a binary file, ``sys.stdout.buffer``, a ``BytesIO``…"""

    def write(self, data: bytes, /) -> object: ...


class WsSayError(Exception):
    """The server refused or ended the stream with an ``error`` frame (or hung up).

    ``code`` is the WebSocket error vocabulary (``invalid_request``, ``unauthorized``,
    ``busy``, …), ``closed`` for a connection that ended early, or ``unreachable`` for
    a URL that does not answer as a voxrelay WebSocket.
    """

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


def _closed_error(rcvd: Close | None, *, token_sent: bool) -> WsSayError:
    """Explain why the server closed the connection before ``finished``."""
    if rcvd is None:
        return WsSayError("closed", "the connection was lost before the stream finished")
    if rcvd.code == 1008 and "authentication" in rcvd.reason:
        # Keeps the close's own words ("1008 (policy violation) authentication …").
        hint = "check the API key" if token_sent else "this server requires an API key"
        return WsSayError("unauthorized", f"{hint} (the server closed with {rcvd})")
    meaning = CLOSE_MEANINGS.get(rcvd.code)
    detail = f"the server closed the connection with {rcvd}"
    return WsSayError("closed", f"{detail} ({meaning})" if meaning else detail)


async def say_ws(
    url: str,
    *,
    text: str,
    mode: str = "chat",
    voice: str = "",
    format: str = "",
    sample_rate_hz: int = 0,
    instructions: str = "",
    speed: float = 0.0,
    out: Writable,
    token: str | None = None,
    ssl: ssl_module.SSLContext | None = None,
    request_id: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Send one ``synthesize`` to *url*, write its audio to *out*, return ``finished``.

    The returned frame gains ``client_ttfa_ms`` and ``client_total_ms``: the times to
    the first audio byte and to ``finished`` as this client measured them.
    *on_event* sees every JSON frame (``started``, ``segment``, …) as it arrives.
    To bound the whole exchange, wrap the call in :func:`asyncio.timeout`.
    Raise :class:`WsSayError` on an ``error`` frame, a refused handshake or an early
    close; :class:`OSError` when nothing answers at *url*.
    """
    request: dict[str, Any] = {
        "type": "synthesize",
        "id": request_id or uuid.uuid4().hex[:16],
        "text": text,
        "mode": mode,
    }
    optional: dict[str, Any] = {
        "voice": voice,
        "format": format,
        "sample_rate_hz": sample_rate_hz,
        "instructions": instructions,
        "speed": speed,
    }
    request.update({key: value for key, value in optional.items() if value})
    headers = {"Authorization": f"Bearer {token}"} if token else None
    options: dict[str, Any] = {"ssl": ssl} if ssl is not None else {}

    started = time.monotonic()
    first_audio: float | None = None
    try:
        async with connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=MAX_FRAME_BYTES,
            **options,
        ) as ws:
            await ws.send(json.dumps(request))
            async for message in ws:
                if isinstance(message, bytes):
                    if first_audio is None:
                        first_audio = time.monotonic()
                    out.write(message)
                    continue
                frame = json.loads(message)
                if on_event is not None:
                    on_event(frame)
                kind = frame.get("type")
                if kind == "finished":
                    done = time.monotonic()
                    result = dict(frame)
                    result["client_ttfa_ms"] = (
                        round((first_audio - started) * 1000) if first_audio is not None else None
                    )
                    result["client_total_ms"] = round((done - started) * 1000)
                    return result
                if kind == "error":
                    retry = frame.get("retry_after_ms")
                    raise WsSayError(
                        str(frame.get("code")),
                        str(frame.get("message")),
                        retry if isinstance(retry, int) else None,
                    )
                if kind == "cancelled":
                    raise WsSayError("cancelled", "the stream was cancelled")
            raise _closed_error(ws.protocol.close_rcvd, token_sent=bool(token))
    except ConnectionClosed as exc:
        raise _closed_error(exc.rcvd, token_sent=bool(token)) from None
    except InvalidStatus as exc:
        status = exc.response.status_code
        code, hint = HANDSHAKE_REFUSALS.get(
            status, ("closed", f"the server refused the WebSocket connection (HTTP {status})")
        )
        raise WsSayError(code, hint) from None
    except InvalidMessage:
        raise WsSayError(
            "unreachable",
            f"{url} did not answer as a WebSocket server: is it voxrelay's WebSocket port"
            " (8765 by default)?",
        ) from None
    except InvalidURI as exc:
        raise WsSayError("invalid_request", str(exc)) from None
