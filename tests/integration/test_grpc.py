"""The gRPC door end to end: the real app on free ports, generated stubs, real sockets."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import av
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from fakes.openai_upstream import FakeOpenAI, Latency, hang
from tests.servers import running_app
from tests.waiting import eventually
from voxrelay.gateways.app import App
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

SPEAK = pb.MODE_SPEAK
TEXT = "Hello world. This is voxrelay, speaking one sentence at a time. Goodbye for now."


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app() as app:
        yield app


@pytest.fixture
async def stub(app: App) -> AsyncIterator[pb_grpc.SynthesizerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield pb_grpc.SynthesizerStub(channel)


async def collect(stub: pb_grpc.SynthesizerStub, **fields: object) -> list[pb.SynthesizeResponse]:
    return [r async for r in stub.Synthesize(pb.SynthesizeRequest(**fields), timeout=60)]


def decode_seconds(data: bytes, fmt: str, **options: str) -> float:
    with av.open(io.BytesIO(data), format=fmt, options=options) as container:
        samples = 0
        rate = 0
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate


async def test_speak_stream_order_and_figures(stub: pb_grpc.SynthesizerStub) -> None:
    responses = await collect(
        stub, text=TEXT, mode=SPEAK, format=pb.AUDIO_FORMAT_MP3, request_id="req-1"
    )
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert kinds[1] == "segment", "no audio byte may precede segment(0)"
    started, finished = responses[0].started, responses[-1].finished
    assert started.request_id == "req-1"
    assert started.content_type == "audio/mpeg"
    assert started.tts_model and started.voice == "en-us"

    segments = [r.segment for r in responses if r.HasField("segment")]
    audio = [r.audio for r in responses if r.HasField("audio")]
    assert [s.index for s in segments] == list(range(len(segments)))
    assert [a.seq for a in audio] == list(range(len(audio)))
    # Each chunk belongs to the segment announced last before it.
    current = -1
    for r in responses:
        if r.HasField("segment"):
            current = r.segment.index
        elif r.HasField("audio"):
            assert r.audio.segment_index == current
    starts = [s.start_ms for s in segments]
    assert starts[0] == 0 and starts == sorted(starts) and len(set(starts)) == len(starts)

    data = b"".join(a.data for a in audio)
    assert finished.segments == len(segments) >= 2
    assert finished.audio_bytes == len(data)
    assert finished.reply_text == TEXT
    assert " ".join(s.text for s in segments).split() == TEXT.split()
    assert 0 < finished.time_to_first_audio_ms <= finished.total_ms
    seconds = decode_seconds(data, "mp3")
    assert abs(seconds * 1000 - finished.audio_ms) / finished.audio_ms < 0.05
    assert 2.0 < seconds < 10.0


async def test_chat_mode_speaks_the_echo(stub: pb_grpc.SynthesizerStub) -> None:
    responses = await collect(stub, text="Say this back. Then stop.", format=pb.AUDIO_FORMAT_PCM)
    started, finished = responses[0].started, responses[-1].finished
    assert started.llm_model == "echo"
    assert finished.reply_text == "Say this back. Then stop."
    assert finished.completion_tokens > 0
    assert finished.llm_first_token_ms <= finished.time_to_first_audio_ms


@pytest.mark.parametrize(
    ("fmt", "demux", "options"),
    [
        (pb.AUDIO_FORMAT_PCM, "s16le", {"sample_rate": "22050", "ch_layout": "mono"}),
        (pb.AUDIO_FORMAT_WAV, "wav", {}),
        (pb.AUDIO_FORMAT_MP3, "mp3", {}),
        (pb.AUDIO_FORMAT_OPUS, "ogg", {}),
        (pb.AUDIO_FORMAT_FLAC, "flac", {}),
        (pb.AUDIO_FORMAT_AAC, "aac", {}),
        (pb.AUDIO_FORMAT_MULAW, "mulaw", {"sample_rate": "8000", "ch_layout": "mono"}),
        (pb.AUDIO_FORMAT_ALAW, "alaw", {"sample_rate": "8000", "ch_layout": "mono"}),
    ],
)
async def test_every_format_is_one_valid_stream(
    stub: pb_grpc.SynthesizerStub, fmt: int, demux: str, options: dict[str, str]
) -> None:
    responses = await collect(stub, text=TEXT, mode=SPEAK, format=fmt)
    started, finished = responses[0].started, responses[-1].finished
    data = b"".join(r.audio.data for r in responses if r.HasField("audio"))
    assert started.format == fmt
    if fmt == pb.AUDIO_FORMAT_OPUS:
        assert started.sample_rate_hz == 48000
    if fmt in (pb.AUDIO_FORMAT_MULAW, pb.AUDIO_FORMAT_ALAW):
        assert started.sample_rate_hz == 8000
    seconds = decode_seconds(data, demux, **options)
    assert abs(seconds * 1000 - finished.audio_ms) / finished.audio_ms < 0.05


async def test_resampled_stream(stub: pb_grpc.SynthesizerStub) -> None:
    responses = await collect(
        stub,
        text="Resample me, please.",
        mode=SPEAK,
        format=pb.AUDIO_FORMAT_WAV,
        sample_rate_hz=16000,
    )
    assert responses[0].started.sample_rate_hz == 16000
    data = b"".join(r.audio.data for r in responses if r.HasField("audio"))
    with av.open(io.BytesIO(data), format="wav") as container:
        assert container.streams.audio[0].sample_rate == 16000


async def test_list_voices(stub: pb_grpc.SynthesizerStub) -> None:
    everything = await stub.ListVoices(pb.ListVoicesRequest(), timeout=10)
    names = {v.name for v in everything.voices}
    assert "en-us" in names and len(names) > 20
    english = await stub.ListVoices(pb.ListVoicesRequest(language="en"), timeout=10)
    assert english.voices and all(v.language.startswith("en") for v in english.voices)
    assert len(english.voices) < len(everything.voices)


async def test_health(app: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "voxrelay.v1.Synthesizer"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


BAD_INPUTS = [
    ({"text": ""}, "empty"),
    ({"text": "   \n\t "}, "empty"),
    ({"text": "x" * 4097}, "limit"),
    ({"text": "hi", "voice": "no-such-voice"}, "voice"),
    ({"text": "hi", "format": 99}, "format"),
    ({"text": "hi", "mode": 7}, "mode"),
    ({"text": "hi", "format": pb.AUDIO_FORMAT_OPUS, "sample_rate_hz": 44100}, "44100"),
    ({"text": "hi", "sample_rate_hz": 3}, "3"),
    ({"text": "bell\x07"}, "control"),
    ({"text": "hi", "speed": 9.0}, "speed"),
    ({"text": "hi", "history": [pb.ChatMessage(role="wizard", content="x")]}, "role"),
]


@pytest.mark.parametrize(("fields", "hint"), BAD_INPUTS)
async def test_bad_input_is_invalid_argument(
    stub: pb_grpc.SynthesizerStub, fields: dict[str, object], hint: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, **{"mode": SPEAK, **fields})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hint in (info.value.details() or "")
    # ... and the server goes on serving.
    responses = await collect(stub, text="Still here.", mode=SPEAK)
    assert responses[-1].HasField("finished")


async def test_message_over_receive_limit(stub: pb_grpc.SynthesizerStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, text="a" * 70000)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def retry_delay_ms(error: grpc.aio.AioRpcError) -> int | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return int(info.retry_delay.ToMilliseconds())
    return None


async def idle(app: App) -> None:
    await asyncio.wait_for(app.runtime.wait_idle(), 10)


LONG = " ".join(f"This is sentence number {i} of a long text." for i in range(60))


async def test_client_cancel_stops_the_stream(app: App, stub: pb_grpc.SynthesizerStub) -> None:
    baseline = len(asyncio.all_tasks())
    call = stub.Synthesize(pb.SynthesizeRequest(text=LONG, mode=SPEAK), timeout=60)
    async for response in call:
        if response.HasField("audio"):
            break
    assert app.runtime.active_streams == 1
    call.cancel()
    await idle(app)
    await eventually(lambda: len(asyncio.all_tasks()) <= baseline)
    # The engine is free again: a new request is served in full.
    responses = await collect(stub, text="After the cancel.", mode=SPEAK)
    assert responses[-1].finished.segments == 1


async def test_deadline_stops_the_upstream_call() -> None:
    async with FakeOpenAI(latency=Latency.zero()) as fake:
        fake.speech_faults.always(hang())
        async with (
            running_app(tts="openai", tts_base_url=fake.base_url) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            stub = pb_grpc.SynthesizerStub(channel)
            request_message = pb.SynthesizeRequest(text="Hello there.", mode=SPEAK)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Synthesize(request_message, timeout=3):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await idle(app)
            request = fake.speech_requests[0]
            await fake.wait_for(lambda: request.client_gone_at is not None)


async def test_drain_lets_a_stream_in_flight_finish(app: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        call = stub.Synthesize(pb.SynthesizeRequest(text=TEXT, mode=SPEAK), timeout=60)
        first = await call.read()
        assert first.HasField("started")
        drain = asyncio.create_task(app.drain_and_stop())
        await eventually(lambda: app.runtime.draining)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        rest = []
        while (response := await call.read()) is not grpc.aio.EOF:
            rest.append(response)
        assert rest[-1].HasField("finished")
        await drain
