"""Run one stream for a door: the outcome rules, the telemetry and cancellation, once.

A door translates its wire into a :class:`~.model.SynthesisRequest`, opens a
:class:`RelayedStream` and hands it a sink that translates events back::

    run = relay.open("grpc", peer, request, caller=caller, deadline=deadline)
    finished = await run.relay(sink)     # every event but the last goes to sink.send
    # send `finished`; or catch VoxrelayError (send it), ClientGone (send nothing)

Whatever happens, the stream is counted and logged once (:class:`~.telemetry.StreamRecord`),
its upstream calls are closed before :meth:`RelayedStream.relay` returns or raises, and
an error a door receives is always a :class:`~.errors.VoxrelayError`. A cancel the
caller asked for, a deadline it set running out and a client that vanished are told
apart here, not in each door.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Protocol

from .errors import Internal, UpstreamTimeout, VoxrelayError
from .model import (
    AudioChunk,
    AudioFormat,
    Event,
    Mode,
    SegmentStarted,
    StreamFinished,
    StreamStarted,
    SynthesisRequest,
    WordTiming,
    WordTimings,
)
from .synthesizer import SynthesisStream, Synthesizer
from .telemetry import StreamRecord, WireProtocol
from .text_input import TextInput
from .words import heard_in

__all__ = ["AudioClock", "ClientGone", "EventSink", "RefusalLog", "Relay", "RelayedStream"]

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected or stopped reading: nothing more can reach it."""


class EventSink(Protocol):
    """Where a door puts a stream's events on its wire."""

    async def send(self, event: StreamStarted | SegmentStarted | AudioChunk | WordTimings) -> None:
        """Deliver *event* to the client, or raise :class:`ClientGone`."""
        ...


#: Bytes per sample of the formats whose size says their duration.
_SAMPLE_WIDTH = {AudioFormat.PCM: 2, AudioFormat.WAV: 2, AudioFormat.MULAW: 1, AudioFormat.ALAW: 1}


class AudioClock:
    """Estimate how much audio a client has been sent.

    Formats with a fixed sample size are counted exactly; for compressed ones the
    current segment's ``start_ms`` is exact and its bytes so far are scaled by the
    bytes-per-millisecond of the segments before it.
    """

    def __init__(self) -> None:
        self.format: AudioFormat | None = None
        self.rate = 0
        self.segment_start_ms = 0
        self.segment_bytes = 0
        self.earlier_bytes = 0

    def started(self, event: StreamStarted) -> None:
        self.format, self.rate = event.format, event.sample_rate_hz

    def segment(self, event: SegmentStarted) -> None:
        self.earlier_bytes += self.segment_bytes
        self.segment_bytes = 0
        self.segment_start_ms = event.start_ms

    def audio(self, nbytes: int) -> None:
        self.segment_bytes += nbytes

    @property
    def exact(self) -> bool:
        """Whether the format's size says its duration (else :attr:`audio_ms` estimates)."""
        return self.format in _SAMPLE_WIDTH

    @property
    def audio_ms(self) -> int:
        sent = self.earlier_bytes + self.segment_bytes
        if not sent:
            return 0
        width = _SAMPLE_WIDTH.get(self.format) if self.format is not None else None
        if width and self.rate:
            return sent // width * 1000 // self.rate
        if self.earlier_bytes and self.segment_start_ms:
            return self.segment_start_ms + (
                self.segment_bytes * self.segment_start_ms // self.earlier_bytes
            )
        return self.segment_start_ms


class RefusalLog:
    """Let at most *per_second* refusal lines a second through for each peer.

    A client that sends bad frames in a loop must not fill the log: the rest are
    counted in the metrics only, and the next line logged says how many it stands for.
    """

    def __init__(self, per_second: int = 3, *, max_peers: int = 4096) -> None:
        self.per_second = per_second
        self.max_peers = max_peers
        # peer → (second of its window, lines logged in it, lines not logged since)
        self._peers: OrderedDict[str, tuple[int, int, int]] = OrderedDict()

    def admit(self, peer: str, now: float) -> tuple[bool, int]:
        """Return whether to log a refusal of *peer* now, and how many went unlogged."""
        second = int(now)
        window, logged, unlogged = self._peers.pop(peer, (second, 0, 0))
        if window != second:
            window, logged = second, 0
        if logged < self.per_second:
            self._peers[peer] = (window, logged + 1, 0)
            allowed, before = True, unlogged
        else:
            self._peers[peer] = (window, logged, unlogged + 1)
            allowed, before = False, 0
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        return allowed, before


class RelayedStream:
    """One request on its way through the core to one door's client."""

    def __init__(
        self,
        synthesizer: Synthesizer,
        record: StreamRecord,
        request: SynthesisRequest,
        *,
        caller: str | None,
        deadline: float | None,
        refusals: RefusalLog,
        share: str | None = None,
    ) -> None:
        self.record = record
        self._refusals = refusals
        self.request = request
        self.deadline = deadline
        self.clock = AudioClock()
        #: the words of the segments sent so far, and those segments (what was heard).
        self.words: list[WordTiming] = []
        self._segments: list[SegmentStarted] = []
        #: why a cancel of the task running :meth:`relay` would be: the door may say
        #: (``client``, ``disconnect``); else the deadline or the client, by the clock.
        self.cancel_reason: str | None = None
        self._stream: SynthesisStream = synthesizer.stream(
            request, deadline=deadline, caller=caller, share=share
        )

    @property
    def audio_ms(self) -> int:
        """The audio the client has been sent so far, in milliseconds."""
        return self.clock.audio_ms

    async def relay(self, sink: EventSink) -> StreamFinished:
        """Run the stream, sending its events to *sink*; return its final figures.

        Raises :class:`VoxrelayError` for a stream that failed (the door sends it),
        :class:`ClientGone` when the sink lost its client, and ``CancelledError`` when
        the door's task is cancelled. Each is recorded before it propagates.
        """
        finished: StreamFinished | None = None
        try:
            async with self._stream as events:
                async for event in events:
                    if isinstance(event, StreamFinished):
                        finished = event
                        continue
                    await self._deliver(event, sink)
        except VoxrelayError as exc:
            self._failed(exc)
            raise
        except ClientGone:
            self.end_cancelled("disconnect")
            raise
        except asyncio.CancelledError:
            self.end_cancelled(self.cancel_reason or self._why_cancelled())
            raise
        except Exception as exc:
            log.exception("internal error in stream %s", self.request.request_id[:128])
            error = Internal(f"internal error (request {self.request.request_id[:128]})")
            self._failed(error)
            raise error from exc
        if finished is None:
            error = Internal(f"stream {self.request.request_id[:128]} ended without finishing")
            self._failed(error)
            raise error
        self.record.end("ok", finished)
        return finished

    async def _deliver(self, event: Event, sink: EventSink) -> None:
        match event:
            case AudioChunk():
                await sink.send(event)
                self.clock.audio(len(event.data))
                self.record.audio(len(event.data))
            case StreamStarted():
                self.record.started_stream(event.request_id, event.voice, event.format)
                self.clock.started(event)
                await sink.send(event)
            case SegmentStarted():
                self.clock.segment(event)
                self._segments.append(event)
                await sink.send(event)
            case WordTimings():
                self.words.extend(event.words)
                if self.request.word_timestamps:
                    await sink.send(event)

    def heard_text(self, played_ms: int) -> str:
        """Return the text the listener heard by *played_ms* of this stream's audio."""
        return heard_in(self._segments, self.words, played_ms)

    def end_cancelled(self, reason: str) -> None:
        """Record the stream as cancelled (a no-op once it has ended otherwise).

        The audio logged is what the client got where the format tells it exactly, else
        what the stream had made.
        """
        audio_ms = self.clock.audio_ms if self.clock.exact else None
        self.record.end("cancelled", self._stream.figures, audio_ms=audio_ms, reason=reason)

    def _why_cancelled(self) -> str:
        late = self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline
        return "deadline" if late else "client"

    def _failed(self, error: VoxrelayError) -> None:
        if isinstance(error, UpstreamTimeout) and self._why_cancelled() == "deadline":
            # The caller's own deadline ran out first: its choice, not an upstream fault.
            self.end_cancelled("deadline")
            return
        logged, unlogged = True, 0
        if self.clock.format is None:  # refused before it started: logged sparingly
            logged, unlogged = self._refusals.admit(self.record.peer, time.monotonic())
        self.record.end(
            error.code, self._stream.figures, error=error, logged=logged, unlogged_before=unlogged
        )


class Relay:
    """Open relayed streams and record refusals, for every door alike."""

    def __init__(self, synthesizer: Synthesizer) -> None:
        self.synthesizer = synthesizer
        self.log_text = synthesizer.settings.log_text
        self.refusals = RefusalLog()

    def check_open(self) -> None:
        """Raise the refusal a new stream would get now (draining, or at capacity)."""
        self.synthesizer.runtime.check_open()

    def text_input(self) -> TextInput:
        """Make the input of a streamed-input request, with the settings' cap and idle end."""
        settings = self.synthesizer.settings
        return TextInput(max_chars=settings.max_stream_input_chars, idle_s=settings.input_idle_s)

    def open(
        self,
        protocol: WireProtocol,
        peer: str,
        request: SynthesisRequest,
        *,
        caller: str | None = None,
        deadline: float | None = None,
        share: str | None = None,
    ) -> RelayedStream:
        """Start accounting for *request* from *peer*; run it with :meth:`RelayedStream.relay`.

        *caller* is whom per-caller limits apply to; *deadline* a ``loop.time()``;
        *share* whom shared resources take turns between when that is not *caller*
        (an open gRPC door's client address).
        """
        record = StreamRecord(protocol, peer, request, log_text=self.log_text)
        return RelayedStream(
            self.synthesizer,
            record,
            request,
            caller=caller,
            deadline=deadline,
            refusals=self.refusals,
            share=share,
        )

    def refuse(
        self,
        protocol: WireProtocol,
        peer: str,
        error: VoxrelayError,
        *,
        request: SynthesisRequest | None = None,
        request_id: str = "",
        mode: Mode | None = None,
    ) -> None:
        """Count and log a request the door refused before it reached the core.

        Every refusal is counted; a few a second per peer are logged.
        """
        logged, unlogged = self.refusals.admit(peer, time.monotonic())
        record = StreamRecord(protocol, peer, request, request_id=request_id, mode=mode)
        record.end(error.code, error=error, logged=logged, unlogged_before=unlogged)
