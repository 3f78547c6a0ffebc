"""Answer with the caller's own words: the embedded chat stand-in.

``echo`` lets the whole pipeline run with no key and no network. It streams the last
user message back a word at a time, as an LLM streams tokens, so sentence chunking
and time-to-first-audio behave as they would with a real model.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence

from ..model import ChatMessage
from .base import ChatDelta

__all__ = ["EchoChat"]

# A word with the whitespace around it, so the pieces join back into the exact text;
# text of whitespace alone is one piece.
_PIECE = re.compile(r"\s*\S+\s*|\s+")


def _count_words(text: str) -> int:
    return len(text.split())


class EchoChat:
    """Stream the last user message back, word by word."""

    name: str = "echo"
    model: str = "echo"

    def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int, timeout: float
    ) -> AsyncGenerator[ChatDelta, None]:
        """Yield the last user message a word at a time, then the usage in words.

        At most *max_tokens* words are yielded (0 or less means no cap). *timeout*
        has nothing to wait for here.
        """
        del timeout
        return self._reply(messages, max_tokens)

    async def _reply(
        self, messages: Sequence[ChatMessage], max_tokens: int
    ) -> AsyncGenerator[ChatDelta, None]:
        text = next((m.content for m in reversed(messages) if m.role == "user"), "")
        words = 0
        for match in _PIECE.finditer(text):
            piece = match.group()
            if not piece.isspace():
                if 0 < max_tokens <= words:
                    break
                words += 1
            # Hand control back to the loop, as a network stream would.
            await asyncio.sleep(0)
            yield ChatDelta(text=piece)
        prompt = sum(_count_words(m.content) for m in messages)
        yield ChatDelta(prompt_tokens=prompt, completion_tokens=words)

    async def aclose(self) -> None:
        """Release nothing: echo holds no resources."""
