"""The echo chat stand-in: the caller's words streamed back."""

from __future__ import annotations

import asyncio

from voxrelay.service.model import ChatMessage
from voxrelay.service.providers.base import ChatDelta, ChatProvider
from voxrelay.service.providers.echo import EchoChat

TEXT = "  Hello there,\tworld!\nHow  are you?  "


def conversation(text: str) -> list[ChatMessage]:
    return [
        ChatMessage("system", "You are terse."),
        ChatMessage("user", "an earlier question"),
        ChatMessage("assistant", "an earlier answer"),
        ChatMessage("user", text),
    ]


async def deltas_of(messages: list[ChatMessage], max_tokens: int = 512) -> list[ChatDelta]:
    chat: ChatProvider = EchoChat()
    try:
        return [delta async for delta in chat.stream(messages, max_tokens=max_tokens, timeout=1)]
    finally:
        await chat.aclose()


async def test_reply_is_the_last_user_message_exactly() -> None:
    deltas = await deltas_of(conversation(TEXT))
    assert "".join(delta.text for delta in deltas) == TEXT


async def test_reply_streams_one_word_per_delta() -> None:
    *pieces, _ = await deltas_of(conversation(TEXT))
    assert [piece.text.split() for piece in pieces] == [[word] for word in TEXT.split()]
    assert all(piece.prompt_tokens is None for piece in pieces)


async def test_pieces_arrive_while_other_tasks_run() -> None:
    seen: list[str] = []

    async def other() -> None:
        for _ in range(3):
            seen.append("other")
            await asyncio.sleep(0)

    async def reply() -> None:
        async for delta in EchoChat().stream(conversation(TEXT), max_tokens=0, timeout=1):
            seen.append("delta")
            del delta

    await asyncio.gather(reply(), other())
    # Another task ran between two pieces: the reply did not arrive in one go.
    assert "delta other delta" in " ".join(seen)


async def test_usage_comes_last_in_words() -> None:
    *pieces, usage = await deltas_of(conversation(TEXT))
    assert usage == ChatDelta(text="", prompt_tokens=3 + 3 + 3 + 6, completion_tokens=6)
    assert len(pieces) == 6


async def test_max_tokens_caps_the_words() -> None:
    *pieces, usage = await deltas_of(conversation(TEXT), max_tokens=2)
    assert "".join(piece.text for piece in pieces) == "  Hello there,\t"
    assert usage.completion_tokens == 2


async def test_no_user_message_gives_only_usage() -> None:
    deltas = await deltas_of([ChatMessage("system", "Be brief.")])
    assert deltas == [ChatDelta(prompt_tokens=2, completion_tokens=0)]


def test_names() -> None:
    chat = EchoChat()
    assert (chat.name, chat.model) == ("echo", "echo")
