"""A WebSocket client for one request: what ``voxrelay say --via ws`` runs."""

from __future__ import annotations

import json
import ssl as ssl_module
import time
import uuid
from typing import Any, BinaryIO

from websockets.asyncio.client import connect

__all__ = ["WsSayError", "say_ws"]

#: Far above a stream's usual frames, so a ``"stream": false`` reply also fits.
MAX_FRAME_BYTES = 64 * 1024 * 1024


class WsSayError(Exception):
    """The server refused or ended the stream with an ``error`` frame (or hung up)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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
    out: BinaryIO,
    token: str | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> dict[str, Any]:
    """Send one ``synthesize`` to *url*, write its audio to *out*, return ``finished``.

    The returned frame gains ``client_ttfa_ms`` and ``client_total_ms``: the times to
    the first audio byte and to ``finished`` as this client measured them.
    Raise :class:`WsSayError` on an ``error`` frame or an early close.
    """
    request: dict[str, Any] = {
        "type": "synthesize",
        "id": uuid.uuid4().hex[:16],
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
                raise WsSayError(str(frame.get("code")), str(frame.get("message")))
        raise WsSayError(
            "closed",
            f"the server closed the connection (code {ws.close_code} {ws.close_reason!r})",
        )
