"""Reading Chat Completions stream chunks as the JSON servers send, however sparse."""

from __future__ import annotations

import pytest

from voxrelay.service.errors import UpstreamError
from voxrelay.service.providers.openai_chat import _read_chunk


def test_content_of_the_first_choice() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}
    assert _read_chunk(chunk) == ("Hi", None)


def test_other_choices_are_ignored() -> None:
    chunk = {
        "choices": [
            {"index": 1, "delta": {"content": "no"}},
            {"index": 0, "delta": {"content": "yes"}},
        ]
    }
    assert _read_chunk(chunk) == ("yes", None)


@pytest.mark.parametrize(
    "chunk",
    [
        {},
        {"choices": None},
        {"choices": []},
        {"choices": [{}]},
        {"choices": [{"index": 0}]},
        {"choices": [{"index": 0, "delta": None}]},
        {"choices": [{"index": 0, "delta": {"content": None}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": []}}]},
        {"choices": ["text"]},
        {"choices": "text"},
    ],
)
def test_sparse_chunks_carry_no_text(chunk: dict[str, object]) -> None:
    assert _read_chunk(chunk) == ("", None)


def test_a_choice_without_index_counts_as_the_first() -> None:
    assert _read_chunk({"choices": [{"delta": {"content": "a"}}]}) == ("a", None)
    assert _read_chunk({"choices": [{"index": None, "delta": {"content": "b"}}]}) == ("b", None)


def test_usage_on_the_last_chunk() -> None:
    chunk = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 40}}
    assert _read_chunk(chunk) == ("", (12, 40))


@pytest.mark.parametrize(
    "usage", [None, {}, {"prompt_tokens": 1}, {"prompt_tokens": "1", "completion_tokens": 2}, 3]
)
def test_incomplete_usage_is_no_usage(usage: object) -> None:
    assert _read_chunk({"choices": [], "usage": usage}) == ("", None)


@pytest.mark.parametrize("chunk", [None, [1, 2], "data", 3])
def test_a_chunk_that_is_not_an_object_is_malformed(chunk: object) -> None:
    with pytest.raises(UpstreamError, match="malformed") as info:
        _read_chunk(chunk)
    assert not info.value.retryable
