"""Stream chat replies from OpenAI or any OpenAI-compatible server (Ollama, vLLM, …).

One :class:`openai.AsyncOpenAI` client per provider, with the SDK's own retries off: the
core retries, backs off and trips the breaker, so there is exactly one retry mechanism.
Its HTTP transport is the SDK's aiohttp one (``openai[aiohttp]``): aiohttp parses responses
in C and hands over all the body that has arrived in one read, where the default httpx
stack walks every HTTP chunk through several Python layers. A speech stream is hundreds
of small chunks a second, so that is most of what relaying costs (see the README's
"Performance").

The request carries ``max_tokens``, not ``max_completion_tokens``: it is the field every
compatible server (Ollama, vLLM, llama.cpp, LocalAI) accepts, some of them ignore the newer
one, and OpenAI still honours it for chat models such as the default ``gpt-4o-mini``. OpenAI's
reasoning models (o-series, gpt-5 family) refuse it with a 400, which surfaces as a clear,
non-retryable :class:`~voxrelay.service.errors.UpstreamError`.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import contextmanager

import aiohttp
import anyio
import httpx2
import openai

from ..descriptors import out_of_descriptors, shortage_error
from ..errors import UpstreamError, UpstreamTimeout, VoxrelayError, clamp_wait
from ..model import ChatMessage
from .base import ChatDelta, token_count, valid_text

__all__ = [
    "OpenAIChat",
    "build_client",
    "call_timeout",
    "redact",
    "retry_after",
    "status_error",
    "upstream_errors",
    "upstream_said",
]

# Transport failures the SDK lets through unwrapped (mid-body reads: those the aiohttp
# transport maps to httpx errors and those it does not, TLS, anyio streams).
_TRANSPORT_ERRORS = (
    httpx2.RequestError,
    aiohttp.ClientError,
    ssl.SSLError,
    anyio.EndOfStream,
    ConnectionError,
)
log = logging.getLogger(__name__)

_SECRET = re.compile(r"\b(?:sk|rk|pk|key)[-_][\w*.-]+|\*{3}\w*", re.IGNORECASE)


def build_client(
    *, api_key: str, base_url: str | None, connect_timeout: float, max_connections: int
) -> openai.AsyncOpenAI:
    """Return an SDK client on aiohttp, its own retries off, its pool sized for our streams."""
    return openai.AsyncOpenAI(
        api_key=api_key,
        # The settings already resolved OPENAI_BASE_URL; do not let the SDK read it again.
        base_url=base_url or "https://api.openai.com/v1",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(
            # Limits
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # Timeouts: per call, ``stream`` and ``synthesize`` replace these.
            timeout=openai.Timeout(600.0, connect=connect_timeout),
        ),
    )


def call_timeout(timeout: float, connect_timeout: float) -> openai.Timeout:
    """Return the SDK timeout of one call: *timeout* for every network wait."""
    return openai.Timeout(timeout, connect=min(timeout, connect_timeout))


def redact(text: str, api_key: str) -> str:
    """Remove *api_key* and anything shaped like a key from *text* an upstream sent."""
    if api_key:
        text = text.replace(api_key, "[redacted]")
    return _SECRET.sub("[redacted]", text)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Return the wait the upstream asked for (``retry-after-ms`` first), in seconds.

    The wait is clamped to [0, :data:`~service.errors.MAX_WAIT_S`]: a negative one means
    now, an enormous one (``1e306``, ``inf``) the longest voxrelay advises; NaN is none.
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = clamp_wait(float(value) * scale)
        except ValueError:
            continue  # an HTTP date: rare from LLM APIs; the core's backoff applies
        if seconds is not None:
            return seconds
    return None


def upstream_said(stage: str, answer: str, detail: str) -> None:
    """Log what an upstream said about a failure; its caller is told only *answer*.

    An upstream's error text can name the operator's account, organisation, quota or
    billing: the operator's business, not a caller's. *detail* must be redacted already.
    """
    if detail:
        log.warning(
            "%s upstream answered %s",
            stage,
            answer,
            extra={
                "event": "upstream_error",
                "upstream": stage,
                "answer": answer,
                "detail": detail,
            },
        )


def status_error(stage: str, status: int, detail: str, headers: Mapping[str, str]) -> UpstreamError:
    """Return the error for an upstream's HTTP *status*: retryable for 429, 5xx, 408, 409.

    The error names the stage and the status; *detail* (the redacted body) is logged.
    """
    upstream_said(stage, str(status), detail)
    if status == 429 or status >= 500 or status in (408, 409):
        return UpstreamError(
            f"{stage} upstream is unavailable: {status}",
            retryable=True,
            status=status,
            retry_after_s=retry_after(headers),
        )
    return UpstreamError(
        f"{stage} upstream rejected the request: {status}", retryable=False, status=status
    )


def _status_error(stage: str, exc: openai.APIStatusError, api_key: str) -> UpstreamError:
    detail = exc.code if isinstance(exc.code, str) else ""
    # OpenAI nests {"error": {...}} (the SDK unwraps it); others send a flat object or text.
    message = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
    if isinstance(message, str) and message.strip():
        detail += f": {' '.join(message.split())[:300]}"
    return status_error(stage, exc.status_code, redact(detail, api_key), exc.response.headers)


@contextmanager
def upstream_errors(stage: str, api_key: str) -> Iterator[None]:
    """Translate SDK and transport failures of one call into :mod:`voxrelay.service.errors`.

    *stage* names the upstream in messages ("chat", "speech"); *api_key* is scrubbed
    from anything the upstream echoed back. A call that found no file descriptor free
    (the SDK reports it as a connect timeout or error) is :class:`Unavailable`: our
    shortage, not the upstream's failure.
    """
    try:
        with _sdk_errors(stage, api_key):
            yield
    except VoxrelayError as exc:
        if out_of_descriptors(exc):
            raise shortage_error(stage) from exc
        raise


@contextmanager
def _sdk_errors(stage: str, api_key: str) -> Iterator[None]:
    try:
        yield
    except openai.APITimeoutError as exc:
        raise UpstreamTimeout(f"{stage} upstream timed out") from exc
    except openai.APIStatusError as exc:
        raise _status_error(stage, exc, api_key) from exc
    except openai.APIConnectionError as exc:
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
        raise UpstreamError(f"{stage} upstream connection failed ({cause})") from exc
    except httpx2.TimeoutException as exc:
        raise UpstreamTimeout(f"{stage} upstream timed out") from exc
    except _TRANSPORT_ERRORS as exc:
        raise UpstreamError(f"{stage} upstream connection failed ({type(exc).__name__})") from exc
    except openai.APIResponseValidationError as exc:
        raise UpstreamError(f"{stage} upstream sent a malformed reply", retryable=False) from exc
    except openai.APIError as exc:
        # An error event inside a 200 stream: the upstream failed after it began to answer.
        upstream_said(stage, "an error mid-stream", redact(exc.message[:300], api_key))
        raise UpstreamError(f"{stage} upstream failed mid-stream") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpstreamError(f"{stage} upstream sent a malformed reply", retryable=False) from exc


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
