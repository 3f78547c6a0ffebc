"""The ways the benchmark asks for a spoken answer, each timed from the client's side.

- :class:`LimitClient`: the same upstream calls voxrelay makes, straight from the SDK,
  with voxrelay's own :class:`~service.chunker.SentenceChunker` deciding when the first
  segment is known. Its time to first audio is the limit no correct gateway can beat.
- :class:`NaiveClient`: the seed's first version: the whole reply, then the whole text
  in one speech call.
- :class:`GrpcClient` and :class:`WsClient`: voxrelay over its two doors.
- :class:`HttpClient`: voxrelay's OpenAI-compatible door, which speaks a text as written
  (no LLM), through the openai SDK; :class:`SpeechLimitClient` is its limit: the same
  speech calls straight from the SDK, segments cut by voxrelay's chunker.
- :class:`StreamInClient`: the caller runs the LLM (the same chat stream) and pipes its
  deltas into voxrelay's streamed input (gRPC ``SynthesizeStream``), as a voice agent
  with its own LLM does.

Each request returns a :class:`Sample`. A *probe* stops at the first audio byte (a cancel
on voxrelay's doors, closed responses on the SDK), for many time-to-first-audio samples
at a low cost; a full request reads everything and tracks whether the audio kept up with
real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import struct
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx2
import openai
from websockets.asyncio.client import ClientConnection, connect

from fakes.openai_upstream import DEFAULT_REPLY
from voxrelay.service.chunker import SentenceChunker
from voxrelay.service.planner import DEFAULT_SYSTEM_PROMPT
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

__all__ = [
    "PCM_BYTES_PER_S",
    "PROMPT",
    "VOXRELAY_KINDS",
    "GrpcClient",
    "HttpClient",
    "LimitClient",
    "NaiveClient",
    "Playback",
    "Sample",
    "SpeechLimitClient",
    "StreamInClient",
    "WsClient",
    "whole_sentence_chunker",
]

PROMPT = "How much is a ticket, and how often do the trains run?"
#: The clients that measure voxrelay itself (one per door).
VOXRELAY_KINDS = ("grpc", "ws", "http")
#: What the OpenAI door is asked to speak: the reply the chat doors get from the fake.
SPOKEN = DEFAULT_REPLY
LLM_MODEL = "gpt-4o-mini"  # voxrelay's defaults, so the upstream sees the same requests
TTS_MODEL = "gpt-4o-mini-tts"
VOICE = "alloy"
MAX_TOKENS = 512
#: s16le mono at 24 kHz, what OpenAI's speech API (and the fake) send for ``pcm``.
PCM_BYTES_PER_S = 24_000 * 2
#: voxrelay's mp3 is constant-rate, 64 kbit/s (service/audio.py)
MP3_BYTES_PER_S = 64_000 // 8
#: voxrelay speaks up to this many segments ahead (VOXRELAY_LOOKAHEAD_SEGMENTS' default).
LOOKAHEAD = 2
#: A 10 ms window whose RMS is above -45 dBFS is audible: the first one is the first sound.
AUDIBLE_WINDOW_S = 0.010
AUDIBLE_RMS = 32768 * 10 ** (-45 / 20)
#: streams per gRPC channel (one HTTP/2 connection each), as a client's pool would have.
STREAMS_PER_CHANNEL = 100
REQUEST_TIMEOUT_S = 120.0

_GRPC_FORMATS = {
    "pcm": pb.AUDIO_FORMAT_PCM,
    "wav": pb.AUDIO_FORMAT_WAV,
    "mp3": pb.AUDIO_FORMAT_MP3,
    "opus": pb.AUDIO_FORMAT_OPUS,
    "flac": pb.AUDIO_FORMAT_FLAC,
    "aac": pb.AUDIO_FORMAT_AAC,
    "mulaw": pb.AUDIO_FORMAT_MULAW,
    "alaw": pb.AUDIO_FORMAT_ALAW,
}


@dataclass(slots=True)
class Sample:
    """One request as the client saw it; times are seconds from its start."""

    started: float = 0.0  # time.perf_counter() when the request was sent
    ttfa: float | None = None
    #: when a listener playing the pcm from its first byte hears the first sound
    audible: float | None = None
    total: float | None = None
    audio_s: float = 0.0
    stall_s: float = 0.0
    error: str | None = None
    probe: bool = False


class Playback:
    """Play audio from its first byte on, as it arrives; add up the waits for more.

    A chunk that arrives after the audio before it has finished playing makes the
    player wait: that wait is a stall. Only byte-counted formats (pcm) are tracked.
    :meth:`listen` also finds when the first audible window plays (``audible``).
    """

    __slots__ = ("_carry", "_scanned", "audible", "audio_s", "bytes_per_s", "first", "stall_s")

    def __init__(self, bytes_per_s: int = PCM_BYTES_PER_S) -> None:
        self.bytes_per_s = bytes_per_s
        self.first: float | None = None
        self.audio_s = 0.0
        self.stall_s = 0.0
        #: the perf_counter() time the first audible window starts playing
        self.audible: float | None = None
        self._carry = b""
        self._scanned = 0  # bytes before _carry

    def arrive(self, at: float, nbytes: int) -> None:
        self.arrive_until(at, self.audio_s + nbytes / self.bytes_per_s)

    def arrive_until(self, at: float, audio_s: float) -> None:
        """Audio up to *audio_s* seconds of the stream has arrived at *at*."""
        if self.first is None:
            self.first = at
        else:
            due = self.first + self.stall_s + self.audio_s
            if at > due:
                self.stall_s += at - due
        self.audio_s = max(self.audio_s, audio_s)

    def listen(self, data: bytes) -> None:
        """Look for the first sound in *data*, the chunk :meth:`arrive` was just told of."""
        if self.audible is not None or self.first is None:
            return
        window = round(self.bytes_per_s * AUDIBLE_WINDOW_S) // 2 * 2
        data = self._carry + data
        at = 0
        while at + window <= len(data):
            samples = array("h", data[at : at + window])
            if math.sqrt(sum(x * x for x in samples) / len(samples)) > AUDIBLE_RMS:
                # Every byte of this chunk plays after the stalls so far.
                position = (self._scanned + at) / self.bytes_per_s
                self.audible = self.first + self.stall_s + position
                return
            at += window
        self._scanned += at
        self._carry = data[at:]


class OggClock:
    """How much audio the Ogg pages received so far end at (their granule positions).

    Opus is variable-rate, so its bytes do not tell its duration; each page's header
    does. Only whole pages count; a page split across messages counts once it is whole.
    """

    __slots__ = ("_carry", "audio_s", "rate")

    HEADER = struct.Struct("<4sBBqIIIB")

    def __init__(self, rate: int = 48_000) -> None:
        self.rate = rate
        self.audio_s = 0.0
        self._carry = b""

    def feed(self, data: bytes) -> float:
        """Take the next bytes of the stream; return the audio seconds its whole pages end at."""
        data = self._carry + data
        at = 0
        size = self.HEADER.size
        while at + size <= len(data):
            magic, _, _, granule, _, _, _, segments = self.HEADER.unpack_from(data, at)
            if magic != b"OggS":
                raise ValueError("not an Ogg page")
            body = at + size + segments
            if body > len(data):
                break
            end = body + sum(data[at + size : body])
            if end > len(data):
                break
            if granule > 0:
                self.audio_s = max(self.audio_s, granule / self.rate)
            at = end
        self._carry = data[at:]
        return self.audio_s


class Listener:
    """Playback of one stream in any format the bench asks for: stalls, and for pcm the first sound.

    pcm and the constant-bitrate mp3 are timed by their bytes; opus by its Ogg pages.
    Other formats are not tracked (no stall figures).
    """

    __slots__ = ("_ogg", "_pcm", "playback")

    def __init__(self, fmt: str) -> None:
        self._ogg = OggClock() if fmt == "opus" else None
        rate = {"pcm": PCM_BYTES_PER_S, "mp3": MP3_BYTES_PER_S, "opus": 1}.get(fmt)
        self.playback = Playback(rate) if rate is not None else None
        self._pcm = fmt == "pcm"

    def arrive(self, at: float, data: bytes) -> bool:
        """Take a message of the stream; return whether its audio has begun.

        An Ogg stream begins with header pages (no audio): its audio begins with the
        first page whose granule position is past zero.
        """
        playback = self.playback
        if self._ogg is not None:
            audio_s = self._ogg.feed(data)
            if audio_s <= 0:
                return False
            if playback is not None:
                playback.arrive_until(at, audio_s)
            return True
        if playback is not None:
            playback.arrive(at, len(data))
            if self._pcm:
                playback.listen(data)
        return bool(data)

    def settle(self, sample: Sample) -> None:
        """Copy the stall and the first sound into *sample*."""
        playback = self.playback
        if playback is None:
            return
        sample.stall_s = playback.stall_s
        if playback.audible is not None:
            sample.audible = playback.audible - sample.started


def _error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc:{exc.code().name}"
    if isinstance(exc, openai.APIStatusError):
        return f"http:{exc.status_code}"
    return type(exc).__name__


def _messages() -> list[Any]:
    return [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": PROMPT},
    ]


def whole_sentence_chunker() -> SentenceChunker:
    """A chunker that never releases the first segment early: it waits for its sentence."""
    return SentenceChunker(first_max_chars=300)  # its max_chars: no early cut before that


def sdk_client(base_url: str, connections: int) -> openai.AsyncOpenAI:
    """Return an SDK client configured as voxrelay configures its own."""
    return openai.AsyncOpenAI(
        api_key="bench",
        base_url=base_url,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(
            limits=httpx2.Limits(
                max_connections=connections, max_keepalive_connections=connections
            ),
            timeout=openai.Timeout(REQUEST_TIMEOUT_S, connect=5.0),
        ),
    )


async def _speech_response(client: openai.AsyncOpenAI, text: str) -> httpx2.Response:
    """Ask for *text* spoken as pcm, the way voxrelay's speech engine asks; the body streams."""
    return await client.post(
        "/audio/speech",
        body={"model": TTS_MODEL, "voice": VOICE, "input": text, "response_format": "pcm"},
        cast_to=httpx2.Response,
        options={"headers": {"Accept": "application/octet-stream"}},
        stream=True,
    )


def _chunk_text(chunk: object) -> str:
    """Return the content of a chat stream chunk, read as JSON the way voxrelay reads it."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not choices or not isinstance(choices[0], dict):
        return ""
    content = (choices[0].get("delta") or {}).get("content")
    return content if isinstance(content, str) else ""


class LimitClient:
    """voxrelay's upstream calls made directly, with no gateway in between."""

    kind = "limit"

    def __init__(
        self,
        base_url: str,
        streams: int,
        *,
        chunker: Callable[[], SentenceChunker] = SentenceChunker,
        kind: str = "limit",
    ) -> None:
        self.client = sdk_client(base_url, max(16, streams * (LOOKAHEAD + 1)))
        #: how segments are cut: voxrelay's chunker, or one that waits for a whole sentence.
        self.chunker = chunker
        self.kind = kind

    async def aclose(self) -> None:
        await self.client.close()

    async def _speak(self, text: str, *, first: bool, sample: Sample, probe: bool) -> int:
        nbytes = 0
        # The limit plays the first segment's bytes as they come, silence and all.
        playback = Playback() if first and not probe else None
        response = await _speech_response(self.client, text)
        try:
            async for chunk in response.aiter_bytes():
                if not chunk:
                    continue
                if first and sample.ttfa is None:
                    sample.ttfa = time.perf_counter() - sample.started
                    if probe:
                        break
                nbytes += len(chunk)
                if playback is not None and playback.audible is None:
                    playback.arrive(time.perf_counter(), len(chunk))
                    playback.listen(chunk)
                    if playback.audible is not None:
                        sample.audible = playback.audible - sample.started
        finally:
            await response.aclose()
        return nbytes

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None:
        """Run the chat stream; speak each segment the chunker releases, as voxrelay does."""
        del fmt  # the upstream only speaks pcm; formats are voxrelay's work
        probe = sample.probe
        sample.started = time.perf_counter()
        chunker = self.chunker()
        lookahead = asyncio.Semaphore(LOOKAHEAD)
        speakers: list[asyncio.Task[int]] = []

        async def speak(text: str, index: int) -> int:
            try:
                return await self._speak(text, first=index == 0, sample=sample, probe=probe)
            finally:
                lookahead.release()

        async def start(segment: str) -> None:
            await lookahead.acquire()
            speakers.append(asyncio.create_task(speak(segment, len(speakers))))

        try:
            stream = await self.client.post(
                "/chat/completions",
                body={
                    "model": LLM_MODEL,
                    "messages": _messages(),
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "max_tokens": MAX_TOKENS,
                },
                cast_to=object,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
            async with stream:
                async for chunk in stream:
                    for segment in chunker.feed(_chunk_text(chunk)):
                        await start(segment)
                    if probe and speakers:
                        break  # the first segment is known: the rest of the reply is moot
            if not probe:
                for segment in chunker.flush():
                    await start(segment)
            elif not speakers:
                for segment in chunker.flush()[:1]:
                    await start(segment)
            if probe:
                await speakers[0]
            else:
                nbytes = sum(await asyncio.gather(*speakers))
                sample.audio_s = nbytes / PCM_BYTES_PER_S
                sample.total = time.perf_counter() - sample.started
        except Exception as exc:
            sample.error = _error(exc)
        finally:
            for task in speakers:
                task.cancel()
            await asyncio.gather(*speakers, return_exceptions=True)


class NaiveClient:
    """The whole reply first, then the whole text as one speech call."""

    kind = "naive"

    def __init__(self, base_url: str, streams: int) -> None:
        self.client = sdk_client(base_url, max(16, streams * 2))

    async def aclose(self) -> None:
        await self.client.close()

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None:
        del fmt
        probe = sample.probe
        sample.started = time.perf_counter()
        try:
            reply = await self.client.chat.completions.create(
                model=LLM_MODEL, messages=_messages(), max_tokens=MAX_TOKENS
            )
            text = reply.choices[0].message.content or ""
            nbytes = 0
            response = await _speech_response(self.client, text)
            try:
                async for chunk in response.aiter_bytes():
                    if sample.ttfa is None and chunk:
                        sample.ttfa = time.perf_counter() - sample.started
                        if probe:
                            break
                    nbytes += len(chunk)
            finally:
                await response.aclose()
            if not probe:
                sample.audio_s = nbytes / PCM_BYTES_PER_S
                sample.total = time.perf_counter() - sample.started
        except Exception as exc:
            sample.error = _error(exc)


class GrpcClient:
    """voxrelay's ``Synthesize`` over a small pool of channels."""

    kind = "grpc"

    def __init__(
        self,
        target: str,
        streams: int,
        *,
        text: str = PROMPT,
        mode: str = "chat",
        words: bool | None = None,
        api_key: str | None = None,
        kind: str | None = None,
    ) -> None:
        """*words*: True asks for normalization and word timestamps, False for neither,
        None leaves both to the server's defaults. *api_key* goes in every call's metadata."""
        self.text = text
        self.mode = pb.MODE_SPEAK if mode == "speak" else pb.MODE_CHAT
        self.kind = kind or type(self).kind
        self.options: dict[str, Any] = {}
        if words is not None:
            self.options = {
                "word_timestamps": words,
                "normalization": (pb.TEXT_NORMALIZATION_ON if words else pb.TEXT_NORMALIZATION_OFF),
            }
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        count = max(1, -(-streams // STREAMS_PER_CHANNEL))
        # A local subchannel pool gives each channel its own HTTP/2 connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]
        self.stubs = [pb_grpc.SynthesizerStub(c) for c in self.channels]
        self._next = itertools.count()

    async def aclose(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None:
        stub = self.stubs[next(self._next) % len(self.stubs)]
        probe = sample.probe
        sample.started = time.perf_counter()
        listener = Listener(fmt)
        call = stub.Synthesize(
            pb.SynthesizeRequest(
                text=self.text,
                mode=self.mode,
                voice=VOICE,
                format=_GRPC_FORMATS[fmt],
                **self.options,
            ),
            timeout=REQUEST_TIMEOUT_S,
            metadata=self.metadata,
        )
        try:
            async for response in call:
                if response.HasField("audio"):
                    at = time.perf_counter()
                    if not listener.arrive(at, response.audio.data):
                        continue
                    if sample.ttfa is None:
                        sample.ttfa = at - sample.started
                        if probe:
                            call.cancel()
                            break
                elif response.HasField("finished"):
                    sample.total = time.perf_counter() - sample.started
                    sample.audio_s = response.finished.audio_ms / 1000
        except Exception as exc:
            sample.error = _error(exc)
        listener.settle(sample)
        if not probe and sample.error is None and sample.total is None:
            sample.error = "no_finished"


class StreamInClient:
    """The chat stream read by the caller, its deltas streamed into ``SynthesizeStream``."""

    kind = "stream_in"

    def __init__(self, base_url: str, target: str, streams: int) -> None:
        self.llm = sdk_client(base_url, max(16, streams))
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.SynthesizerStub(self.channel)

    async def aclose(self) -> None:
        await self.llm.close()
        await self.channel.close()

    async def _pipe(self, call: Any) -> None:
        """Write the LLM's deltas into *call* as they arrive, then half-close it.

        The LLM is asked at once, while the call is opened: a voice agent's LLM does not
        wait for its speech service.
        """
        config = pb.SynthesizeStreamRequest(
            config=pb.SynthesizeStreamConfig(voice=VOICE, format=pb.AUDIO_FORMAT_PCM)
        )
        _, stream = await asyncio.gather(
            call.write(config),
            self.llm.post(
                "/chat/completions",
                body={
                    "model": LLM_MODEL,
                    "messages": _messages(),
                    "stream": True,
                    "max_tokens": MAX_TOKENS,
                },
                cast_to=object,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            ),
        )
        async with stream:
            async for chunk in stream:
                if text := _chunk_text(chunk):
                    await call.write(pb.SynthesizeStreamRequest(text=text))
        await call.done_writing()

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None:
        del fmt  # pcm, as the limit it is compared with
        probe = sample.probe
        sample.started = time.perf_counter()
        playback = Playback()
        call = self.stub.SynthesizeStream(timeout=REQUEST_TIMEOUT_S)
        writer = asyncio.create_task(self._pipe(call))
        try:
            async for response in call:
                if response.HasField("audio"):
                    at = time.perf_counter()
                    if sample.ttfa is None:
                        sample.ttfa = at - sample.started
                        if probe:
                            break
                    playback.arrive(at, len(response.audio.data))
                elif response.HasField("finished"):
                    sample.total = time.perf_counter() - sample.started
                    sample.audio_s = response.finished.audio_ms / 1000
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                raise writer.exception()  # type: ignore[misc]
        except Exception as exc:
            sample.error = _error(exc)
        finally:
            call.cancel()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        sample.stall_s = playback.stall_s
        if not probe and sample.error is None and sample.total is None:
            sample.error = "no_finished"


class WsClient:
    """voxrelay's WebSocket door: one connection per concurrent stream, reused."""

    kind = "ws"

    def __init__(self, url: str, streams: int, *, text: str = PROMPT, mode: str = "chat") -> None:
        self.url = url
        self.text = text
        self.mode = mode
        self.idle: list[ClientConnection] = []
        self._ids = itertools.count()
        self._want = streams

    async def open(self, count: int | None = None) -> None:
        """Open the connections before the clock starts, in batches."""
        want = self._want if count is None else count
        while len(self.idle) < want:
            batch = min(100, want - len(self.idle))
            self.idle += await asyncio.gather(*(self._connect() for _ in range(batch)))

    async def _connect(self) -> ClientConnection:
        return await connect(
            self.url, compression=None, max_size=None, ping_interval=None, open_timeout=30
        )

    async def aclose(self) -> None:
        conns, self.idle = self.idle, []
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None:
        ws = self.idle.pop() if self.idle else await self._connect()
        probe = sample.probe
        sample.started = time.perf_counter()
        listener = Listener(fmt)
        request_id = f"b{next(self._ids)}"
        healthy = True
        try:
            await ws.send(
                json.dumps(
                    {
                        "type": "synthesize",
                        "id": request_id,
                        "text": self.text,
                        "mode": self.mode,
                        "voice": VOICE,
                        "format": fmt,
                    }
                )
            )
            cancelled = False
            async for message in ws:
                if isinstance(message, bytes):
                    if cancelled:
                        continue
                    at = time.perf_counter()
                    if not listener.arrive(at, message):
                        continue
                    if sample.ttfa is None:
                        sample.ttfa = at - sample.started
                        if probe:
                            cancelled = True
                            await ws.send(json.dumps({"type": "cancel", "id": request_id}))
                    continue
                frame = json.loads(message)
                kind = frame.get("type")
                if kind == "finished":
                    if not cancelled:
                        sample.total = time.perf_counter() - sample.started
                        sample.audio_s = frame.get("audio_ms", 0) / 1000
                    break
                if kind == "cancelled":
                    break
                if kind == "error":
                    sample.error = f"ws:{frame.get('code')}"
                    break
            else:
                sample.error = f"ws_closed:{ws.close_code}"
                healthy = False
        except Exception as exc:
            sample.error = _error(exc)
            healthy = False
        listener.settle(sample)
        if healthy:
            self.idle.append(ws)
        else:
            with contextlib.suppress(Exception):
                await ws.close()


class SpeechLimitClient:
    """The OpenAI door's limit: its speech calls straight from the SDK, with its look-ahead."""

    kind = "speech_limit"

    def __init__(self, base_url: str, streams: int) -> None:
        self._limit = LimitClient(base_url, streams, kind=self.kind)

    async def aclose(self) -> None:
        await self._limit.aclose()

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None:
        """Cut :data:`SPOKEN` as voxrelay does and speak its segments, two at a time.

        voxrelay knows the whole text at once, so it asks for its first two segments
        together; a probe does too, and times the first.
        """
        del fmt  # the upstream only speaks pcm
        probe = sample.probe
        sample.started = time.perf_counter()
        chunker = SentenceChunker()
        segments = chunker.feed(SPOKEN) + chunker.flush()
        if probe:
            segments = segments[:LOOKAHEAD]
        lookahead = asyncio.Semaphore(LOOKAHEAD)

        async def speak(text: str, index: int) -> int:
            async with lookahead:
                return await self._limit._speak(text, first=index == 0, sample=sample, probe=probe)

        speakers = [asyncio.create_task(speak(t, i)) for i, t in enumerate(segments)]
        try:
            if probe:
                await speakers[0]  # its first byte is the probe's; the rest is moot
            else:
                sizes = await asyncio.gather(*speakers)
                sample.audio_s = sum(sizes) / PCM_BYTES_PER_S
                sample.total = time.perf_counter() - sample.started
        except Exception as exc:
            sample.error = _error(exc)
        finally:
            for task in speakers:
                task.cancel()
            await asyncio.gather(*speakers, return_exceptions=True)


class HttpClient:
    """voxrelay's OpenAI-compatible door, through the openai SDK as its users call it."""

    kind = "http"

    def __init__(self, base_url: str, streams: int) -> None:
        self.client = sdk_client(base_url, max(16, streams))

    async def aclose(self) -> None:
        await self.client.close()

    async def request(self, sample: Sample, *, fmt: str = "pcm") -> None:
        probe = sample.probe
        listener = Listener(fmt)
        nbytes = 0
        sample.started = time.perf_counter()
        try:
            response = await self.client.post(
                "/audio/speech",
                body={"model": TTS_MODEL, "voice": VOICE, "input": SPOKEN, "response_format": fmt},
                cast_to=httpx2.Response,
                options={"headers": {"Accept": "application/octet-stream"}},
                stream=True,
            )
            try:
                async for chunk in response.aiter_bytes():
                    if not chunk:
                        continue
                    at = time.perf_counter()
                    nbytes += len(chunk)
                    if not listener.arrive(at, chunk):
                        continue
                    if sample.ttfa is None:
                        sample.ttfa = at - sample.started
                        if probe:
                            break  # closing the response disconnects: voxrelay cancels
            finally:
                await response.aclose()
            if not probe:
                sample.total = time.perf_counter() - sample.started
                sample.audio_s = nbytes / PCM_BYTES_PER_S
        except Exception as exc:
            sample.error = _error(exc)
        listener.settle(sample)
