"""The one failure a client finds by itself; everything a server says is a core error."""

from __future__ import annotations

from voxrelay.service.errors import Unavailable

__all__ = ["ConnectionFailed"]


class ConnectionFailed(Unavailable):
    """The server could not be reached, or the connection ended before the stream did.

    Its code is ``unavailable`` and it is retryable: nothing the server refused.
    """
