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
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from . import metrics
from .alignment import TranscriptAligner
from .chunker import SentenceChunker
from .engines import Engines
from .model import Mode, StreamFinished, StreamStarted
from .output import PcmFeed, StreamOutput
from .planner import Plan
from .resilience import guarded_stream
from .settings import Settings

__all__ = ["ChainedPipeline", "SpeakingPipeline", "StreamContext"]

#: A read that took longer than this found the upstream's socket empty.
READ_WAITED_S = 0.001
#: An upstream's socket is left to fill for this long at most: longer, and a segment's
#: download (and with it the request for the next segment) drags.
MAX_READ_HOLD_S = 0.1
#: No upstream call waits longer than this when its stage has no timeout (``0``).
UNBOUNDED_CALL_S = 600.0


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


def _call_timeout(timeout_s: float) -> float:
    return timeout_s or UNBOUNDED_CALL_S


class ChainedPipeline:
    """Text → segments → speech, pipelined: segment k+1 is spoken while k is sent."""

    def __init__(self, ctx: StreamContext, out: StreamOutput) -> None:
        self.ctx = ctx
        self.out = out
        self.reply_parts: list[str] = []
        self._segments: asyncio.Queue[str | None] = asyncio.Queue()
        self._spoken: asyncio.Queue[tuple[str, PcmFeed] | None] = asyncio.Queue()
        self._lookahead = asyncio.Semaphore(ctx.settings.lookahead_segments)

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
        chunker = SentenceChunker()
        async with aclosing(self._text()) as pieces:
            async for piece in pieces:
                self.reply_parts.append(piece)
                for segment in chunker.feed(piece):
                    self._segments.put_nowait(segment)
        for segment in chunker.flush():
            self._segments.put_nowait(segment)
        self._segments.put_nowait(None)

    async def _text(self) -> AsyncIterator[str]:
        """Yield the text to speak: the caller's own (speak mode) or the LLM's reply."""
        plan = self.ctx.plan
        if plan.mode is Mode.SPEAK:
            yield plan.text
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
        """Start speaking each segment as soon as the look-ahead allows."""
        while (text := await self._segments.get()) is not None:
            await self._lookahead.acquire()
            feed = PcmFeed()
            tg.create_task(self._speak(text, feed))
            self._spoken.put_nowait((text, feed))
        self._spoken.put_nowait(None)

    async def _speak(self, text: str, feed: PcmFeed) -> None:
        """Speak one segment into *feed*."""
        ctx, out = self.ctx, self.out
        speech, finished = ctx.engines.speech, out.finished
        loop = asyncio.get_running_loop()

        def first_byte() -> None:
            if not finished.tts_first_byte_ms:
                finished.tts_first_byte_ms = out.since()

        metrics.UPSTREAM_CHARACTERS.labels(speech.name).inc(len(text))
        pcm = guarded_stream(
            ctx.engines.tts_stage,
            lambda: speech.synthesize(
                text,
                voice=ctx.plan.voice,
                speed=ctx.plan.speed,
                instructions=ctx.plan.instructions,
                timeout=_call_timeout(ctx.settings.tts_timeout_s),
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
                await feed.put(chunk)
                # The socket ran dry. While the listener has audio in hand, let the next
                # chunks gather there and read them in one go: one wake-up, not one each.
                if loop.time() - began > READ_WAITED_S and (hold := out.hold_s()) > 0:
                    await asyncio.sleep(min(hold, MAX_READ_HOLD_S))
        feed.end()

    async def _relay(self) -> None:
        """Send the segments in order, each with its audio as it comes."""
        out = self.out
        while (item := await self._spoken.get()) is not None:
            text, feed = item
            await out.segment(text)
            while (pcm := await feed.take(hold_s=out.hold_s())) is not None:
                await out.audio(pcm)
            self._lookahead.release()


class SpeakingPipeline:
    """A speaking model's reply: its transcript cut into segments, its audio in between."""

    def __init__(self, ctx: StreamContext, out: StreamOutput) -> None:
        self.ctx = ctx
        self.out = out

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
                    await out.send(aligner.transcript(delta.text))
                elif delta.pcm:
                    if not finished.tts_first_byte_ms:
                        finished.tts_first_byte_ms = out.since()
                    await out.send(aligner.audio(delta.pcm))
                count_usage(finished, speaking.name, delta.prompt_tokens, delta.completion_tokens)
        await out.send(aligner.end())
        return "".join(transcript)


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
