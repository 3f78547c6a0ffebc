"""Validate a request and resolve its defaults into a :class:`Plan`, or refuse it.

Everything a caller can get wrong is checked here, before any upstream is called or any
budget is charged: empty or over-long text, control characters, the history's shape and
size, an unknown voice, a speed out of range.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .audio import output_rate
from .engines import Engines
from .errors import InvalidRequest, TooLarge
from .model import AudioFormat, ChatMessage, Mode, SynthesisRequest
from .settings import Settings

if TYPE_CHECKING:
    from .text_input import TextInput

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "HISTORY_CHARS_PER_INPUT",
    "MAX_HISTORY",
    "Plan",
    "RequestPlanner",
    "check_text",
]

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Your reply will be spoken aloud, so answer in "
    "plain conversational sentences: no markdown, lists, code, tables or emoji."
)
SPEED_RANGE = (0.25, 4.0)
#: Turns of history one request may carry.
MAX_HISTORY = 100
#: The history of one request may hold this many times ``max_input_chars``.
HISTORY_CHARS_PER_INPUT = 8
HISTORY_ROLES = frozenset({"system", "user", "assistant"})
#: Control characters allowed in text: line ends (Unix and Windows) and tabs.
ALLOWED_CONTROLS = frozenset("\n\t\r")
#: The language of a voice the engine does not describe.
DEFAULT_LANGUAGE = "en"


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated request with every default resolved."""

    request_id: str
    mode: Mode
    text: str
    voice: str
    format: AudioFormat
    #: the rate of the audio sent (the engine's, or the one asked for and supported).
    rate: int
    speed: float
    instructions: str
    #: the whole conversation for the chat stage (empty in speak mode).
    messages: tuple[ChatMessage, ...]
    #: the characters charged to the caller's budget: text, instructions and history,
    #: each once (instructions go to the speech upstream with every segment).
    cost_chars: int
    #: make segments speakable (normalization), in the voice's *language*.
    normalize: bool = True
    language: str = "en"
    #: send each segment's words after its audio.
    word_timestamps: bool = False
    #: streamed input: the rest of the text, charged piece by piece as it arrives.
    input: TextInput | None = None


def check_text(text: str, what: str) -> None:
    """Refuse control characters other than line ends and tabs, and lone surrogates."""
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc" and ch not in ALLOWED_CONTROLS:
            raise InvalidRequest(
                f"{what} contains control character U+{ord(ch):04X}; only newline, carriage"
                " return and tab are allowed"
            )
        if category == "Cs":
            raise InvalidRequest(f"{what} contains a lone surrogate U+{ord(ch):04X}")


class RequestPlanner:
    """Turn requests into plans with the settings' defaults and the engines' voices."""

    def __init__(self, settings: Settings, engines: Engines) -> None:
        self.settings = settings
        self.engines = engines

    @property
    def history_budget(self) -> int:
        """The characters of history one request may carry."""
        return self.settings.max_input_chars * HISTORY_CHARS_PER_INPUT

    async def plan(self, request: SynthesisRequest) -> Plan:
        """Validate *request* and resolve its defaults, or raise a typed error."""
        limit = self.settings.max_input_chars
        text = request.text
        if request.input is not None:
            self._check_streamed(request)
        elif not text.strip():
            raise InvalidRequest("text is empty: send the words to speak or answer")
        if len(text) > limit:
            raise TooLarge(
                f"text is {len(text)} characters; the limit is {limit}"
                " (VOXRELAY_MAX_INPUT_CHARS): split it into several requests"
            )
        check_text(text, "text")
        check_text(request.instructions, "instructions")
        instructions_limit = self.settings.max_instructions_chars
        if instructions_limit and len(request.instructions) > instructions_limit:
            raise TooLarge(
                f"instructions are {len(request.instructions)} characters; the limit is"
                f" {instructions_limit} (VOXRELAY_MAX_INSTRUCTIONS_CHARS)"
            )
        self._check_history(request.history)
        voice, language = await self._voice(request)
        engine = self.engines.voice_of(request.mode)
        speed = request.speed or 1.0
        high = min(SPEED_RANGE[1], engine.max_speed)
        if not SPEED_RANGE[0] <= speed <= high:
            raise InvalidRequest(f"speed {speed:g} is out of range {SPEED_RANGE[0]}–{high:g}")
        fmt = request.format or self.settings.format
        messages: tuple[ChatMessage, ...] = ()
        if request.mode is Mode.CHAT:
            system = ChatMessage("system", request.instructions or DEFAULT_SYSTEM_PROMPT)
            messages = (system, *request.history, ChatMessage("user", text))
        return Plan(
            request_id=request.request_id or uuid.uuid4().hex,
            mode=request.mode,
            text=text,
            voice=voice,
            format=fmt,
            rate=output_rate(fmt, engine.sample_rate, request.sample_rate_hz),
            speed=speed,
            instructions=request.instructions,
            messages=messages,
            cost_chars=len(text)
            + len(request.instructions)
            + sum(len(turn.content) for turn in request.history),
            normalize=(
                self.settings.normalize if request.normalization is None else request.normalization
            ),
            language=language,
            word_timestamps=request.word_timestamps,
            input=request.input,
        )

    def _check_streamed(self, request: SynthesisRequest) -> None:
        if request.mode is not Mode.SPEAK:
            raise InvalidRequest(
                "streamed input is spoken as written: it takes speak mode, not chat"
            )
        if request.history:
            raise InvalidRequest("streamed input takes no history: it is spoken as written")

    def _check_history(self, history: Sequence[ChatMessage]) -> None:
        if len(history) > MAX_HISTORY:
            raise InvalidRequest(f"history has {len(history)} turns; at most {MAX_HISTORY}")
        for turn in history:
            if turn.role not in HISTORY_ROLES:
                raise InvalidRequest(
                    f"history role {turn.role[:20]!r} is not one of system, user, assistant"
                )
            check_text(turn.content, "history")
        if sum(len(t.content) for t in history) > self.history_budget:
            raise TooLarge("history is too long: send fewer or shorter turns")

    async def _voice(self, request: SynthesisRequest) -> tuple[str, str]:
        """Return the voice that speaks *request*, and its language (English if unknown)."""
        engine = self.engines.voice_of(request.mode)
        voice = request.voice or engine.default_voice
        if not engine.validates_voices:
            return voice, DEFAULT_LANGUAGE
        if engine is self.engines.speech:
            known = await self.engines.voices()
        else:
            known = await engine.voices()
        for candidate in known:
            if candidate.name.lower() == voice.lower():
                return voice, candidate.language or DEFAULT_LANGUAGE
        raise InvalidRequest(
            f"unknown voice {voice[:40]!r}: list voices with `voxrelay voices` or ListVoices"
        )
