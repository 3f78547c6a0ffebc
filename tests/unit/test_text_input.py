"""TextInput: what a door puts in comes out in order, with the stream's rules applied."""

from __future__ import annotations

import asyncio

import pytest

from voxrelay.service.errors import InvalidRequest, RateLimited, TooLarge
from voxrelay.service.text_input import FLUSH, Flush, TextInput


async def drain(text_input: TextInput, charge: object = None) -> list[str | Flush]:
    return [piece async for piece in text_input.pieces(charge)]  # type: ignore[arg-type]


async def test_pieces_and_flushes_come_out_in_order_until_the_end() -> None:
    text_input = TextInput()
    text_input.append("Hel")
    text_input.append("")  # nothing: skipped
    text_input.flush()
    text_input.append("lo.")
    text_input.end()
    text_input.append("after the end")  # ignored: the input is closed
    assert text_input.closed
    assert await drain(text_input) == ["Hel", FLUSH, "lo."]


async def test_the_piece_that_crosses_the_cap_fails_after_those_before_it() -> None:
    text_input = TextInput(max_chars=10)
    text_input.append("12345")
    text_input.append("678901")
    assert text_input.closed
    got: list[str | Flush] = []
    with pytest.raises(TooLarge, match="VOXRELAY_MAX_STREAM_INPUT_CHARS"):
        async for piece in text_input.pieces():
            got.append(piece)
    assert got == ["12345"]


async def test_control_characters_end_the_input() -> None:
    text_input = TextInput()
    text_input.append("ok\n\t")
    text_input.append("bad\x1b")
    with pytest.raises(InvalidRequest, match="U\\+001B"):
        await drain(text_input)


async def test_each_piece_is_charged_before_it_comes_out() -> None:
    charged: list[int] = []

    async def charge(chars: int) -> None:
        if sum(charged) + chars > 6:
            raise RateLimited("over", retry_after_s=1.0)
        charged.append(chars)

    text_input = TextInput()
    for piece in ("abc", "def", "g"):
        text_input.append(piece)
    got: list[str | Flush] = []
    with pytest.raises(RateLimited):
        async for piece in text_input.pieces(charge):
            got.append(piece)
    assert got == ["abc", "def"] and charged == [3, 3] and text_input.closed


async def test_an_idle_input_ends_as_end_would_and_activity_restarts_the_clock() -> None:
    text_input = TextInput(idle_s=0.2)
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, text_input.append, "a")
    loop.call_later(0.25, text_input.flush)  # within 0.2 s of the piece: not idle yet
    began = loop.time()
    assert await drain(text_input) == ["a", FLUSH]
    assert loop.time() - began >= 0.25 + 0.2 - 0.01
    assert text_input.closed
