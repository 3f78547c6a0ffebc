"""A client of voxrelay for backend services: ``from voxrelay.client import Client``.

::

    async with Client("127.0.0.1:50051") as client:
        async for event in client.synthesize("Hello there.", mode="speak"):
            ...

Over gRPC (the default) or WebSocket (a ``ws://`` URL, or ``via="ws"``), the events are the
core's own (:mod:`voxrelay.service.model`) and a failure is the core's typed error
(:mod:`voxrelay.service.errors`), whichever door carried them.
"""

from __future__ import annotations

from voxrelay.service.model import (
    AudioChunk,
    AudioFormat,
    ChatMessage,
    Event,
    Mode,
    SegmentStarted,
    StreamFinished,
    StreamStarted,
    Voice,
    WordTiming,
    WordTimings,
)
from voxrelay.service.text_input import FLUSH, Flush

from .client import TLS, Client, Via
from .errors import ConnectionFailed
from .synthesis import Synthesis

__all__ = [
    "FLUSH",
    "TLS",
    "AudioChunk",
    "AudioFormat",
    "ChatMessage",
    "Client",
    "ConnectionFailed",
    "Event",
    "Flush",
    "Mode",
    "SegmentStarted",
    "StreamFinished",
    "StreamStarted",
    "Synthesis",
    "Via",
    "Voice",
    "WordTiming",
    "WordTimings",
]
