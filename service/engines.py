"""The upstreams one process serves with, each behind the guard the core calls it through.

:class:`Engines` holds who answers in chat mode (a chat provider, or a speaking model
that writes and speaks at once), the speech engine, and one :class:`~.resilience.Stage`
per upstream (its time budget, retries and circuit breaker). Built once at start-up.
"""

from __future__ import annotations

from .model import Mode, Voice
from .providers.base import ChatProvider, SpeakingModel, SpeechEngine
from .resilience import Stage
from .settings import Settings

__all__ = ["Engines"]


class Engines:
    """The chat provider or speaking model, the speech engine, and their stages."""

    def __init__(
        self, settings: Settings, chat: ChatProvider | SpeakingModel, speech: SpeechEngine
    ) -> None:
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

        self.tts_stage = stage("tts", speech.name, settings.tts_timeout_s)
        self.llm_stage = stage("llm", chat.name, settings.llm_timeout_s) if self.chat else None
        self.realtime_stage = (
            stage("realtime", chat.name, settings.llm_timeout_s) if self.speaking else None
        )
        self._voices: list[Voice] | None = None

    @property
    def reply_provider(self) -> ChatProvider | SpeakingModel:
        """The chat provider, or the speaking model, that answers in chat mode."""
        provider = self.chat if self.chat is not None else self.speaking
        assert provider is not None
        return provider

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Every upstream stage of this process."""
        found = (self.llm_stage, self.tts_stage, self.realtime_stage)
        return tuple(stage for stage in found if stage is not None)

    def voice_of(self, mode: Mode) -> SpeechEngine | SpeakingModel:
        """The engine whose voice speaks a stream of *mode*."""
        if mode is Mode.CHAT and self.speaking is not None:
            return self.speaking
        return self.speech

    def stages_for(self, mode: Mode) -> tuple[Stage, ...]:
        """The stages a stream of *mode* calls, in the order it calls them."""
        if mode is Mode.SPEAK:
            return (self.tts_stage,)
        if self.realtime_stage is not None:
            return (self.realtime_stage,)
        assert self.llm_stage is not None
        return (self.llm_stage, self.tts_stage)

    def check_available(self, mode: Mode) -> None:
        """Fail fast, before any upstream call, when a stage *mode* needs is open."""
        for stage in self.stages_for(mode):
            stage.breaker.check(stage.label)

    async def voices(self, language: str = "") -> list[Voice]:
        """List the speech engine's voices, optionally only those of *language*."""
        if self._voices is None:
            self._voices = await self.speech.voices()
        return filter_voices(self._voices, language)

    async def aclose(self) -> None:
        """Release the providers."""
        await self.reply_provider.aclose()
        await self.speech.aclose()


def filter_voices(voices: list[Voice], language: str) -> list[Voice]:
    """Return the voices of *language* (``en`` matches ``en-us``; multilingual ones match)."""
    if not language:
        return list(voices)
    lang = language.lower()
    return [
        v
        for v in voices
        if v.language.lower() in (lang, "multilingual") or v.language.lower().startswith(lang + "-")
    ]
