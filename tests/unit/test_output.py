"""The end of a stream: its event queue (order, seq, merging, back-pressure) and batching."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from voxrelay.service.audio import StreamEncoder
from voxrelay.service.errors import TooLarge, Unavailable
from voxrelay.service.model import AudioChunk, AudioFormat, SegmentStarted
from voxrelay.service.output import (
    ENCODER_NICENESS,
    HOLD_LEAD_MS,
    MAX_HOLD_S,
    MAX_JOINED_PCM_BYTES,
    MAX_LOOP_PCM_BYTES,
    EncoderRunner,
    EventQueue,
    PcmFeed,
    StreamEnd,
    StreamOutput,
    encoder_pool,
)


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


async def test_an_end_drops_what_waits_and_every_taker_sees_it() -> None:
    queue = EventQueue()
    await queue.put_audio(0, b"aa")
    await queue.put(SegmentStarted(1, "x", 0))
    end = StreamEnd(Unavailable("gone"))
    queue.end(end)
    assert await queue.get() is end
    assert await queue.get() is end


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


async def test_delivered_waits_until_the_door_has_sent_all_and_asks_again() -> None:
    queue = EventQueue()
    await queue.put(SegmentStarted(0, "s", 0))
    await queue.put_audio(0, b"ab")
    delivered = asyncio.create_task(queue.delivered())
    assert await queue.get() == SegmentStarted(0, "s", 0)
    assert await queue.get() == AudioChunk(0, 0, b"ab")  # taken, still being sent
    await asyncio.sleep(0)
    assert not delivered.done()
    asking = asyncio.create_task(queue.get())  # sent: the door asks for more
    await asyncio.wait_for(delivered, 1)
    await queue.put_audio(0, b"cd")
    assert await asyncio.wait_for(asking, 1) == AudioChunk(0, 1, b"cd")


# Pace-aware batching: how long small audio may wait to go out together


def pcm_ms(ms: int, rate: int = 24_000) -> bytes:
    return bytes(rate * ms // 1000 * 2)


@pytest.fixture
async def output() -> AsyncIterator[tuple[StreamOutput, list[int]]]:
    """A PCM stream's output at 24 kHz and its clock (ms since the request), set by hand."""
    now = [0]
    encoder = StreamEncoder(AudioFormat.PCM, input_rate=24_000, output_rate=24_000)
    with ThreadPoolExecutor(1) as executor:
        out = StreamOutput(
            EventQueue(),
            EncoderRunner(encoder, executor, inline=True),
            input_rate=24_000,
            since=lambda: now[0],
        )
        yield out, now
        out.close()


async def test_the_first_audio_never_waits(output: tuple[StreamOutput, list[int]]) -> None:
    out, now = output
    now[0] = 5_000
    assert out.hold_s() == 0.0


async def test_a_listener_short_of_audio_gets_it_at_once(
    output: tuple[StreamOutput, list[int]],
) -> None:
    out, now = output
    now[0] = 500  # first audio at 500 ms
    await out.audio(pcm_ms(20))
    assert out.hold_s() == 0.0
    await out.audio(pcm_ms(HOLD_LEAD_MS - 20))  # exactly the lead: nothing to spare
    assert out.hold_s() == 0.0
    now[0] += 100  # 100 ms played: below the lead again
    assert out.hold_s() == 0.0


@pytest.mark.parametrize("lead_ms", [HOLD_LEAD_MS + 1, HOLD_LEAD_MS + 200, 600, 5_000])
async def test_audio_waits_at_most_half_what_the_listener_has_to_spare(
    output: tuple[StreamOutput, list[int]], lead_ms: int
) -> None:
    out, now = output
    now[0] = 500
    await out.audio(pcm_ms(lead_ms))
    hold = out.hold_s()
    spare_s = (lead_ms - HOLD_LEAD_MS) / 1000
    assert 0 < hold <= MAX_HOLD_S
    assert hold == pytest.approx(min(MAX_HOLD_S, spare_s / 2))
    # Played for as long as it waits, the listener still has more than the lead in hand.
    assert lead_ms - hold * 1000 > HOLD_LEAD_MS


async def test_a_take_joins_what_gathered_up_to_the_bound() -> None:
    feed = PcmFeed()
    for _ in range(3):
        await feed.put(b"ab")
    assert await feed.take() == b"ababab"
    big = bytes(MAX_JOINED_PCM_BYTES // 2)
    for _ in range(3):
        await feed.put(big)
    assert await feed.take() == big * 2  # the bound reached: the rest is the next piece
    assert await feed.take() == big
    feed.end()
    assert await feed.take() is None


async def test_a_held_take_ends_when_the_segment_does() -> None:
    feed = PcmFeed()
    await feed.put(b"ab")
    taking = asyncio.create_task(feed.take(hold_s=3600))
    await asyncio.sleep(0)
    await feed.put(b"cd")
    assert not taking.done()
    feed.end()
    assert await taking == b"abcd"
    assert await feed.take() is None


async def test_a_full_feed_holds_the_engine_until_the_output_takes() -> None:
    feed = PcmFeed(max_bytes=4)
    await feed.put(b"abcd")  # at the bound: not over it
    putting = asyncio.create_task(feed.put(b"ef"))
    await asyncio.sleep(0)
    assert not putting.done()  # over the bound: the engine waits
    assert await feed.take() == b"abcdef"
    await asyncio.wait_for(putting, 1)


async def test_the_audio_cap_ends_the_stream_after_exactly_its_audio() -> None:
    queue = EventQueue(maxsize=64)
    with ThreadPoolExecutor(1) as pool:
        encoder = EncoderRunner(
            StreamEncoder(AudioFormat.PCM, input_rate=1000, output_rate=1000), pool, inline=True
        )
        out = StreamOutput(queue, encoder, input_rate=1000, since=lambda: 0, max_audio_s=0.5)
        await out.segment("x")
        await out.audio(bytes(600))  # 300 samples: under the cap
        with pytest.raises(TooLarge, match="VOXRELAY_MAX_STREAM_AUDIO_S"):
            await out.audio(bytes(600))
        assert out.capped and out.audio_ms == 500
        await out.flush()
    chunks = [
        e for e in [await queue.get() for _ in range(len(queue))] if isinstance(e, AudioChunk)
    ]
    assert sum(len(c.data) for c in chunks) == 1000


class NotingEncoder(StreamEncoder):
    """An opus encoder that notes the thread each call runs in, and that thread's nice value."""

    def __init__(self) -> None:
        super().__init__(AudioFormat.OPUS, input_rate=24_000, output_rate=48_000)
        self.calls: list[tuple[str, int, int]] = []

    def _note(self, size: int) -> None:
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        self.calls.append((threading.current_thread().name, nice, size))

    def encode(self, pcm: bytes) -> bytes:
        self._note(len(pcm))
        return super().encode(pcm)

    def flush(self) -> bytes:
        self._note(0)
        return super().flush()


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
async def test_audio_a_listener_waits_for_is_encoded_at_once_the_rest_by_low_priority_threads() -> (
    None
):
    now, encoder = [0], NotingEncoder()
    loop_nice = os.getpriority(os.PRIO_PROCESS, 0)
    with encoder_pool(1) as pool:
        out = StreamOutput(
            EventQueue(64), EncoderRunner(encoder, pool), input_rate=24_000, since=lambda: now[0]
        )
        await out.segment("x")
        await out.audio(pcm_ms(1000))  # the first audio: the listener waits for its start
        await out.audio(pcm_ms(1000))  # 2 s in hand
        now[0] = 1950  # 50 ms in hand: short of audio again
        await out.audio(pcm_ms(400))
        now[0] = 2000  # 400 ms in hand
        await out.flush()
        out.close()
    loop, pool = threading.current_thread().name, "encode_0"
    second = pcm_ms(1000)
    assert [(name, size) for name, _, size in encoder.calls] == [
        (loop, MAX_LOOP_PCM_BYTES),  # no more than this on the loop at once
        (pool, len(second) - MAX_LOOP_PCM_BYTES),
        (pool, len(second)),
        (loop, len(pcm_ms(400))),
        (pool, 0),
    ]
    nices = {name: nice for name, nice, _ in encoder.calls}
    assert nices[pool] == ENCODER_NICENESS and nices[loop] == loop_nice < ENCODER_NICENESS
    assert os.getpriority(os.PRIO_PROCESS, 0) == loop_nice  # the loop's own is untouched


async def test_encoders_still_run_where_priorities_cannot_be_lowered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError("setpriority: not allowed here")

    monkeypatch.setattr(os, "setpriority", refuse)
    encoder = StreamEncoder(AudioFormat.OPUS, input_rate=24_000, output_rate=48_000)
    with encoder_pool(1) as pool:
        runner = EncoderRunner(encoder, pool)
        data = await runner.encode(pcm_ms(100)) + await runner.flush()
        runner.close()
    assert data.startswith(b"OggS")
