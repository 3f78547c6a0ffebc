"""The WebSocket door: ``/v1/stream`` on the websockets asyncio server, plus a little HTTP.

A thin translation, like the gRPC door: JSON text frames in, core types to the core's
:class:`~voxrelay.service.relay.Relay`, events back out as JSON frames and binary audio
frames; core errors become ``error`` frames carrying :attr:`VoxrelayError.code`. Each
connection is a :class:`~.ws_session.Session`; this module is the server around them.

The handshake is where a caller is let in or not, in this order: draining (503), the
``Origin`` (403), an ``Authorization`` header (401 when wrong), the connection caps
(503). The core decides each of these (:mod:`voxrelay.service.auth`,
:mod:`voxrelay.service.limits`); this door only reads the headers and answers in HTTP. A
client without a header authenticates with a first ``auth`` frame, else the connection
closes 1008.

The same port answers ``/healthz``, ``/readyz``, ``/version`` and ``/`` (the demo page)
as plain HTTP through ``process_request``; only ``/v1/stream`` upgrades.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http
import json
import logging
import re
import ssl
from collections.abc import Mapping
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from voxrelay.service import __version__, metrics
from voxrelay.service.auth import KeyStore, OriginPolicy, TrustedProxies, bearer_token, client_key
from voxrelay.service.errors import Busy, Forbidden, Unauthorized, VoxrelayError
from voxrelay.service.limits import ConnectionLimits, Lease
from voxrelay.service.relay import Relay
from voxrelay.service.runtime import Runtime
from voxrelay.service.settings import Settings

from .errors import WS_CLOSE
from .ws_session import Admitted, Session, peer_address, peer_name

__all__ = ["WsDoor"]

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"
STATIC_DIR = Path(__file__).with_name("static")

# Timeouts
#: The whole opening handshake (TLS included) must be done within this.
HANDSHAKE_TIMEOUT_S = 10.0
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
#: How long close_all() lets a stream the core just aborted send its error frame.
FINAL_FRAME_GRACE_S = 2.0

# Limits
#: A small write buffer makes a client that stops reading block our sends quickly,
#: so the send-stall timer measures the client, not our buffering.
WRITE_LIMIT = 64 * 1024

# The door


class WsDoor:
    """The websockets server: ``/v1/stream`` plus health, readiness, version and demo."""

    def __init__(self, settings: Settings, relay: Relay, keys: KeyStore, runtime: Runtime) -> None:
        self.settings = settings
        self.relay = relay
        self.keys = keys
        self.runtime = runtime
        self.port = 0
        self.origins = OriginPolicy.from_settings(self.settings)
        self.proxies = TrustedProxies.from_settings(self.settings)
        self.connections = ConnectionLimits.from_settings(self.settings)
        self._server: Server | None = None
        self._sessions: set[Session] = set()
        self._admitted: dict[ServerConnection, Admitted] = {}

    async def start(self, *, reuse_port: bool = False) -> None:
        """Bind ``host:ws_port`` and start serving; *reuse_port* shares it with other workers."""
        s = self.settings
        context: ssl.SSLContext | None = None
        if s.tls_cert and s.tls_key:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(s.tls_cert, s.tls_key)
        self._server = await serve(
            self._handle,
            s.host,
            s.ws_port,
            process_request=self._process_request,
            compression=None,  # audio does not compress; deflate costs memory
            server_header=f"voxrelay/{__version__}",
            # Timeouts
            open_timeout=HANDSHAKE_TIMEOUT_S,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
            # Limits
            max_size=s.ws_max_message_bytes or None,
            write_limit=WRITE_LIMIT,
            ssl=context,
            reuse_port=reuse_port,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def draining(self) -> bool:
        """Readiness is 503 and new connections are refused while the process drains."""
        return self.runtime.draining

    async def close_all(self) -> None:
        """Close every connection with 1001, once streams the core aborted have said so."""
        sessions = list(self._sessions)

        async def close(session: Session) -> None:
            await session.wait_streams(FINAL_FRAME_GRACE_S)
            await session.ws.close(WS_CLOSE["going_away"], "server shutting down")

        if sessions:
            await asyncio.gather(*(close(s) for s in sessions))

    async def stop(self) -> None:
        """Close the server and wait until every connection handler has returned."""
        if self._server is None:
            return
        self._server.close(close_connections=True)
        await self._server.wait_closed()

    # The handshake of /v1/stream

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Let a handshake through (None) or answer it with the HTTP refusal."""
        headers = request.headers
        if self.draining:
            return _respond(
                connection,
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "voxrelay is shutting down: retry on another replica\n",
                headers={"Retry-After": "1"},
            )
        peer_ip = peer_address(connection)[0]
        client_ip = self.proxies.client_ip(peer_ip, headers.get_all("X-Forwarded-For"))
        origins = headers.get_all("Origin")
        hosts = headers.get_all("Host")
        # Behind a TLS-terminating proxy the page was https even though we are not.
        secure = self.settings.tls_cert is not None or (
            self.proxies.trusts(peer_ip) and headers.get_all("X-Forwarded-Proto")[-1:] == ["https"]
        )
        if len(origins) > 1 or not self.origins.allows(
            origins[0] if origins else None,
            host=hosts[0] if len(hosts) == 1 else None,
            secure=secure,
        ):
            forbidden = Forbidden("this page's origin may not open a voxrelay WebSocket")
            return self._refuse(connection, http.HTTPStatus.FORBIDDEN, forbidden, client_ip)
        key_id: str | None = None
        authorization = headers.get_all("Authorization")
        keys = self.keys
        if keys.required and authorization:
            token = bearer_token(authorization[0]) if len(authorization) == 1 else None
            key_id = keys.verify(token)
            if key_id is None:
                return self._refuse(
                    connection, http.HTTPStatus.UNAUTHORIZED,
                    Unauthorized("invalid API key: send 'Authorization: Bearer KEY'"), client_ip,
                    headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
        try:
            lease = self.connections.acquire(client_key(client_ip))
        except Busy as exc:
            return self._refuse(
                connection, http.HTTPStatus.SERVICE_UNAVAILABLE, exc, client_ip,
                headers={"Retry-After": str(max(1, round(exc.retry_after_s or 1)))},
            )  # fmt: skip
        self._admitted[connection] = Admitted(client_ip, key_id)
        # The slot is held until the TCP connection is gone, whether or not the
        # handshake completes and the handler runs.
        connection.connection_lost_waiter.add_done_callback(
            lambda _: self._forget(connection, lease)
        )
        return None

    def _forget(self, connection: ServerConnection, lease: Lease) -> None:
        lease.release()
        self._admitted.pop(connection, None)

    def _refuse(
        self,
        connection: ServerConnection,
        status: http.HTTPStatus,
        error: VoxrelayError,
        client_ip: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        metrics.ERRORS.labels("ws", error.code).inc()
        log.info(
            "refused a WebSocket handshake",
            extra={
                "event": "ws_refused",
                "peer": peer_name(connection, client_ip),
                "status": int(status),
                "code": error.code,
            },
        )
        body = error.message + "\n"
        return _respond(connection, status, body, headers=headers)

    # Connections

    async def _handle(self, connection: ServerConnection) -> None:
        session = Session(
            connection,
            self._admitted.get(connection),
            settings=self.settings,
            relay=self.relay,
            keys=self.keys,
        )
        self._sessions.add(session)
        metrics.WS_CONNECTIONS.inc()
        try:
            await session.run()
        finally:
            metrics.WS_CONNECTIONS.dec()
            self._sessions.discard(session)

    # Plain HTTP

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == STREAM_PATH:
            return self._admit(connection, request)
        if path == "/healthz":
            return _respond(connection, http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.draining:
                return _respond(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return _respond(connection, http.HTTPStatus.OK, "ready\n")
        if path == "/version":
            return _respond(
                connection,
                http.HTTPStatus.OK,
                json.dumps({"version": __version__}) + "\n",
                content_type="application/json",
            )
        if path in ("/", "/index.html"):
            try:
                page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
            except OSError:
                return _respond(
                    connection,
                    http.HTTPStatus.NOT_FOUND,
                    "the demo page is not installed (gateways/static/index.html)\n",
                )
            return _respond(
                connection,
                http.HTTPStatus.OK,
                page,
                content_type="text/html; charset=utf-8",
                headers={"Cache-Control": "no-cache", "Content-Security-Policy": page_policy(page)},
            )
        return _respond(
            connection,
            http.HTTPStatus.NOT_FOUND,
            f"not found: the WebSocket endpoint is {STREAM_PATH}\n",
        )


_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def page_policy(page: str) -> str:
    """Return the ``Content-Security-Policy`` of the demo *page*.

    Only the page's own inline script and style run (by their SHA-256), it talks to
    nothing but its own origin (``'self'`` covers ws: and wss: there), plays its
    MediaSource audio (``blob:``), and no other site may frame it (clickjacking a key
    field and a Speak button).
    """
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    script, style = (" ".join(hashes[kind]) or "'none'" for kind in ("script", "style"))
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {script}",
            f"style-src {style}",
            "connect-src 'self'",
            "media-src blob:",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def _respond(
    connection: ServerConnection,
    status: http.HTTPStatus,
    body: str,
    *,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    response = connection.respond(status, body)
    response_headers: Headers = response.headers
    if content_type is not None:
        del response_headers["Content-Type"]
        response_headers["Content-Type"] = content_type
    response_headers["X-Content-Type-Options"] = "nosniff"
    for name, value in (headers or {}).items():
        response_headers[name] = value
    return response
