"""Build the chat provider and speech engine the settings choose."""

from __future__ import annotations

from ..settings import Settings
from .base import ChatProvider, SpeakingModel, SpeechEngine

__all__ = ["make_chat", "make_speech", "pool_size"]

#: Upstream connections a provider may hold when ``VOXRELAY_MAX_STREAMS`` is 0 (no cap).
UNCAPPED_POOL = 4096


def pool_size(settings: Settings, calls_per_stream: int = 1) -> int:
    """Return a provider's connection pool: enough for every stream's calls at once.

    A chat stream makes one call at a time; a speech engine gets one per segment spoken
    ahead (``VOXRELAY_LOOKAHEAD_SEGMENTS``), so a full house never queues for a socket.
    """
    return max((settings.max_streams or UNCAPPED_POOL) * calls_per_stream, 16)


def make_chat(settings: Settings) -> ChatProvider | SpeakingModel:
    """Return what answers in chat mode: a chat provider (``echo`` needs no key), or the
    ``realtime`` speaking model, which writes and speaks the reply itself."""
    name = settings.chat_provider
    if name == "echo":
        from .echo import EchoChat

        return EchoChat()
    if name == "openai":
        from .openai_chat import OpenAIChat

        api_key, base_url = settings.llm_credentials
        assert api_key is not None  # the settings refuse to start without one
        return OpenAIChat(
            api_key=api_key,
            base_url=base_url,
            model=settings.llm_model,
            connect_timeout=settings.connect_timeout_s,
            max_connections=pool_size(settings),
        )
    if name == "realtime":
        from .openai_realtime import OpenAIRealtime

        api_key, base_url = settings.llm_credentials
        assert api_key is not None
        return OpenAIRealtime(
            api_key=api_key,
            base_url=base_url,
            model=settings.realtime_model,
            default_voice=settings.voice or "alloy",
            connect_timeout=settings.connect_timeout_s,
        )
    raise ValueError(f"chat provider {name!r} is not available in this build")


def make_speech(settings: Settings) -> SpeechEngine:
    """Return the speech engine in force (``espeak`` is embedded)."""
    if settings.speech_provider == "espeak":
        from .espeak import EspeakEngine

        return EspeakEngine(
            default_voice=settings.voice or "en-us",
            workers=settings.espeak_workers or None,
            prestart=True,
        )
    from .openai_speech import OpenAISpeech

    api_key, base_url = settings.tts_credentials
    assert api_key is not None
    return OpenAISpeech(
        api_key=api_key,
        base_url=base_url,
        model=settings.tts_model,
        default_voice=settings.voice or "alloy",
        connect_timeout=settings.connect_timeout_s,
        max_connections=pool_size(settings, settings.lookahead_segments),
    )
