"""The core's front: open a stream for a request and iterate its events.

A :class:`Synthesizer` is built once per process from the settings and the providers;
each request opens a :class:`SynthesisStream`, an async iterator of :mod:`.model` events
that owns every task and thread it starts::

    async with synthesizer.stream(request, caller=key) as events:
        async for event in events:
            ...

Leaving the ``async with`` early (a client cancel, a disconnect, an error) cancels the
upstream calls at once and waits until they are closed. Doors do not use this directly
but through :class:`~.relay.Relay`, which adds the outcome rules and the telemetry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any

from .audio import StreamEncoder, format_info
from .cache import PhraseCache
from .engines import Engines
from .errors import Internal, VoxrelayError
from .limits import make_admission
from .model import AudioFormat, Event, Mode, StreamFinished, StreamStarted, SynthesisRequest, Voice
from .output import EncoderRunner, EventQueue, StreamEnd, StreamOutput, encoder_pool
from .pipeline import ChainedPipeline, SpeakingPipeline, StreamContext
from .planner import Plan, RequestPlanner
from .providers.base import ChatProvider, SpeakingModel, SpeechEngine
from .runtime import Runtime
from .settings import Settings
from .speakable import SpeakableText

__all__ = ["SynthesisStream", "Synthesizer"]

log = logging.getLogger(__name__)

#: Threads that run the streams' encoders (libopus and LAME run without the GIL).
ENCODER_THREADS = 2


class Synthesizer:
    """Serve synthesis requests with the engines the settings chose."""

    def __init__(
        self, settings: Settings, chat: ChatProvider | SpeakingModel, speech: SpeechEngine
    ) -> None:
        self.settings = settings
        self.engines = Engines(settings, chat, speech)
        self.planner = RequestPlanner(settings, self.engines)
        self.runtime = Runtime(settings, make_admission(settings))
        self.speakable = SpeakableText(settings.lexicon_file)
        #: repeated segments replayed, not synthesised again (None: ``VOXRELAY_CACHE_MB=0``).
        self.phrases = PhraseCache.from_settings(settings)
        self._encoders = encoder_pool(ENCODER_THREADS)

    def stream(
        self,
        request: SynthesisRequest,
        *,
        deadline: float | None = None,
        caller: str | None = None,
        share: str | None = None,
    ) -> SynthesisStream:
        """Open a stream for *request*.

        *deadline* is a ``loop.time()`` the caller gives up at; *caller* identifies whom
        the per-caller limits apply to (an API key id or a client address; None for an
        anonymous internal caller, to whom only the global caps apply); *share* is whom
        a shared resource (the embedded engine's queue) takes turns between, *caller* if None.
        """
        return SynthesisStream(self, request, deadline, caller, share)

    async def voices(self, language: str = "") -> list[Voice]:
        """List the speech engine's voices, optionally only those of *language*."""
        return await self.engines.voices(language)

    async def aclose(self) -> None:
        """Release providers, the admission's connections, the phrase cache and the encoders."""
        await self.engines.aclose()
        await self.runtime.admission.aclose()
        if self.phrases is not None:
            await self.phrases.aclose()
        self._encoders.shutdown(wait=True, cancel_futures=True)

    def _output(
        self, plan: Plan, queue: EventQueue, since: Callable[[], int]
    ) -> tuple[StreamOutput, StreamEncoder]:
        """Build a stream's output around its one encoder, fed the engine's PCM."""
        rate = self.engines.voice_of(plan.mode).sample_rate
        encoder = StreamEncoder(plan.format, input_rate=rate, output_rate=plan.rate)
        passthrough = plan.format is AudioFormat.PCM and plan.rate == rate
        runner = EncoderRunner(encoder, self._encoders, inline=passthrough)
        output = StreamOutput(
            queue,
            runner,
            input_rate=rate,
            since=since,
            max_audio_s=self.settings.max_stream_audio_s,
        )
        return output, encoder

    def _started(self, plan: Plan, encoder: StreamEncoder) -> StreamStarted:
        engines = self.engines
        if plan.mode is Mode.CHAT and engines.speaking is not None:
            llm_model = tts_model = engines.speaking.model
        else:
            llm_model = engines.chat.model if plan.mode is Mode.CHAT and engines.chat else ""
            tts_model = engines.speech.model
        return StreamStarted(
            request_id=plan.request_id,
            format=plan.format,
            content_type=format_info(plan.format).content_type,
            sample_rate_hz=encoder.sample_rate,
            channels=encoder.channels,
            voice=plan.voice,
            llm_model=llm_model,
            tts_model=tts_model,
        )


class SynthesisStream:
    """One request's events, produced by a task this object owns."""

    def __init__(
        self,
        core: Synthesizer,
        request: SynthesisRequest,
        deadline: float | None,
        caller: str | None = None,
        share: str | None = None,
    ) -> None:
        self._core = core
        self._share = share
        self._request = request
        self._deadline = deadline
        self._caller = caller
        self._queue = EventQueue()
        self._task: asyncio.Task[None] | None = None
        self._release: Callable[[], None] | None = None
        self._closed = False
        self._output: StreamOutput | None = None
        self.plan: Plan | None = None
        self.finished: StreamFinished | None = None
        self.started_at = 0.0

    async def __aenter__(self) -> SynthesisStream:
        core = self._core
        runtime = core.runtime
        runtime.check_open()
        self.started_at = asyncio.get_running_loop().time()
        plan = self.plan = await core.planner.plan(self._request)
        core.engines.check_available(plan.mode)
        # Admission comes after validation: a refused request costs the caller nothing.
        lease = await runtime.admit(self, self._caller, plan.cost_chars)
        self._release = lease.release
        self._task = asyncio.create_task(self._run(plan), name=f"synth-{plan.request_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel everything this stream started and wait until it has stopped."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        try:
            if task is not None:
                task.cancel()
                # Wait even if our own caller is being cancelled: nothing may outlive us.
                try:
                    await asyncio.shield(task)
                except BaseException:
                    if not task.done():
                        await asyncio.wait([task])
                        raise
        finally:
            if self._release is not None:
                self._release()

    @property
    def figures(self) -> StreamFinished | None:
        """Return the stream's figures: final once finished, else those known so far.

        A stream that was cancelled or failed still has figures worth logging (segments
        and audio sent, first token and first byte, usage reported before the end).
        """
        if self.finished is not None or self._output is None:
            return self.finished
        return self._output.figures()

    def abort(self, error: VoxrelayError) -> None:
        """Stop producing and make *error* the next thing the consumer gets."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        self._queue.end(StreamEnd(error))

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if isinstance(item, StreamEnd):
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    # The work

    async def _run(self, plan: Plan) -> None:
        try:
            finished = await self._produce(plan)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._queue.put(StreamEnd(_as_voxrelay_error(exc, plan.request_id)))
            return
        self.finished = finished
        await self._queue.put(finished)
        await self._queue.put(StreamEnd())

    async def _produce(self, plan: Plan) -> StreamFinished:
        core = self._core
        loop = asyncio.get_running_loop()
        t0 = self.started_at

        def since() -> int:
            return max(0, round((loop.time() - t0) * 1000))

        out, encoder = core._output(plan, self._queue, since)
        self._output = out
        started = core._started(plan, encoder)
        caller = self._caller

        async def charge(chars: int) -> None:
            await core.runtime.charge(caller, chars)

        ctx = StreamContext(
            plan,
            core.settings,
            core.engines,
            self._deadline,
            self._share or caller,
            core.speakable,
            phrases=core.phrases,
            charge=charge,
        )
        speaking = plan.mode is Mode.CHAT and core.engines.speaking is not None
        pipeline = SpeakingPipeline(ctx, out) if speaking else ChainedPipeline(ctx, out)
        try:
            try:
                reply = await _unwrap(pipeline.run(started))
            except VoxrelayError:
                if out.capped:
                    await out.flush()  # the audio sent so far ends as one whole file
                raise
            await out.flush()
        finally:
            out.close()
        return out.figures(reply)


async def _unwrap(run: Coroutine[Any, Any, str]) -> str:
    """Await a pipeline, raising the one error that matters from a task group's."""
    try:
        return await run
    except BaseExceptionGroup as group:
        raise _first_error(group) from None


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """Pick the error to report from a task group's failures (cancellation wins)."""
    flat: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            flat.append(exc)

    walk(group)
    for exc in flat:
        if isinstance(exc, asyncio.CancelledError):
            return exc
    for exc in flat:
        if isinstance(exc, VoxrelayError):
            return exc
    return flat[0]


def _as_voxrelay_error(exc: BaseException, request_id: str) -> VoxrelayError:
    if isinstance(exc, VoxrelayError):
        return exc
    log.error("internal error in stream %s", request_id, exc_info=exc)
    return Internal(f"internal error (request {request_id})")
