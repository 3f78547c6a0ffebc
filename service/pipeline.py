"""The two shapes a stream's audio is made in, from its plan to its :class:`StreamOutput`.

- :class:`ChainedPipeline`: text (the LLM's reply as it is written, or the caller's own
  text) → :class:`~.chunker.SentenceChunker` → the speech engine, one call per segment,
  the next segment spoken while the one before is still being sent.
- :class:`SpeakingPipeline`: a speaking model writes and speaks the reply in one upstream
  call; its transcript is cut into segments by a :class:`~.alignment.TranscriptAligner`.

Either ends in the stream's one :class:`~.output.StreamOutput` and returns the reply's text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

from . import metrics
from .alignment import TranscriptAligner
from .cache import Phrase, PhraseCache, PhraseKey, Recording
from .chunker import SentenceChunker
from .engines import Engines
from .errors import VoxrelayError
from .model import Mode, StreamFinished, StreamStarted
from .output import PcmFeed, StreamOutput
from .planner import Plan
from .providers.base import ReadHold
from .resilience import guarded_stream
from .settings import Settings
from .silence import SilenceTrimmer
from .speakable import SpeakableText
from .spoken import Spoken
from .text_input import FLUSH, Flush
from .words import SpeechSpan, WordMark, estimate_in, from_marks

__all__ = ["ChainedPipeline", "Segment", "SegmentLocator", "SpeakingPipeline", "StreamContext"]

#: A read that took longer than this found the upstream's socket empty.
READ_WAITED_S = 0.001
#: An upstream's socket is left to fill for this long at most: longer, and a segment's
#: download (and with it the request for the next segment) drags.
MAX_READ_HOLD_S = 0.1
#: No upstream call waits longer than this when its stage has no timeout (``0``).
UNBOUNDED_CALL_S = 600.0
#: A replayed phrase goes into its feed in pieces this long: the first goes out alone,
#: so its encode (and the listener's first audio) does not wait for the whole phrase.
REPLAY_CHUNK_MS = 40


@dataclass(frozen=True, slots=True)
class StreamContext:
    """What a pipeline needs to know of its stream."""

    plan: Plan
    settings: Settings
    engines: Engines
    #: the ``loop.time()`` the caller gives up at, if any.
    deadline: float | None
    #: whom the stream is for (a key id or a client address), for fair shares.
    caller: str | None
    #: the process's normalization and lexicon.
    speakable: SpeakableText
    #: the process's phrase cache (None: off).
    phrases: PhraseCache | None = None
    #: charge a streamed input's piece (its length) to the caller's budget, or refuse it.
    charge: Callable[[int], Awaitable[None]] | None = None


def _fresh(marks: list[WordMark]) -> list[WordMark]:
    """Empty *marks* for a new attempt at a call (a retry starts the segment over)."""
    marks.clear()
    return marks


def _call_timeout(timeout_s: float) -> float:
    return timeout_s or UNBOUNDED_CALL_S


def _trimmer(settings: Settings, sample_rate: int) -> SilenceTrimmer | None:
    if not settings.trim_silence:
        return None
    return SilenceTrimmer(sample_rate, pause_ms=settings.segment_pause_ms)


def _shifted(marks: list[WordMark], cut_ms: int) -> list[WordMark]:
    """*marks* on the clock of the audio as sent, whose first *cut_ms* were cut away."""
    if not cut_ms:
        return marks
    return [replace(m, time_ms=max(0, m.time_ms - cut_ms)) for m in marks]


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment of the text: as written, as the engine is given it, and where it stands."""

    text: str
    spoken: Spoken
    #: where ``text`` starts in the whole text (the reply, or the caller's text).
    offset: int


class SegmentLocator:
    """Find each segment's offset in a text that arrives in pieces (sans-I/O).

    Segments are stripped slices of the text, in order; only the text after the last
    segment found is kept.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._base = 0

    def feed(self, piece: str) -> None:
        self._pending += piece

    def locate(self, segment: str) -> int:
        at = self._pending.find(segment)
        at = max(at, 0)
        offset = self._base + at
        cut = at + len(segment)
        self._pending = self._pending[cut:]
        self._base += cut
        return offset


class ChainedPipeline:
    """Text → segments → speech, pipelined: segment k+1 is spoken while k is sent."""

    def __init__(self, ctx: StreamContext, out: StreamOutput) -> None:
        self.ctx = ctx
        self.out = out
        self.reply_parts: list[str] = []
        #: each segment's text as written and its offset, shaped once it is to be spoken.
        self._segments: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
        self._spoken: asyncio.Queue[tuple[Segment, PcmFeed, list[WordMark]] | None] = (
            asyncio.Queue()
        )
        self._lookahead = asyncio.Semaphore(ctx.settings.lookahead_segments)
        #: why a streamed input stopped the text early; the audio in flight then ends
        #: between two chunks, so that what was sent is one whole file once flushed.
        self._refusal: VoxrelayError | None = None

    async def run(self, started: StreamStarted) -> str:
        """Produce the stream; *started* goes out once the first upstream call is under way."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._write())
            tg.create_task(self._schedule(tg))
            # Announced after the tasks are made, so the door's send comes after the
            # first upstream request is on its way. Nothing else can reach the queue first.
            await self.out.emit(started)
            await self._relay()
        return "".join(self.reply_parts)

    async def _write(self) -> None:
        """Cut the text into segments as it arrives."""
        plan = self.ctx.plan
        chunker = SentenceChunker()
        locator = SegmentLocator()

        def put(segments: list[str]) -> None:
            for text in segments:
                self._segments.put_nowait((text, locator.locate(text)))

        try:
            async with aclosing(self._text()) as pieces:
                async for piece in pieces:
                    if piece is FLUSH:
                        put(chunker.cut())
                        continue
                    self.reply_parts.append(piece)
                    locator.feed(piece)
                    put(chunker.feed(piece))
        except VoxrelayError as exc:
            if plan.input is None:
                raise
            self._refusal = exc
            self._segments.put_nowait(None)
            return
        put(chunker.flush())
        self._segments.put_nowait(None)

    async def _text(self) -> AsyncIterator[str | Flush]:
        """Yield the text to speak: the caller's own (speak mode, whole or streamed in)
        or the LLM's reply."""
        plan = self.ctx.plan
        if plan.mode is Mode.SPEAK:
            if plan.text:
                yield plan.text
            if plan.input is not None:
                async with aclosing(plan.input.pieces(self.ctx.charge)) as pieces:
                    async for piece in pieces:
                        yield piece
            return
        engines, settings, finished = self.ctx.engines, self.ctx.settings, self.out.finished
        chat, stage = engines.chat, engines.llm_stage
        assert chat is not None and stage is not None  # chat mode without a speaking model

        def first_token() -> None:
            finished.llm_first_token_ms = self.out.since()

        deltas = guarded_stream(
            stage,
            lambda: chat.stream(
                plan.messages,
                max_tokens=settings.max_reply_tokens,
                timeout=_call_timeout(settings.llm_timeout_s),
            ),
            deadline=self.ctx.deadline,
            on_first=first_token,
        )
        async with aclosing(deltas) as reply:
            async for delta in reply:
                count_usage(finished, chat.name, delta.prompt_tokens, delta.completion_tokens)
                if delta.text:
                    yield delta.text

    async def _schedule(self, tg: asyncio.TaskGroup) -> None:
        """Make each segment speakable and start speaking it as soon as the look-ahead allows.

        A segment is shaped (normalized, the lexicon applied) only then, in order: the
        shaping of a long text's later segments comes after the first audio, not before.
        """
        plan = self.ctx.plan
        shape = self.ctx.speakable.shaper(normalize=plan.normalize, language=plan.language)
        while (written := await self._segments.get()) is not None:
            await self._lookahead.acquire()
            text, offset = written
            segment = Segment(text, shape(text), offset)
            feed = PcmFeed()
            marks: list[WordMark] = []
            tg.create_task(self._speak(segment.spoken.text, feed, marks))
            self._spoken.put_nowait((segment, feed, marks))
        self._spoken.put_nowait(None)

    async def _speak(self, text: str, feed: PcmFeed, marks: list[WordMark]) -> None:
        """Speak one segment into *feed* (nothing, when nothing of it is to be said);
        an engine that reports its words puts them in *marks*."""
        if not text.strip():
            feed.end()
            return
        ctx = self.ctx
        if ctx.phrases is None:
            await self._synthesize(text, feed, marks, None)
            feed.end()
            return
        speech, plan = ctx.engines.speech, ctx.plan
        key = PhraseKey(
            speech.name,
            speech.model,
            plan.voice,
            plan.speed,
            plan.instructions,
            speech.sample_rate,
            text,
        )
        async with ctx.phrases.phrase(key) as found:
            if found.hit is not None:
                await self._replay(found.hit, feed, marks)
            else:
                await self._synthesize(text, feed, marks, found.recording)
                if found.recording is not None:
                    found.recording.complete(tuple(marks) if speech.reports_words else None)
        feed.end()

    async def _replay(self, phrase: Phrase, feed: PcmFeed, marks: list[WordMark]) -> None:
        """Put a cached phrase into *feed* as the engine would have, with no upstream call."""
        out = self.out
        marks[:] = phrase.marks or ()
        if not out.finished.tts_first_byte_ms:
            out.finished.tts_first_byte_ms = out.since()
        pcm = phrase.pcm
        step = max(2, phrase.sample_rate * REPLAY_CHUNK_MS // 1000 * 2)
        for at in range(0, len(pcm), step):
            await feed.put(pcm[at : at + step])
            # Let the stream take the first piece before the rest gathers behind it.
            if at == 0:
                await asyncio.sleep(0)

    async def _synthesize(
        self, text: str, feed: PcmFeed, marks: list[WordMark], recording: Recording | None
    ) -> None:
        """Ask the speech engine for *text*, into *feed* (and *recording*, when given);
        the engine's word marks, if it reports them, go in *marks*."""
        ctx, out = self.ctx, self.out
        speech, finished = ctx.engines.speech, out.finished
        loop = asyncio.get_running_loop()

        def first_byte() -> None:
            if not finished.tts_first_byte_ms:
                finished.tts_first_byte_ms = out.since()

        metrics.UPSTREAM_CHARACTERS.labels(speech.name).inc(len(text))
        socket = ReadHold()
        pcm = guarded_stream(
            ctx.engines.tts_stage,
            lambda: speech.synthesize(
                text,
                voice=ctx.plan.voice,
                speed=ctx.plan.speed,
                instructions=ctx.plan.instructions,
                timeout=_call_timeout(ctx.settings.tts_timeout_s),
                caller=ctx.caller,
                marks=_fresh(marks),
                hold=socket,
            ),
            deadline=ctx.deadline,
            on_first=first_byte,
        )
        async with aclosing(pcm) as chunks:
            while True:
                began = loop.time()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                if recording is not None:
                    recording.add(chunk)
                await feed.put(chunk)
                # The socket ran dry. While the listener has audio in hand, let the next
                # chunks gather there and read them in one go: one wake-up, not one each.
                if loop.time() - began > READ_WAITED_S and (hold := out.hold_s()) > 0:
                    await socket.hold(min(hold, MAX_READ_HOLD_S))

    async def _relay(self) -> None:
        """Send the segments in order, each with its audio as it comes, then its words."""
        out = self.out
        rate = self.ctx.engines.speech.sample_rate
        trim = _trimmer(self.ctx.settings, rate)
        speech = self.ctx.engines.speech
        while (item := await self._spoken.get()) is not None:
            self._check_refusal()
            segment, feed, marks = item
            spoken = segment.spoken
            start_ms = out.audio_ms
            await out.segment(
                segment.text,
                spoken=spoken.text if spoken.changed else "",
                text_offset=segment.offset,
            )
            # Words are placed in the audio as sent: the span sees the trimmed PCM.
            span = SpeechSpan(rate)
            while (pcm := await feed.take(hold_s=out.hold_s())) is not None:
                self._check_refusal()
                if trim is not None and not (pcm := trim.feed(pcm)):
                    continue
                first = not out.finished.audio_bytes
                await out.audio(pcm)
                span.feed(pcm)
                if first and out.finished.audio_bytes:
                    # The stream's first audio goes out before the rest of the reply is
                    # worked on: until the door has sent it, the loop is the door's.
                    await out.delivered()
            cut_ms = 0
            if trim is not None:
                cut_ms = trim.cut_ms
                if tail := trim.end():
                    await out.audio(tail)
                    span.feed(tail)
            self._lookahead.release()
            if speech.reports_words:
                timings = from_marks(
                    segment.text,
                    spoken,
                    _shifted(marks, cut_ms),
                    offset_ms=start_ms,
                    audio_ms=span.audio_ms,
                    text_offset=segment.offset,
                )
            else:
                first, last = span.bounds()
                timings = estimate_in(
                    segment.text,
                    spoken,
                    first,
                    last,
                    span.audio_ms,
                    offset_ms=start_ms,
                    text_offset=segment.offset,
                )
            await out.words(timings, estimated=not speech.reports_words)
        self._check_refusal()

    def _check_refusal(self) -> None:
        if self._refusal is not None:
            self.out.capped = True  # what was sent ends as one whole file
            raise self._refusal


class SpeakingPipeline:
    """A speaking model's reply: its transcript cut into segments, its audio in between.

    The model speaks its own words, so they are not normalized; each segment's words
    are fitted into its audio once the next segment begins (or the reply ends).
    """

    def __init__(self, ctx: StreamContext, out: StreamOutput) -> None:
        self.ctx = ctx
        self.out = out
        speaking = ctx.engines.speaking
        assert speaking is not None
        self.rate = speaking.sample_rate
        self._locator = SegmentLocator()
        self._current: tuple[str, int, int] | None = None
        self._span: SpeechSpan | None = None
        # One model speaks the whole reply, so its pauses are its own: only the reply's
        # leading silence is cut (the trimmer sees the reply as one segment).
        self._trim = _trimmer(ctx.settings, self.rate)

    async def run(self, started: StreamStarted) -> str:
        """Produce the stream and return the reply's transcript."""
        ctx, out = self.ctx, self.out
        speaking, stage = ctx.engines.speaking, ctx.engines.realtime_stage
        assert speaking is not None and stage is not None
        finished = out.finished
        aligner = TranscriptAligner()
        transcript: list[str] = []

        def first_delta() -> None:
            finished.llm_first_token_ms = out.since()

        await out.emit(started)
        deltas = guarded_stream(
            stage,
            lambda: speaking.respond(
                ctx.plan.messages,
                voice=ctx.plan.voice,
                speed=ctx.plan.speed,
                max_output_tokens=ctx.settings.realtime_max_output_tokens,
                timeout=_call_timeout(ctx.settings.llm_timeout_s),
            ),
            deadline=ctx.deadline,
            on_first=first_delta,
        )
        async with aclosing(deltas) as reply:
            async for delta in reply:
                if delta.text:
                    transcript.append(delta.text)
                    self._locator.feed(delta.text)
                    await self._send(aligner.transcript(delta.text))
                elif delta.pcm:
                    if not finished.tts_first_byte_ms:
                        finished.tts_first_byte_ms = out.since()
                    await self._send(aligner.audio(delta.pcm))
                count_usage(finished, speaking.name, delta.prompt_tokens, delta.completion_tokens)
        await self._send(aligner.end())
        if self._trim is not None:
            await self._send_audio(self._trim.end())
        await self._close_segment()
        return "".join(transcript)

    async def _send(self, items: list[str | bytes]) -> None:
        """Send segment texts and PCM in order; each segment's words follow its audio."""
        out = self.out
        for item in items:
            if isinstance(item, bytes):
                await self._send_audio(item if self._trim is None else self._trim.feed(item))
                continue
            await self._close_segment()
            offset = self._locator.locate(item)
            self._current = (item, out.audio_ms, offset)
            self._span = SpeechSpan(self.rate)
            await out.segment(item, text_offset=offset)

    async def _send_audio(self, pcm: bytes) -> None:
        if pcm:
            await self.out.audio(pcm)
            if self._span is not None:
                self._span.feed(pcm)

    async def _close_segment(self) -> None:
        """Send the words of the segment whose audio is complete, fitted into it."""
        if self._current is None or self._span is None:
            return
        text, start_ms, offset = self._current
        first, last = self._span.bounds()
        timings = estimate_in(
            text,
            Spoken.verbatim(text),
            first,
            last,
            self._span.audio_ms,
            offset_ms=start_ms,
            text_offset=offset,
        )
        self._current = self._span = None
        await self.out.words(timings, estimated=True)


def count_usage(
    finished: StreamFinished, provider: str, prompt: int | None, completion: int | None
) -> None:
    """Note the upstream's reported token usage in *finished* and the cost counters."""
    if prompt is not None:
        finished.prompt_tokens = prompt
        metrics.UPSTREAM_TOKENS.labels(provider, "prompt").inc(prompt)
    if completion is not None:
        finished.completion_tokens = completion
        metrics.UPSTREAM_TOKENS.labels(provider, "completion").inc(completion)
