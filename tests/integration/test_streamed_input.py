"""Streamed input end to end on both doors: text spoken while the caller still writes it.

The real app on free ports, real gRPC and WebSocket clients; the embedded engine, or a
fake OpenAI-compatible speech upstream where a test watches the upstream requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import av
import grpc
import pytest
from websockets.asyncio.client import ClientConnection, connect

from fakes.openai_upstream import FakeOpenAI, Latency
from tests.servers import running_app
from voxrelay.gateways.app import App
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

TEXT = (
    "Hello world. The price is $3.50 today, which is fair. Dr. Smith said so at 10:30,"
    " e.g. before lunch. Is that right? Yes! Goodbye for now."
)
WAIT = 20.0
CLOSE_BUDGET_S = 0.1  # SPEC: upstream requests closed within 100 ms of a cancel
TTS_KEY = "sk-speech-5c1e9a7b3d2f40816e2a"


def pieces(text: str, seed: int) -> list[str]:
    """Cut *text* into pieces of 1–7 characters at random boundaries."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        size = rng.randint(1, 7)
        out.append(text[i : i + size])
        i += size
    return out


def decode_seconds(data: bytes, fmt: str) -> float:
    with av.open(io.BytesIO(data), format=fmt) as container:
        samples, rate = 0, 0
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate if rate else 0.0


@asynccontextmanager
async def grpc_stub(app: App) -> AsyncIterator[pb_grpc.SynthesizerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield pb_grpc.SynthesizerStub(channel)


def config(**fields: Any) -> pb.SynthesizeStreamRequest:
    fields.setdefault("format", pb.AUDIO_FORMAT_PCM)
    return pb.SynthesizeStreamRequest(config=pb.SynthesizeStreamConfig(**fields))


def text(piece: str) -> pb.SynthesizeStreamRequest:
    return pb.SynthesizeStreamRequest(text=piece)


FLUSH = pb.SynthesizeStreamRequest(flush=pb.Flush())


async def read_until(call: Any, kind: str) -> list[pb.SynthesizeResponse]:
    """Read responses up to and including the first of *kind*."""
    got: list[pb.SynthesizeResponse] = []
    async with asyncio.timeout(WAIT):
        while True:
            response = await call.read()
            assert response is not grpc.aio.EOF, f"the call ended before {kind}: {got}"
            got.append(response)
            if response.WhichOneof("event") == kind:
                return got


async def read_rest(call: Any) -> list[pb.SynthesizeResponse]:
    got: list[pb.SynthesizeResponse] = []
    async with asyncio.timeout(WAIT):
        while (response := await call.read()) is not grpc.aio.EOF:
            got.append(response)
    return got


def segments_of(responses: list[pb.SynthesizeResponse]) -> list[str]:
    return [r.segment.text for r in responses if r.HasField("segment")]


def audio_of(responses: list[pb.SynthesizeResponse]) -> bytes:
    return b"".join(r.audio.data for r in responses if r.HasField("audio"))


async def whole_segments(stub: pb_grpc.SynthesizerStub, whole: str) -> list[str]:
    request = pb.SynthesizeRequest(text=whole, mode=pb.MODE_SPEAK, format=pb.AUDIO_FORMAT_PCM)
    return segments_of([r async for r in stub.Synthesize(request, timeout=WAIT)])


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app() as app:
        yield app


# gRPC


async def test_grpc_pieces_give_the_segments_of_the_whole_text(app: App) -> None:
    async with grpc_stub(app) as stub:
        expected = await whole_segments(stub, TEXT)
        for seed in range(3):
            call = stub.SynthesizeStream(timeout=WAIT)
            await call.write(config(format=pb.AUDIO_FORMAT_MP3, request_id=f"s{seed}"))
            for piece in pieces(TEXT, seed):
                await call.write(text(piece))
            await call.done_writing()
            responses = await read_rest(call)
            assert await call.code() == grpc.StatusCode.OK
            kinds = [r.WhichOneof("event") for r in responses]
            assert kinds[0] == "started" and kinds[1] == "segment" and kinds[-1] == "finished"
            assert responses[0].started.request_id == f"s{seed}"
            assert segments_of(responses) == expected
            finished = responses[-1].finished
            assert finished.reply_text == TEXT
            assert [r.audio.seq for r in responses if r.HasField("audio")] == list(
                range(sum(r.HasField("audio") for r in responses))
            )
            assert decode_seconds(audio_of(responses), "mp3") > 1.0


async def test_grpc_first_audio_comes_before_the_last_piece_is_sent(app: App) -> None:
    first, rest = "Hello world. This is", " the rest of it, sent only after the first audio."
    async with grpc_stub(app) as stub:
        call = stub.SynthesizeStream(timeout=WAIT)
        await call.write(config())
        for piece in pieces(first, 7):
            await call.write(text(piece))
        before = await read_until(call, "audio")
        assert segments_of(before) == ["Hello world."]
        for piece in pieces(rest, 8):
            await call.write(text(piece))
        await call.done_writing()
        after = await read_rest(call)
    assert segments_of(after) == ["This is the rest of it, sent only after the first audio."]
    assert after[-1].finished.reply_text == first + rest


async def test_grpc_flush_speaks_what_is_buffered_without_ending(app: App) -> None:
    async with grpc_stub(app) as stub:
        call = stub.SynthesizeStream(timeout=WAIT)
        await call.write(config())
        await call.write(text("The price is $3."))
        await call.write(FLUSH)
        got = await read_until(call, "audio")
        assert segments_of(got) == ["The price is $3."]
        await call.write(text("50, not more. "))
        await call.write(FLUSH)
        await call.write(FLUSH)  # nothing buffered: nothing to say
        got += await read_until(call, "segment")
        await call.write(text("Thanks."))
        await call.done_writing()
        got += await read_rest(call)
    assert segments_of(got) == ["The price is $3.", "50, not more.", "Thanks."]
    assert got[-1].finished.segments == 3


async def test_grpc_idle_input_ends_as_a_half_close_would() -> None:
    async with running_app(input_idle_s=0.3) as app, grpc_stub(app) as stub:
        call = stub.SynthesizeStream(timeout=WAIT)
        await call.write(config())
        await call.write(text("Nobody ends this input"))
        responses = await read_rest(call)  # no done_writing: the idle end finishes it
        assert await call.code() == grpc.StatusCode.OK
        assert segments_of(responses) == ["Nobody ends this input"]
        assert responses[-1].HasField("finished")
        assert app.runtime.active_streams == 0


async def test_grpc_piece_over_the_cap_ends_with_invalid_argument_and_whole_audio() -> None:
    async with running_app(max_stream_input_chars=60) as app, grpc_stub(app) as stub:
        call = stub.SynthesizeStream(timeout=WAIT)
        await call.write(config(format=pb.AUDIO_FORMAT_MP3))
        await call.write(text("Hello there, this is the first sentence. "))
        await call.write(FLUSH)
        got = await read_until(call, "audio")
        await call.write(text("And this piece crosses the cap."))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while (response := await call.read()) is not grpc.aio.EOF:
                got.append(response)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "VOXRELAY_MAX_STREAM_INPUT_CHARS" in (caught.value.details() or "")
        assert decode_seconds(audio_of(got), "mp3") > 0  # one valid file
        # A normal request afterwards.
        assert await whole_segments(stub, "Still serving.") == ["Still serving."]


@pytest.mark.parametrize(
    "messages, words",
    [
        ([text("Hello.")], "config message first"),
        ([config(), config()], "config comes once"),
        ([config(), text("bell \x07 rings")], "control character U+0007"),
        ([config(), pb.SynthesizeStreamRequest()], "one of config, text or flush"),
        ([config(format=99)], "AudioFormat"),
    ],
)
async def test_grpc_bad_input_is_invalid_argument(
    app: App, messages: list[pb.SynthesizeStreamRequest], words: str
) -> None:
    async with grpc_stub(app) as stub:
        call = stub.SynthesizeStream(timeout=WAIT)
        for message in messages:
            await call.write(message)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_rest(call)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (caught.value.details() or "")


async def test_grpc_a_piece_that_is_not_utf8_is_invalid_argument(app: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        method = channel.stream_stream(
            "/voxrelay.v1.Synthesizer/SynthesizeStream",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.SynthesizeResponse.FromString,
        )
        call = method(timeout=WAIT)
        await call.write(config().SerializeToString())
        await call.write(text("Fine so far. ").SerializeToString())
        await call.write(b"\x12\x03\xed\xa0\x80")  # field 2 (text): a lone surrogate, encoded
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (caught.value.details() or "")


@asynccontextmanager
async def speech_rig(**overrides: Any) -> AsyncIterator[tuple[App, FakeOpenAI]]:
    """The app with a fake OpenAI speech upstream that speaks slowly enough to cancel."""
    latency = Latency(ttft_s=0, token_s=0, tts_first_byte_s=0.05, tts_rtf=1.0)
    async with FakeOpenAI(latency=latency, api_key=TTS_KEY) as tts:
        settings: dict[str, Any] = dict(tts="openai", tts_base_url=tts.base_url)
        settings.update(tts_api_key=TTS_KEY, llm="echo", **overrides)
        async with running_app(**settings) as app:
            yield app, tts


async def wait_until(predicate: Any, within: float = 2.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the app has no event for these states
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("where", ["input open, nothing said", "mid audio", "after flush"])
async def test_grpc_cancel_closes_the_upstream_and_the_next_request_works(where: str) -> None:
    async with speech_rig() as (app, tts), grpc_stub(app) as stub:
        call = stub.SynthesizeStream(timeout=WAIT)
        await call.write(config())
        if where == "input open, nothing said":
            await read_until(call, "started")
            await call.write(text("half a sent"))
            await asyncio.sleep(0.05)  # the piece is in; no segment is certain yet
            assert not tts.speech_requests  # an open input holds no upstream call
        elif where == "mid audio":
            await call.write(text("A first sentence to speak slowly. And a second one follows."))
            await read_until(call, "audio")
        else:
            await call.write(text("Flushed words"))
            await call.write(FLUSH)
            await read_until(call, "segment")
            await tts.wait_for_event("first_byte")
        cancelled_at = time.monotonic()
        call.cancel()
        await wait_until(lambda: app.runtime.active_streams == 0)
        await tts.wait_for(lambda: all(r.finished_at is not None for r in tts.requests))
        for request in tts.speech_requests:
            if request.client_gone_at is not None:
                assert request.client_gone_at - cancelled_at <= CLOSE_BUDGET_S
            else:
                assert request.finished_at is not None
                assert request.finished_at <= cancelled_at + CLOSE_BUDGET_S
        assert await whole_segments(stub, "After the cancel.") == ["After the cancel."]


# WebSocket


@asynccontextmanager
async def ws_open(app: App) -> AsyncIterator[ClientConnection]:
    async with connect(f"ws://127.0.0.1:{app.ws_port}/v1/stream", max_size=None) as ws:
        yield ws


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def frames_until(ws: ClientConnection, *types: str) -> list[dict[str, Any] | bytes]:
    got: list[dict[str, Any] | bytes] = []
    async with asyncio.timeout(WAIT):
        while True:
            message = await ws.recv()
            frame: dict[str, Any] | bytes = (
                message if isinstance(message, bytes) else json.loads(message)
            )
            got.append(frame)
            if isinstance(frame, dict) and frame["type"] in types:
                return got


def ws_segments(frames: list[dict[str, Any] | bytes]) -> list[str]:
    return [f["text"] for f in frames if isinstance(f, dict) and f["type"] == "segment"]


def ws_audio(frames: list[dict[str, Any] | bytes]) -> bytes:
    return b"".join(f for f in frames if isinstance(f, bytes))


async def test_ws_pieces_give_the_segments_of_the_whole_text(app: App) -> None:
    async with grpc_stub(app) as stub:
        expected = await whole_segments(stub, TEXT)
    async with ws_open(app) as ws:
        for seed in range(2):
            first, *rest = pieces(TEXT, seed)
            await send(
                ws,
                type="synthesize",
                id=f"w{seed}",
                mode="speak",
                input="stream",
                text=first,
                format="wav",
            )
            for piece in rest:
                await send(ws, type="append", id=f"w{seed}", text=piece)
            await send(ws, type="end", id=f"w{seed}")
            frames = await frames_until(ws, "finished", "error")
            assert isinstance(frames[0], dict) and frames[0]["type"] == "started"
            assert isinstance(frames[1], dict) and frames[1]["type"] == "segment"
            assert ws_segments(frames) == expected
            finished = frames[-1]
            assert isinstance(finished, dict) and finished["type"] == "finished"
            assert finished["reply_text"] == TEXT
            assert decode_seconds(ws_audio(frames), "wav") > 1.0


async def test_ws_first_audio_before_the_last_piece_and_flush(app: App) -> None:
    async with ws_open(app) as ws:
        await send(ws, type="synthesize", id="f", mode="speak", input="stream", format="pcm")
        for piece in pieces("Hello world. And then", 3):
            await send(ws, type="append", id="f", text=piece)
        got = await frames_until(ws, "segment")
        assert ws_segments(got) == ["Hello world."]
        await send(ws, type="flush", id="f")
        got += await frames_until(ws, "segment")
        await send(ws, type="append", id="f", text=" that was all.")
        await send(ws, type="end", id="f")
        got += await frames_until(ws, "finished")
    assert ws_segments(got) == ["Hello world.", "And then", "that was all."]


async def test_ws_bad_input_gets_typed_errors_and_the_connection_stays_usable(app: App) -> None:
    async with ws_open(app) as ws:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"type": "append", "id": "nope", "text": "hi"}, "no streamed input"),
            ({"type": "flush", "id": "nope"}, "no streamed input"),
            ({"type": "end"}, "no streamed input"),
            ({"type": "synthesize", "id": "c", "mode": "chat", "input": "stream"}, "speak"),
            (
                {
                    "type": "synthesize",
                    "id": "h",
                    "mode": "speak",
                    "input": "stream",
                    "history": [],
                },
                "history",
            ),
            ({"type": "synthesize", "id": "i", "input": "pipe"}, "input must be"),
            ({"type": "append", "id": "x"}, 'append needs "text"'),
        ]
        for frame, words in cases:
            await ws.send(json.dumps(frame))
            error = (await frames_until(ws, "error"))[-1]
            assert isinstance(error, dict) and error["code"] == "invalid_request", error
            assert words in error["message"]
        # A normal (not streamed) stream is no streamed input either.
        await send(ws, type="synthesize", id="n", mode="speak", text="A normal one.")
        await send(ws, type="append", id="n", text="more")
        frames = await frames_until(ws, "finished")
        errors = [f for f in frames if isinstance(f, dict) and f["type"] == "error"]
        assert len(errors) == 1 and errors[0]["id"] == "n"
        # Control characters end that streamed input with invalid_request.
        await send(ws, type="synthesize", id="cc", mode="speak", input="stream")
        await send(ws, type="append", id="cc", text="bell \x07")
        error = (await frames_until(ws, "error"))[-1]
        assert isinstance(error, dict) and error["id"] == "cc"
        assert error["code"] == "invalid_request" and "U+0007" in error["message"]
        # An append after end is refused; the next stream runs.
        await send(ws, type="synthesize", id="e", mode="speak", input="stream", text="Done.")
        await send(ws, type="end", id="e")
        await send(ws, type="append", id="e", text="late")
        frames = await frames_until(ws, "finished")
        await send(ws, type="synthesize", id="ok", mode="speak", text="Still here.")
        frames = await frames_until(ws, "finished")
        assert ws_segments(frames) == ["Still here."]


async def test_ws_rate_limit_ends_the_stream_with_whole_audio() -> None:
    async with running_app(chars_per_min=70) as app, ws_open(app) as ws:
        await send(
            ws,
            type="synthesize",
            id="r",
            mode="speak",
            input="stream",
            format="mp3",
            text="Here is a first sentence, spoken at once. ",
        )
        await send(ws, type="flush", id="r")
        got = await frames_until(ws, "segment")
        got.append(await ws.recv())  # its first audio
        await send(ws, type="append", id="r", text="This piece is over the budget of chars.")
        got += await frames_until(ws, "error", "finished")
        error = got[-1]
        assert isinstance(error, dict) and error["type"] == "error", error
        assert error["code"] == "rate_limited" and error["retry_after_ms"] > 0
        assert decode_seconds(ws_audio(got), "mp3") > 0  # one valid file


async def test_ws_idle_input_ends_and_cancel_then_a_normal_request() -> None:
    async with running_app(input_idle_s=0.3) as app, ws_open(app) as ws:
        await send(ws, type="synthesize", id="i", mode="speak", input="stream", text="Left open")
        frames = await frames_until(ws, "finished")
        assert ws_segments(frames) == ["Left open"]
        await send(ws, type="synthesize", id="c", mode="speak", input="stream", text="Some")
        await send(ws, type="append", id="c", text=" words, then a cancel")
        await frames_until(ws, "started")
        await send(ws, type="cancel", id="c")
        cancelled = (await frames_until(ws, "cancelled"))[-1]
        assert isinstance(cancelled, dict) and cancelled["id"] == "c"
        await send(ws, type="append", id="c", text="after the cancel")
        error = (await frames_until(ws, "error"))[-1]
        assert isinstance(error, dict) and error["id"] == "c"
        await send(ws, type="synthesize", id="n", mode="speak", text="Normal again.")
        frames = await frames_until(ws, "finished")
        assert all(f["id"] == "n" for f in frames if isinstance(f, dict))
        assert app.runtime.active_streams == 0


async def test_ws_cancel_closes_the_upstream_and_nothing_follows_the_ack() -> None:
    async with speech_rig() as (app, tts), ws_open(app) as ws:
        await send(ws, type="synthesize", id="c", mode="speak", input="stream", format="pcm",
                   text="A first sentence to speak slowly. And a second one")  # fmt: skip
        got = await frames_until(ws, "segment")
        got.append(await ws.recv())  # its first audio: the speech upstream is streaming
        assert isinstance(got[-1], bytes)
        cancelled_at = time.monotonic()
        await send(ws, type="cancel", id="c")
        cancelled = (await frames_until(ws, "cancelled"))[-1]
        assert isinstance(cancelled, dict) and cancelled["id"] == "c"
        await tts.wait_for(lambda: all(r.finished_at is not None for r in tts.requests))
        for request in tts.speech_requests:
            end = request.client_gone_at or request.finished_at
            assert end is not None and end - cancelled_at <= CLOSE_BUDGET_S
        # Not one frame of "c" after the ack: the next frame is the next stream's start.
        await send(ws, type="synthesize", id="n", mode="speak", text="Next.", format="pcm")
        after = await frames_until(ws, "finished")
        first = after[0]
        assert isinstance(first, dict) and first["type"] == "started" and first["id"] == "n"
        assert all(f["id"] == "n" for f in after if isinstance(f, dict))


async def test_grpc_deadline_ends_an_open_input_and_frees_its_slot(app: App) -> None:
    async with grpc_stub(app) as stub:
        call = stub.SynthesizeStream(timeout=0.5)
        await call.write(config())
        await call.write(text("Waiting for more"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_rest(call)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: app.runtime.active_streams == 0)


async def test_an_open_input_holds_its_callers_stream_slot() -> None:
    async with running_app(max_streams_per_key=1) as app, ws_open(app) as first:
        await send(first, type="synthesize", id="a", mode="speak", input="stream")
        await frames_until(first, "started")
        async with ws_open(app) as second:
            await send(second, type="synthesize", id="b", mode="speak", text="Me too.")
            error = (await frames_until(second, "error"))[-1]
            assert isinstance(error, dict) and error["code"] == "rate_limited"
            await send(first, type="end", id="a")
            await frames_until(first, "finished")
            await send(second, type="synthesize", id="b2", mode="speak", text="Me too.")
            assert ws_segments(await frames_until(second, "finished")) == ["Me too."]


async def test_word_offsets_point_into_the_whole_streamed_text(app: App) -> None:
    async with ws_open(app) as ws:
        first, *rest = pieces(TEXT, 5)
        await send(ws, type="synthesize", id="w", mode="speak", input="stream", text=first,
                   format="pcm", word_timestamps=True)  # fmt: skip
        for piece in rest:
            await send(ws, type="append", id="w", text=piece)
        await send(ws, type="end", id="w")
        frames = await frames_until(ws, "finished")
    words = [
        word for f in frames if isinstance(f, dict) and f["type"] == "words" for word in f["words"]
    ]
    assert len(words) == len(TEXT.split())
    offsets = [w["text_offset"] for w in words]
    assert offsets == sorted(offsets)
    for word in words:
        assert TEXT[word["text_offset"] :].startswith(word["text"])
    async with grpc_stub(app) as stub:
        call = stub.SynthesizeStream(timeout=WAIT)
        await call.write(config(word_timestamps=True))
        for piece in pieces(TEXT, 6):
            await call.write(text(piece))
        await call.done_writing()
        responses = await read_rest(call)
    grpc_words = [w for r in responses if r.HasField("words") for w in r.words.words]
    assert [(w.text, w.text_offset) for w in grpc_words] == [
        (w["text"], w["text_offset"]) for w in words
    ]
