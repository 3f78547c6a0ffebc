"""Who is calling, and may they: API keys, browser origins and client addresses.

Keys are never logged or returned; a caller is known by a short, stable key id (a
hash prefix) that limits and logs may use. When the service is open, a WebSocket
caller is known by its client address instead, which :class:`TrustedProxies` reads
from ``X-Forwarded-For`` only when the connection comes from a configured proxy.

Nothing here knows a protocol: the doors pass in the header values they received.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from .errors import Unauthorized
from .logs import register_secrets
from .settings import Settings, normalise_origin

__all__ = [
    "KeyStore",
    "OriginPolicy",
    "TrustedProxies",
    "bearer_token",
    "client_key",
    "key_id",
]

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: IPv6 clients usually hold a whole /64: limits count it as one address.
IPV6_CLIENT_PREFIX = 64


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    """Return a short stable id of *key* that reveals nothing usable."""
    return "key-" + _digest(key).hex()[:12]


class KeyStore:
    """The configured API keys; empty means the service is open.

    Only SHA-256 digests are kept, and a token is compared with every one of them in
    constant time: equal-length digests mean the time taken tells nothing about how
    close a guess was, nor about how long the keys are.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._digests: tuple[bytes, ...] = ()
        self.reload()

    @property
    def required(self) -> bool:
        """Whether callers must present a key."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Read the keys again (``VOXRELAY_API_KEYS`` plus ``VOXRELAY_API_KEYS_FILE``).

        Connections already admitted stay admitted. A file that cannot be read, or that
        would leave a closed service with no keys (and so open it), changes nothing:
        the current keys stay in force. Return whether the keys were replaced.
        """
        try:
            keys = self._settings.all_api_keys()
        except (OSError, UnicodeDecodeError) as exc:
            log.error(
                "cannot read the API key file; keeping the current keys",
                extra={"event": "keys", "error": type(exc).__name__},
            )
            return False
        if self.required and not keys:
            log.error(
                "the API key file holds no keys; keeping the current ones"
                " (restart without keys to run open)",
                extra={"event": "keys"},
            )
            return False
        # Before they are in force: a key must not reach a log line even once.
        register_secrets(keys)
        self._digests = tuple(dict.fromkeys(_digest(k) for k in keys))
        if self._digests:
            log.info("API keys loaded", extra={"event": "keys", "count": len(self._digests)})
        return True

    def verify(self, token: str | None) -> str | None:
        """Return the caller's key id if *token* is a configured key, else None."""
        if token is None:
            return None
        candidate = _digest(token)
        match = False
        for digest in self._digests:
            match |= hmac.compare_digest(candidate, digest)
        return "key-" + candidate.hex()[:12] if match else None

    def authenticate(self, token: str | None) -> str | None:
        """Return the key id of *token*, None when the service is open, else refuse.

        Raise :class:`Unauthorized` when keys are required and *token* is missing or
        not one of them.
        """
        if not self.required:
            return None
        caller = self.verify(token)
        if caller is None:
            if token is None:
                raise Unauthorized("an API key is required: send 'authorization: Bearer KEY'")
            raise Unauthorized("the API key presented is not valid")
        return caller

    def holds(self, key_id: str) -> bool:
        """Return whether *key_id* names a key in force now (a reload may have removed it)."""
        return any(key_id == "key-" + digest.hex()[:12] for digest in self._digests)


def bearer_token(header: str | None) -> str | None:
    """Extract the token of an ``Authorization: Bearer TOKEN`` header value."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# Client addresses


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:443"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_key(ip: str) -> str:
    """Return what per-address limits count *ip* as: itself, or its /64 for IPv6."""
    address = _address(ip)
    if isinstance(address, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False)
        return str(network)
    return str(address) if address is not None else ip


class TrustedProxies:
    """Derive a client's address, believing ``X-Forwarded-For`` only from our proxies."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(entry.strip(), strict=False) for entry in entries
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustedProxies:
        return cls(settings.trusted_proxies)

    def trusts(self, ip: str) -> bool:
        address = _address(ip)
        return address is not None and any(address in net for net in self.networks)

    def client_ip(self, peer_ip: str, forwarded_for: Sequence[str] = ()) -> str:
        """Return the address of the client behind *peer_ip*.

        *forwarded_for* holds the ``X-Forwarded-For`` header values in order. The
        chain is read from the right (the hop nearest us), skipping our own proxies;
        the first address that is not one of them is the client. Entries a client
        wrote itself sit further left, so it cannot pose as someone else.
        """
        if not self.networks or not self.trusts(peer_ip):
            return peer_ip
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        client = peer_ip
        for hop in reversed([h for h in hops if h]):
            address = _address(hop)
            if address is None:
                break  # garbage in the chain: stop at the last hop we could read
            client = str(address)
            if not self.trusts(client):
                break
        return client


# Browser origins


def _own_host(host: str, public_hosts: frozenset[str]) -> bool:
    """Say whether *host* (a Host header's name, no port) can only mean this server.

    A name's address is whatever its DNS says, so a page on ``evil.example`` that
    rebinds its name to 127.0.0.1 would be "its own origin" to a server that trusted
    any Host: only addresses, ``localhost`` and the names the operator listed are ours.
    """
    if host == "localhost" or host in public_hosts:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class OriginPolicy:
    """Decide which browser origins may open a WebSocket.

    With no list configured: the server's own origin (the scheme it serves and the
    Host the client used, when that Host is an IP address, ``localhost`` or one of
    *public_hosts*) and clients that send no ``Origin`` (not browsers). A list
    replaces the own origin; ``*`` in it allows every origin.
    """

    def __init__(self, allowed: Iterable[str], public_hosts: Iterable[str] = ()) -> None:
        entries = [entry.strip() for entry in allowed if entry.strip()]
        self.any = "*" in entries
        self.allowed = frozenset(
            norm for entry in entries if (norm := normalise_origin(entry)) is not None
        )
        self.public_hosts = frozenset(h.strip().lower() for h in public_hosts if h.strip())

    @classmethod
    def from_settings(cls, settings: Settings) -> OriginPolicy:
        return cls(settings.allowed_origins, settings.public_hosts)

    def allows(self, origin: str | None, *, host: str | None, secure: bool) -> bool:
        """Say whether a handshake with *origin*, sent to *host*, may proceed."""
        if origin is None:
            return True
        if self.any:
            return True
        norm = normalise_origin(origin)
        if norm is None:
            return False  # "null" (a file or a sandboxed frame) and garbage
        if self.allowed:
            return norm in self.allowed
        if not host:
            return False
        own = normalise_origin(f"{'https' if secure else 'http'}://{host}")
        if own is None or not _own_host(urlsplit(own).hostname or "", self.public_hosts):
            return False
        return norm == own
