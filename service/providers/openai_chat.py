"""Stream chat replies from OpenAI or any OpenAI-compatible server (Ollama, vLLM, …).

The client, its transport and the translation of failures are shared with the other
OpenAI providers (:mod:`.openai_upstream`).

The request carries ``max_tokens``, not ``max_completion_tokens``: it is the field every
compatible server (Ollama, vLLM, llama.cpp, LocalAI) accepts, some of them ignore the newer
one, and OpenAI still honours it for chat models such as the default ``gpt-4o-mini``. OpenAI's
reasoning models (o-series, gpt-5 family) refuse it with a 400, which surfaces as a clear,
non-retryable :class:`~voxrelay.service.errors.UpstreamError`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import openai

from ..errors import UpstreamError
from ..model import ChatMessage
from .base import ChatDelta, token_count, valid_text
from .openai_upstream import build_client, call_timeout, upstream_errors

__all__ = ["OpenAIChat"]


def _read_chunk(chunk: object) -> tuple[str, tuple[int, int] | None]:
    """Return the content and the usage (prompt, completion) of one stream chunk.

    A chunk is the JSON object the server sent, read however sparse it is: a field a
    server left out (or sent as null) counts as absent.
    """
    if not isinstance(chunk, dict):
        raise UpstreamError("chat upstream sent a malformed reply", retryable=False)
    text = ""
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
            continue
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            text += valid_text(content)
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        prompt = token_count(usage.get("prompt_tokens"))
        completion = token_count(usage.get("completion_tokens"))
        if prompt is not None and completion is not None:
            return text, (prompt, completion)
    return text, None


def _message(message: ChatMessage) -> dict[str, str]:
    # The role is one of system/user/assistant, as the pipeline writes it.
    return {"role": message.role, "content": message.content}


class OpenAIChat:
    """A :class:`~voxrelay.service.providers.base.ChatProvider` over the Chat Completions API."""

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        model: str,
        # Timeouts
        connect_timeout: float = 5.0,
        # Limits
        max_connections: int = 256,
    ) -> None:
        self.model = model
        self._api_key = api_key
        self._connect_timeout = connect_timeout
        self._client = build_client(
            api_key=api_key,
            base_url=base_url,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
        )

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        timeout: float,  # noqa: ASYNC109 - the SDK's per-call network timeout, not a deadline
    ) -> AsyncGenerator[ChatDelta, None]:
        """Yield the reply's text deltas, then one delta with the usage the upstream reported."""
        usage: tuple[int, int] | None = None
        body: dict[str, object] = {
            "model": self.model,
            "messages": [_message(m) for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if max_tokens > 0:  # 0 turns the cost guard off: the field is left out, not sent as 0
            body["max_tokens"] = max_tokens
        with upstream_errors("chat", self._api_key):
            # The SDK's request, SSE and error handling, but each chunk left as the JSON
            # the server sent (``cast_to=object``): building a typed chunk costs ~0.25 ms,
            # more than all the rest of relaying it.
            stream = await self._client.post(
                "/chat/completions",
                body=body,
                cast_to=object,
                options={"timeout": call_timeout(timeout, self._connect_timeout)},
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
            # Iterate inside ``async with``: leaving it (aclose, cancel, error) closes the
            # HTTP response, and with it the connection, at once.
            async with stream:
                async for chunk in stream:
                    text, chunk_usage = _read_chunk(chunk)
                    usage = chunk_usage or usage  # some servers repeat it on every chunk
                    if text:
                        yield ChatDelta(text=text)
        if usage is not None:
            yield ChatDelta(prompt_tokens=usage[0], completion_tokens=usage[1])

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.close()
