"""No caller can take the service from the others (SPEC: Isolation), over real sockets.

Each test crosses one limit as an attacker would, then checks that the server let go
of what that caller held and still serves someone else.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from fakes.providers import EndlessSpeech, ScriptedChat
from tests.conftest import AppFactory
from tests.integration.test_websocket import (
    WAIT,
    audio_of,
    decode_seconds,
    events,
    open_ws,
    receive,
    send,
    until_end,
)
from tests.waiting import eventually
from voxrelay.gateways.app import App
from voxrelay.gateways.grpc_server import _GrpcSink, _unless_gone
from voxrelay.service import metrics
from voxrelay.service.relay import ClientGone
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

BYTES_PER_S = 2 * 24_000  # EndlessSpeech's PCM: s16le mono at 24 kHz


def endless(app: App, **options: Any) -> EndlessSpeech:
    engine = EndlessSpeech(**options)
    app.synthesizer.engines.speech = engine
    return engine


def ws_url(app: App) -> str:
    return f"ws://127.0.0.1:{app.ws_port}/v1/stream"


async def speak_ws(app: App, text: str = "Still here.", **options: Any) -> list[Any]:
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", text=text, mode="speak", format="pcm", **options)
        return await until_end(ws)


async def stays_under(read: Any, bound: float, within_s: float = 3.0) -> float:
    """Wait up to *within_s* for ``read()`` to pass *bound*; return where it stood.

    What is checked is that something does *not* happen, so the wait is bounded.
    """
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and read() <= bound:  # noqa: ASYNC110 - a counter
        await asyncio.sleep(0.05)
    value: float = read()
    return value


# Audio only as fast as the listener takes it


async def test_a_websocket_listener_that_stops_reading_stops_the_engine(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(send_stall_s=0)
    engine = endless(app)
    async with open_ws(ws_url(app), max_queue=1) as ws:
        await send(ws, type="synthesize", text="Talk.", mode="speak", format="pcm")
        await eventually(lambda: engine.pulled > 0)
        # Nothing read from here on: only bounded buffers may fill.
        pulled_s = await stays_under(lambda: engine.pulled_s, 300)
        assert pulled_s < 300, f"the engine ran {pulled_s:.0f} s ahead of a listener"
    await eventually(lambda: app.runtime.active_streams == 0)
    engine.seconds = 0.5
    assert events(await speak_ws(app), "finished")


async def test_a_grpc_client_that_stops_reading_is_dropped_and_its_slot_freed(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(send_stall_s=1)
    engine = endless(app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        request = pb.SynthesizeRequest(
            text="Talk.", mode=pb.MODE_SPEAK, format=pb.AUDIO_FORMAT_PCM, sample_rate_hz=48_000
        )
        call = stub.Synthesize(request)  # never read
        await eventually(lambda: app.runtime.active_streams == 1)
        await eventually(lambda: app.runtime.active_streams == 0)  # no event for a slot
        pulled = engine.pulled
        assert await stays_under(lambda: engine.pulled, pulled, within_s=0.5) == pulled
        call.cancel()
        engine.seconds = 0.5
        replies = [r async for r in stub.Synthesize(request)]
        assert replies[-1].HasField("finished")


async def after_the_client_left(
    first: Callable[[Any], Awaitable[Any]], late: Callable[[Any], Awaitable[Any]]
) -> BaseException | None:
    """Serve one call with *first*(context); once its client has cancelled and the call
    has ended, run *late*(context) from a task grpc does not cancel; return what it raised.
    """
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    tasks: list[asyncio.Task[None]] = []

    class Door(pb_grpc.SynthesizerServicer):
        async def Synthesize(self, request: Any, context: Any) -> None:
            ended = asyncio.Event()
            context.add_done_callback(lambda _: ended.set())
            await first(context)

            async def once_ended() -> None:
                await ended.wait()
                try:
                    await late(context)
                except Exception as exc:  # the outcome under test
                    outcome.set_result(exc)
                else:
                    outcome.set_result(None)

            tasks.append(asyncio.create_task(once_ended()))
            await asyncio.Event().wait()  # until grpc cancels it

    server = grpc.aio.server()
    pb_grpc.add_SynthesizerServicer_to_server(Door(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.SynthesizerStub(channel).Synthesize(pb.SynthesizeRequest(text="Hi."))
            await call.read()
            call.cancel()
        async with asyncio.timeout(WAIT):
            return await outcome
    finally:
        await server.stop(None)
        await asyncio.gather(*tasks)


async def test_a_write_to_a_grpc_call_its_client_left_is_a_client_gone() -> None:
    """The door's sink meets a call that ended under it as a client gone, not an error.

    grpc cancels a handler's task when its client cancels, but a write's own failure can
    reach the task first (the soak saw ``internal`` streams from it). Here the write comes
    from a task grpc does not cancel, once the call is over: what that race's loser sees.
    """
    sinks: list[_GrpcSink] = []

    async def first(context: Any) -> None:
        sinks.append(_GrpcSink(context, peer="client", stall_s=30))
        await sinks[0].write(pb.SynthesizeResponse())

    error = await after_the_client_left(first, lambda _: sinks[0].write(pb.SynthesizeResponse()))
    assert type(error) is ClientGone, repr(error)


async def test_a_status_for_a_grpc_call_its_client_left_is_dropped() -> None:
    """The door ends a call with a status only while its client can still get one."""
    error = await after_the_client_left(
        lambda context: context.write(pb.SynthesizeResponse()),
        lambda context: _unless_gone(context.abort(grpc.StatusCode.UNAVAILABLE, "late")),
    )
    assert error is None, repr(error)


# A cap on one stream's audio


async def test_a_stream_ends_too_large_at_its_audio_cap_with_a_whole_file(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(max_stream_audio_s=2)
    engine = endless(app)
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", text="Talk.", mode="speak", format="mp3")
        frames = await until_end(ws)
    error = frames[-1]
    assert isinstance(error, dict) and error["code"] == "too_large"
    assert "VOXRELAY_MAX_STREAM_AUDIO_S" in error["message"]
    assert decode_seconds(audio_of(frames), "mp3") == pytest.approx(2.0, abs=0.1)
    engine.seconds = 0.5
    assert events(await speak_ws(app), "finished")


async def test_a_run_without_spaces_is_spoken_in_bounded_segments(
    app_factory: AppFactory,
) -> None:
    app = await app_factory()
    engine = endless(app, seconds=0.05)
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", text="1" * 4096, mode="speak", format="pcm")
        frames = await until_end(ws)
    segments = events(frames, "segment")
    assert "".join(s["text"] for s in segments) == "1" * 4096
    assert max(len(s["text"]) for s in segments) <= 300
    assert len(engine.calls) == len(segments)


async def test_a_whole_reply_comes_in_fragments_of_one_message(app_factory: AppFactory) -> None:
    app = await app_factory()
    endless(app, seconds=10)
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", text="Talk.", mode="speak", format="pcm", stream=False)
        assert (await receive(ws))["type"] == "started"
        assert (await receive(ws))["type"] == "segment"
        fragments = [f async for f in ws.recv_streaming()]
        assert len(fragments) > 1
        assert sum(len(f) for f in fragments) == 10 * BYTES_PER_S
        assert json.loads(await ws.recv())["type"] == "finished"


# What a request costs


async def test_instructions_are_capped_and_count_against_the_character_budget(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(max_instructions_chars=50, chars_per_min=100)
    endless(app, seconds=0.05)
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", text="Hi.", mode="speak", instructions="x" * 51)
        refused = (await until_end(ws))[-1]
        assert refused["code"] == "too_large"
        assert "VOXRELAY_MAX_INSTRUCTIONS_CHARS" in refused["message"]
        await send(ws, type="synthesize", text="Hi.", mode="speak", instructions="x" * 50)
        assert events(await until_end(ws), "finished")
        # 53 characters charged of 100: the same request again is over the budget.
        await send(ws, type="synthesize", text="Hi.", mode="speak", instructions="x" * 50)
        assert (await until_end(ws))[-1]["code"] == "rate_limited"


# An open breaker fails fast


async def test_an_open_speech_breaker_fails_chat_before_the_llm_is_called(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(breaker_failures=1, breaker_cooldown_s=60)
    chat = ScriptedChat("Hello there.")
    app.synthesizer.engines.chat = chat
    app.synthesizer.engines.tts_stage.breaker.record_failure(trial=False)
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", text="Hi.", format="pcm")
        frames = await until_end(ws)
    assert [f["type"] for f in frames if isinstance(f, dict)] == ["error"]
    assert frames[-1]["code"] == "unavailable" and frames[-1]["retryable"]
    assert chat.calls == []


# Connections


async def test_grpc_connections_are_counted(app_factory: AppFactory) -> None:
    app = await app_factory()

    def gauge() -> float | None:
        return metrics.REGISTRY.get_sample_value("voxrelay_grpc_connections")

    assert gauge() == app.grpc.connections() == 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), WAIT)
        await eventually(lambda: gauge() == 1)
    await eventually(lambda: gauge() == 0)
