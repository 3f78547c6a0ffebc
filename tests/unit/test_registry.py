"""The providers the settings build, and the connection pools they get."""

from __future__ import annotations

import pytest

from voxrelay.service.providers.openai_chat import OpenAIChat
from voxrelay.service.providers.openai_speech import OpenAISpeech
from voxrelay.service.providers.registry import UNCAPPED_POOL, make_chat, make_speech, pool_size
from voxrelay.service.settings import load_settings


def _limit(provider: OpenAIChat | OpenAISpeech) -> int | None:
    limit: int | None = provider._client._client._transport.limits.max_connections  # type: ignore[attr-defined]
    return limit


@pytest.mark.parametrize(
    ("max_streams", "lookahead", "chat", "speech"),
    [
        (256, 2, 256, 512),
        (100, 3, 100, 300),
        (0, 2, UNCAPPED_POOL, 2 * UNCAPPED_POOL),
        (4, 1, 16, 16),
    ],
)
async def test_every_stream_gets_its_calls_without_queueing(
    max_streams: int, lookahead: int, chat: int, speech: int
) -> None:
    settings = load_settings(
        llm="openai",
        tts="openai",
        openai_api_key="sk-test",
        max_streams=max_streams,
        lookahead_segments=lookahead,
    )
    assert pool_size(settings) == chat
    assert pool_size(settings, lookahead) == speech
    llm, tts = make_chat(settings), make_speech(settings)
    assert isinstance(llm, OpenAIChat) and isinstance(tts, OpenAISpeech)
    try:
        assert _limit(llm) == chat
        assert _limit(tts) == speech  # one call per segment spoken ahead
    finally:
        await llm.aclose()
        await tts.aclose()
