"""The synthesis pipeline: chat deltas → sentences → speech → one encoder → events.

(Or, with a speaking model, its transcript and audio → segments → the same encoder.)

A :class:`Synthesizer` is built once per process from the settings and the chosen
providers; each request opens a :class:`SynthesisStream`, an async iterator of
:mod:`service.model` events that owns every task and thread it starts::

    async with synthesizer.stream(request) as events:
        async for event in events:
            ...

Leaving the ``async with`` early (a client cancel, a disconnect, an error) cancels
the upstream calls at once and waits until they are closed.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from . import metrics
from .alignment import TranscriptAligner
from .audio import StreamEncoder, format_info, output_rate
from .auth import KeyStore
from .chunker import SentenceChunker
from .errors import Busy, Internal, InvalidRequest, TooLarge, Unavailable, VoxrelayError
from .limits import Admission, AdmissionControl, Lease
from .model import (
    AudioFormat,
    ChatMessage,
    Event,
    Mode,
    StreamFinished,
    StreamStarted,
    SynthesisRequest,
    Voice,
)
from .output import EncoderRunner, EventQueue, PcmFeed, StreamOutput
from .providers.base import ChatProvider, SpeakingModel, SpeechEngine
from .resilience import Stage, guarded_stream
from .settings import Settings

__all__ = ["SynthesisStream", "Synthesizer"]

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Your reply will be spoken aloud, so answer in "
    "plain conversational sentences: no markdown, lists, code, tables or emoji."
)
SPEED_RANGE = (0.25, 4.0)
MAX_HISTORY = 100
HISTORY_ROLES = frozenset({"system", "user", "assistant"})
ALLOWED_CONTROLS = frozenset("\n\t\r")
#: A read that took longer than this found the upstream's socket empty.
READ_WAITED_S = 0.001
#: An upstream's socket is left to fill for this long at most: longer, and a segment's
#: download (and with it the next segment's request) drags (0.5 s: 3.2 s a reply, not 2.5).
MAX_READ_HOLD_S = 0.1
_DONE = object()


@dataclass(frozen=True, slots=True)
class _Plan:
    """A validated request with every default resolved."""

    request_id: str
    mode: Mode
    text: str
    voice: str
    format: AudioFormat
    rate: int
    speed: float
    instructions: str
    messages: tuple[ChatMessage, ...]


class Synthesizer:
    """Serve synthesis requests with the providers the settings chose.

    Chat mode takes one of two shapes: a chat provider whose reply is cut into segments
    and spoken by the speech engine, or a speaking model that writes and speaks the reply
    in one upstream call. Speak mode always uses the speech engine.
    """

    def __init__(
        self,
        settings: Settings,
        chat: ChatProvider | SpeakingModel,
        speech: SpeechEngine,
    ) -> None:
        self.settings = settings
        self.speech = speech
        self.chat: ChatProvider | None = None
        self.speaking: SpeakingModel | None = None
        if isinstance(chat, SpeakingModel):
            self.speaking = chat
        else:
            self.chat = chat

        def stage(name: str, provider: str, timeout_s: float) -> Stage:
            return Stage.build(
                name,
                provider,
                timeout_s=timeout_s,
                retries=settings.upstream_retries,
                breaker_failures=settings.breaker_failures,
                breaker_cooldown_s=settings.breaker_cooldown_s,
            )

        self.llm_stage = stage("llm", chat.name, settings.llm_timeout_s) if self.chat else None
        self.tts_stage = stage("tts", speech.name, settings.tts_timeout_s)
        self.realtime_stage = (
            stage("realtime", chat.name, settings.llm_timeout_s) if self.speaking else None
        )
        # Encoding is CPU work: it runs here, never on the event loop.
        self._encoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
        self.admission: AdmissionControl = Admission.from_settings(settings)
        # One key store per process, shared by both doors (SIGHUP reloads it).
        self.keys = KeyStore(settings)
        self._voices: list[Voice] | None = None
        self._streams: set[SynthesisStream] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    # Lifecycle

    @property
    def reply_provider(self) -> ChatProvider | SpeakingModel:
        """The chat provider, or the speaking model, that answers in chat mode."""
        provider = self.chat if self.chat is not None else self.speaking
        assert provider is not None
        return provider

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def begin_drain(self) -> None:
        """Refuse new streams from now on; streams in flight go on."""
        self.draining = True

    async def wait_idle(self) -> None:
        """Wait until no stream is in flight."""
        await self._idle.wait()

    def abort_all(self, error: VoxrelayError) -> None:
        """End every stream in flight with *error* (the drain window has run out)."""
        for stream in list(self._streams):
            stream.abort(error)

    async def aclose(self) -> None:
        """Release providers and the encoder threads."""
        await self.reply_provider.aclose()
        await self.speech.aclose()
        self._encoders.shutdown(wait=True, cancel_futures=True)

    def _register(self, stream: SynthesisStream) -> None:
        self._streams.add(stream)
        self._idle.clear()

    def _unregister(self, stream: SynthesisStream) -> None:
        stream._lease.release()
        self._streams.discard(stream)
        if not self._streams:
            self._idle.set()

    # Requests

    async def voices(self, language: str = "") -> list[Voice]:
        """List the speech engine's voices, optionally only those of *language*."""
        if self._voices is None:
            self._voices = await self.speech.voices()
        if not language:
            return list(self._voices)
        lang = language.lower()
        return [
            v
            for v in self._voices
            if v.language.lower() in (lang, "multilingual")
            or v.language.lower().startswith(lang + "-")
        ]

    def stream(
        self,
        request: SynthesisRequest,
        *,
        deadline: float | None = None,
        caller: str | None = None,
    ) -> SynthesisStream:
        """Open a stream for *request*.

        *deadline* is a ``loop.time()`` the caller gives up at; *caller* identifies whom
        the per-caller limits apply to (an API key id or a client address; None for an
        anonymous internal caller, to whom only the global caps apply).
        """
        return SynthesisStream(self, request, deadline, caller)

    async def plan(self, request: SynthesisRequest) -> _Plan:
        """Validate *request* and resolve its defaults, or raise a typed error."""
        s = self.settings
        text = request.text
        if not text.strip():
            raise InvalidRequest("text is empty: send the words to speak or answer")
        if len(text) > s.max_input_chars:
            raise TooLarge(
                f"text is {len(text)} characters; the limit is {s.max_input_chars}"
                " (VOXRELAY_MAX_INPUT_CHARS): split it into several requests"
            )
        _check_controls(text, "text")
        _check_controls(request.instructions, "instructions")
        if len(request.instructions) > s.max_input_chars:
            raise TooLarge(f"instructions are over {s.max_input_chars} characters")
        if len(request.history) > MAX_HISTORY:
            raise InvalidRequest(f"history has {len(request.history)} turns; at most {MAX_HISTORY}")
        for turn in request.history:
            if turn.role not in HISTORY_ROLES:
                raise InvalidRequest(
                    f"history role {turn.role[:20]!r} is not one of system, user, assistant"
                )
            _check_controls(turn.content, "history")
        if sum(len(t.content) for t in request.history) > s.max_input_chars * 8:
            raise TooLarge("history is too long: send fewer or shorter turns")

        # The engine that speaks: the speaking model answers chat mode when there is one.
        engine: SpeechEngine | SpeakingModel = self.speech
        if request.mode is Mode.CHAT and self.speaking is not None:
            engine = self.speaking
        voice = request.voice or engine.default_voice
        if getattr(engine, "validates_voices", True):
            known = await (self.voices() if engine is self.speech else engine.voices())
            if voice.lower() not in {v.name.lower() for v in known}:
                raise InvalidRequest(
                    f"unknown voice {voice[:40]!r}: list voices with `voxrelay voices`"
                    " or ListVoices"
                )
        fmt = request.format or s.format
        rate = output_rate(fmt, engine.sample_rate, request.sample_rate_hz)
        speed = request.speed or 1.0
        high = min(SPEED_RANGE[1], getattr(engine, "max_speed", SPEED_RANGE[1]))
        if not SPEED_RANGE[0] <= speed <= high:
            raise InvalidRequest(f"speed {speed:g} is out of range {SPEED_RANGE[0]}–{high:g}")
        messages: tuple[ChatMessage, ...] = ()
        if request.mode is Mode.CHAT:
            system = ChatMessage("system", request.instructions or DEFAULT_SYSTEM_PROMPT)
            messages = (system, *request.history, ChatMessage("user", text))
        return _Plan(
            request_id=request.request_id or uuid.uuid4().hex,
            mode=request.mode,
            text=text,
            voice=voice,
            format=fmt,
            rate=rate,
            speed=speed,
            instructions=request.instructions,
            messages=messages,
        )


def _check_controls(text: str, what: str) -> None:
    for ch in text:
        if ch not in ALLOWED_CONTROLS and unicodedata.category(ch) == "Cc":
            raise InvalidRequest(
                f"{what} contains control character U+{ord(ch):04X}; only newline, carriage"
                " return and tab are allowed"
            )


class SynthesisStream:
    """One request's events, produced by tasks this object owns."""

    def __init__(
        self,
        owner: Synthesizer,
        request: SynthesisRequest,
        deadline: float | None,
        caller: str | None = None,
    ) -> None:
        self._owner = owner
        self._request = request
        self._deadline = deadline
        self._caller = caller
        self._lease = Lease()
        self._queue = EventQueue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.plan: _Plan | None = None
        self.finished: StreamFinished | None = None
        self._output: StreamOutput | None = None
        self.started_at = 0.0

    async def __aenter__(self) -> SynthesisStream:
        owner = self._owner
        if owner.draining:
            raise Unavailable(
                "voxrelay is shutting down: retry on another replica", retry_after_s=1.0
            )
        cap = owner.settings.max_streams
        if cap and owner.active_streams >= cap:
            raise Busy(f"voxrelay is at capacity ({cap} streams): retry shortly", retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        self.plan = await owner.plan(self._request)
        if cap and owner.active_streams >= cap:  # others may have started while we planned
            raise Busy(f"voxrelay is at capacity ({cap} streams): retry shortly", retry_after_s=1.0)
        # Admission comes after validation: a refused request costs the caller nothing.
        self._lease = owner.admission.admit(self._caller, len(self.plan.text))
        owner._register(self)
        self._task = asyncio.create_task(self._run(self.plan), name=f"synth-{self.plan.request_id}")
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
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            # Wait even if our own caller is being cancelled: nothing may outlive us.
            try:
                await asyncio.shield(task)
            except BaseException:
                if not task.done():
                    await asyncio.wait([task])
                    self._owner._unregister(self)
                    raise
        self._owner._unregister(self)

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
        self._queue.replace_all(error)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is _DONE:
            self._queue.push_back(_DONE)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.push_back(_DONE)
            raise item
        event: Event = item
        return event

    # The work

    async def _run(self, plan: _Plan) -> None:
        try:
            await self._produce(plan)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._queue.put(_as_voxrelay_error(exc, plan.request_id))
            return
        await self._queue.put(_DONE)

    async def _produce(self, plan: _Plan) -> None:
        owner = self._owner
        loop = asyncio.get_running_loop()
        t0 = self.started_at

        def since() -> int:
            return max(0, round((loop.time() - t0) * 1000))

        speaking = owner.speaking if plan.mode is Mode.CHAT else None
        rate = speaking.sample_rate if speaking is not None else owner.speech.sample_rate
        encoder = StreamEncoder(plan.format, input_rate=rate, output_rate=plan.rate)
        passthrough = plan.format is AudioFormat.PCM and plan.rate == rate
        out = StreamOutput(
            self._queue,
            EncoderRunner(encoder, owner._encoders, inline=passthrough),
            input_rate=rate,
            since=since,
        )
        self._output = out
        if speaking is not None:
            llm_model = tts_model = speaking.model
        else:
            llm_model = owner.chat.model if plan.mode is Mode.CHAT and owner.chat else ""
            tts_model = owner.speech.model
        started = StreamStarted(
            request_id=plan.request_id,
            format=plan.format,
            content_type=format_info(plan.format).content_type,
            sample_rate_hz=encoder.sample_rate,
            channels=encoder.channels,
            voice=plan.voice,
            llm_model=llm_model,
            tts_model=tts_model,
        )
        try:
            if speaking is not None:
                await out.emit(started)
                reply = await self._speak_reply(plan, speaking, out)
            else:
                reply = await self._write_and_speak(plan, out, started)
            await out.flush()
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        finally:
            out.close()

        finished = out.figures(reply)
        self.finished = finished
        await out.emit(finished)

    async def _write_and_speak(self, plan: _Plan, out: StreamOutput, started: StreamStarted) -> str:
        """Chat provider (or the text itself) → chunker → speech engine, pipelined.

        *started* goes out first, but only once the upstream call has begun.
        """
        owner = self._owner
        speech = owner.speech
        finished = out.finished
        segments: asyncio.Queue[str | None] = asyncio.Queue()
        lookahead = asyncio.Semaphore(owner.settings.lookahead_segments)
        ordered: asyncio.Queue[tuple[str, PcmFeed] | None] = asyncio.Queue()
        reply_parts: list[str] = []

        async def write_text() -> None:
            chunker = SentenceChunker()
            if plan.mode is Mode.SPEAK:
                for seg in chunker.feed(plan.text) + chunker.flush():
                    segments.put_nowait(seg)
                segments.put_nowait(None)
                return
            chat, stage = owner.chat, owner.llm_stage
            assert chat is not None and stage is not None  # chat mode, no speaking model

            def first_token() -> None:
                finished.llm_first_token_ms = out.since()

            stream = guarded_stream(
                stage,
                lambda: chat.stream(
                    plan.messages,
                    max_tokens=owner.settings.max_reply_tokens,
                    timeout=owner.settings.llm_timeout_s or 600.0,
                ),
                deadline=self._deadline,
                on_first=first_token,
            )
            async with aclosing(stream) as deltas:
                async for delta in deltas:
                    if delta.text:
                        reply_parts.append(delta.text)
                        for seg in chunker.feed(delta.text):
                            segments.put_nowait(seg)
                    _count_usage(finished, chat.name, delta.prompt_tokens, delta.completion_tokens)
            for seg in chunker.flush():
                segments.put_nowait(seg)
            segments.put_nowait(None)

        loop = asyncio.get_running_loop()

        async def speak_segment(text: str, feed: PcmFeed) -> None:
            def first_byte() -> None:
                if not finished.tts_first_byte_ms:
                    finished.tts_first_byte_ms = out.since()

            metrics.UPSTREAM_CHARACTERS.labels(speech.name).inc(len(text))
            stream = guarded_stream(
                owner.tts_stage,
                lambda: speech.synthesize(
                    text,
                    voice=plan.voice,
                    speed=plan.speed,
                    instructions=plan.instructions,
                    timeout=owner.settings.tts_timeout_s or 600.0,
                ),
                deadline=self._deadline,
                on_first=first_byte,
            )
            async with aclosing(stream) as chunks:
                while True:
                    began = loop.time()
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    feed.put(chunk)
                    # The socket ran dry. While the listener has audio in hand, let the next
                    # chunks gather there and read them in one go: one wake-up, not one each.
                    if loop.time() - began > READ_WAITED_S and (hold := out.hold_s()) > 0:
                        await asyncio.sleep(min(hold, MAX_READ_HOLD_S))
            feed.end()

        async def schedule_speech(tg: asyncio.TaskGroup) -> None:
            # Start speaking segment k+1 while segment k is still being sent.
            while (text := await segments.get()) is not None:
                await lookahead.acquire()
                feed = PcmFeed()
                tg.create_task(speak_segment(text, feed))
                ordered.put_nowait((text, feed))
            ordered.put_nowait(None)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(write_text())
            tg.create_task(schedule_speech(tg))
            # Announced after the tasks are made: the door's wake-up (and its send) then
            # comes after the chat request is on its way, not before (~0.2 ms sooner).
            # Nothing else can reach the queue before this.
            await out.emit(started)
            while (item := await ordered.get()) is not None:
                text, feed = item
                await out.segment(text)
                while (pcm := await feed.take(hold_s=out.hold_s())) is not None:
                    await out.audio(pcm)
                lookahead.release()
        return plan.text if plan.mode is Mode.SPEAK else "".join(reply_parts)

    async def _speak_reply(self, plan: _Plan, speaking: SpeakingModel, out: StreamOutput) -> str:
        """A speaking model writes and speaks the reply; its transcript is cut into segments."""
        owner = self._owner
        finished = out.finished
        aligner = TranscriptAligner()
        transcript: list[str] = []

        def first_delta() -> None:
            finished.llm_first_token_ms = out.since()

        assert owner.realtime_stage is not None
        stream = guarded_stream(
            owner.realtime_stage,
            lambda: speaking.respond(
                plan.messages,
                voice=plan.voice,
                speed=plan.speed,
                max_output_tokens=owner.settings.realtime_max_output_tokens,
                timeout=owner.settings.llm_timeout_s or 600.0,
            ),
            deadline=self._deadline,
            on_first=first_delta,
        )
        async with aclosing(stream) as deltas:
            async for delta in deltas:
                items: list[str | bytes] = []
                if delta.text:
                    transcript.append(delta.text)
                    items = aligner.transcript(delta.text)
                elif delta.pcm:
                    if not finished.tts_first_byte_ms:
                        finished.tts_first_byte_ms = out.since()
                    items = aligner.audio(delta.pcm)
                _count_usage(finished, speaking.name, delta.prompt_tokens, delta.completion_tokens)
                await out.send(items)
        await out.send(aligner.end())
        return "".join(transcript)


def _count_usage(
    finished: StreamFinished, provider: str, prompt: int | None, completion: int | None
) -> None:
    """Note the upstream's reported token usage in *finished* and the cost counters."""
    if prompt is not None:
        finished.prompt_tokens = prompt
        metrics.UPSTREAM_TOKENS.labels(provider, "prompt").inc(prompt)
    if completion is not None:
        finished.completion_tokens = completion
        metrics.UPSTREAM_TOKENS.labels(provider, "completion").inc(completion)


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
