"""The event queue between a stream and its door: order, seq, merging, back-pressure."""

from __future__ import annotations

import asyncio

import pytest

from service.model import AudioChunk, SegmentStarted
from service.output import EventQueue


async def drain(queue: EventQueue) -> list[object]:
    items = []
    while len(queue):
        items.append(await queue.get())
    return items


async def test_a_door_that_keeps_up_gets_every_chunk_as_it_came() -> None:
    queue = EventQueue()
    taken = []
    for i in range(5):
        await queue.put_audio(0, bytes([i]) * 4)
        taken.append(await queue.get())
    assert taken == [AudioChunk(0, i, bytes([i]) * 4) for i in range(5)]


async def test_audio_waiting_for_a_busy_door_is_merged_and_seq_counts_what_went_out() -> None:
    queue = EventQueue()
    await queue.put(SegmentStarted(0, "Hi.", 0))
    for i in range(4):
        await queue.put_audio(0, bytes([i]) * 2)
    await queue.put(SegmentStarted(1, "Bye.", 10))
    await queue.put_audio(1, b"xy")
    await queue.put_audio(1, b"zw")
    assert await drain(queue) == [
        SegmentStarted(0, "Hi.", 0),
        AudioChunk(0, 0, b"\x00\x00\x01\x01\x02\x02\x03\x03"),
        SegmentStarted(1, "Bye.", 10),
        AudioChunk(1, 1, b"xyzw"),
    ]


async def test_merged_audio_is_bounded_and_the_producer_then_waits() -> None:
    queue = EventQueue(maxsize=2, max_audio_bytes=4)
    await queue.put_audio(0, b"aa")
    await queue.put_audio(0, b"bb")  # merged: 4 bytes
    await queue.put_audio(0, b"cc")  # a new item: the bound is reached
    blocked = asyncio.create_task(queue.put_audio(0, b"dddd"))  # "cc" + "dddd" > 4: full
    await asyncio.sleep(0)
    assert not blocked.done()
    assert await queue.get() == AudioChunk(0, 0, b"aabb")
    await blocked
    assert await drain(queue) == [AudioChunk(0, 1, b"cc"), AudioChunk(0, 2, b"dddd")]


async def test_replace_all_drops_what_waits_and_push_back_repeats_a_sentinel() -> None:
    queue = EventQueue()
    await queue.put_audio(0, b"aa")
    await queue.put(SegmentStarted(1, "x", 0))
    error = RuntimeError("gone")
    queue.replace_all(error)
    assert await queue.get() is error
    queue.push_back(error)
    assert await queue.get() is error


async def test_a_taker_waits_for_the_next_item() -> None:
    queue = EventQueue()
    taker = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not taker.done()
    await queue.put_audio(3, b"ok")
    assert await asyncio.wait_for(taker, 1) == AudioChunk(3, 0, b"ok")


@pytest.mark.parametrize("maxsize", [1, 3])
async def test_a_full_queue_holds_the_producer_until_the_door_takes(maxsize: int) -> None:
    queue = EventQueue(maxsize=maxsize)
    for i in range(maxsize):
        await queue.put(SegmentStarted(i, "s", 0))
    producer = asyncio.create_task(queue.put(SegmentStarted(maxsize, "s", 0)))
    await asyncio.sleep(0)
    assert not producer.done()
    await queue.get()
    await asyncio.wait_for(producer, 1)
    assert len(queue) == maxsize
