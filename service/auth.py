"""Caller authentication: API keys from settings, compared in constant time.

Keys are never logged or returned; a caller is known by a short, stable key id
(a hash prefix) that limits and logs may use.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from .settings import Settings

__all__ = ["KeyStore", "bearer_token", "key_id"]

log = logging.getLogger(__name__)


def key_id(key: str) -> str:
    """Return a short stable id of *key* that reveals nothing usable."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyStore:
    """The configured API keys; empty means the service is open."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys: tuple[bytes, ...] = ()
        self.reload()

    @property
    def required(self) -> bool:
        """Whether callers must present a key."""
        return bool(self._keys)

    def reload(self) -> None:
        """Read the keys again (``VOXRELAY_API_KEYS`` plus ``VOXRELAY_API_KEYS_FILE``)."""
        try:
            keys = self._settings.all_api_keys()
        except OSError as exc:
            log.error("cannot read the API key file; keeping the current keys: %s", exc)
            return
        self._keys = tuple(k.encode() for k in keys)
        log.info("API keys loaded", extra={"event": "keys", "count": len(self._keys)})

    def verify(self, token: str | None) -> str | None:
        """Return the caller's key id if *token* is a configured key, else None.

        Every key is compared, in constant time, so timing tells nothing.
        """
        if token is None:
            return None
        candidate = token.encode()
        match: bytes | None = None
        for key in self._keys:
            if hmac.compare_digest(candidate, key):
                match = key
        return key_id(match.decode()) if match is not None else None


def bearer_token(header: str | None) -> str | None:
    """Extract the token of an ``Authorization: Bearer TOKEN`` header value."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
