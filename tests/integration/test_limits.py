"""SPEC's limits table on both doors, end to end: cross each limit, see it free again.

For every limit: a request over it gets the typed error (with the wait where SPEC says
so), the limit frees again (an injected clock refills the buckets at once; a stream's
slot returns after a cancel or an error), and other clients are served meanwhile.
Different client addresses are real: Linux routes all of 127.0.0.0/8 to loopback, so
a client bound to 127.0.0.2 is another address to the server.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from websockets.asyncio.client import ClientConnection
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from fakes.openai_upstream import FakeOpenAI, Latency
from fakes.providers import EndlessChat, GatedChat
from tests.conftest import AppFactory
from tests.integration.test_grpc import retry_delay_ms
from tests.integration.test_websocket import (
    SHORT,
    WAIT,
    _raw_client,
    closed,
    http_get,
    open_ws,
    receive,
    send,
    until_end,
    until_type,
)
from tests.unit.test_limits import Clock
from tests.waiting import eventually
from voxrelay.gateways import ws_server
from voxrelay.gateways.app import App
from voxrelay.service.errors import UpstreamError
from voxrelay.service.limits import Admission
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

K1 = "limits-key-one"
K2 = "limits-key-two"
OTHER_ADDRESS = ("127.0.0.2", 0)
SPEAK = pb.MODE_SPEAK


def url(app: App) -> str:
    return f"ws://127.0.0.1:{app.ws_port}/v1/stream"


def with_clock(app: App) -> Clock:
    """Give the app's core an admission that runs on a clock the test moves."""
    clock = Clock()
    app.runtime.admission = Admission.from_settings(app.settings, clock=clock)
    return clock


async def speak_ws(ws: ClientConnection, text: str = SHORT, **extra: Any) -> dict[str, Any]:
    """Run one speak request on *ws*; return its last frame (finished or error)."""
    await send(ws, type="synthesize", text=text, mode="speak", format="pcm", **extra)
    last = (await until_end(ws))[-1]
    assert isinstance(last, dict)
    return last


def metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {key}"),) if key is not None else None


async def speak_grpc(
    app: App, key: str | None = None, text: str = SHORT, mode: int = SPEAK
) -> list[pb.SynthesizeResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        call = pb_grpc.SynthesizerStub(channel).Synthesize(
            pb.SynthesizeRequest(text=text, mode=mode, format=pb.AUDIO_FORMAT_PCM),
            timeout=WAIT,
            metadata=metadata(key),
        )
        return [r async for r in call]


async def grpc_refusal(app: App, key: str | None = None, text: str = SHORT) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await speak_grpc(app, key, text)
    return refused.value


def assert_refused(frame: dict[str, Any], code: str, retry_after_ms: int | None) -> None:
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert frame["retry_after_ms"] == retry_after_ms, frame
    assert frame["retryable"] is (code in ("rate_limited", "busy"))


async def handshake_status(ws: Any) -> tuple[int, Headers]:
    with pytest.raises(InvalidStatus) as refused:
        async with ws:
            pass
    response = refused.value.response
    return response.status_code, response.headers


# VOXRELAY_RATE_LIMIT_PER_MIN


async def test_ws_requests_per_minute_per_address(app_factory: AppFactory) -> None:
    app = await app_factory(rate_limit_per_min=2)
    clock = with_clock(app)
    async with open_ws(url(app)) as ws:
        assert (await speak_ws(ws))["type"] == "finished"
        assert (await speak_ws(ws))["type"] == "finished"
        assert_refused(await speak_ws(ws, id="third"), "rate_limited", 30_000)
        # The budget is the address's, not the connection's.
        async with open_ws(url(app)) as again:
            assert_refused(await speak_ws(again), "rate_limited", 30_000)
        # Refused requests do not count: 10 s on, 20 s are left, not more.
        clock.advance(10)
        assert_refused(await speak_ws(ws), "rate_limited", 20_000)
        # Another address is served meanwhile.
        async with open_ws(url(app), local_addr=OTHER_ADDRESS) as other:
            assert (await speak_ws(other))["type"] == "finished"
        clock.advance(20)
        assert (await speak_ws(ws))["type"] == "finished"


async def test_grpc_requests_per_minute_per_key(app_factory: AppFactory) -> None:
    app = await app_factory(api_keys=f"{K1},{K2}", rate_limit_per_min=2)
    clock = with_clock(app)
    for _ in range(2):
        assert (await speak_grpc(app, K1))[-1].HasField("finished")
    refused = await grpc_refusal(app, K1)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay_ms(refused) == 30_000
    assert "rate limit of 2 requests per minute" in (refused.details() or "")
    assert (await speak_grpc(app, K2))[-1].HasField("finished")  # another key meanwhile
    clock.advance(30)
    assert (await speak_grpc(app, K1))[-1].HasField("finished")


async def test_keyed_limits_follow_the_key_across_addresses_and_doors(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(api_keys=f"{K1},{K2}", rate_limit_per_min=1)
    with_clock(app)
    headers = {"Authorization": f"Bearer {K1}"}
    async with open_ws(url(app), additional_headers=headers) as ws:
        assert (await speak_ws(ws))["type"] == "finished"
    async with open_ws(url(app), additional_headers=headers, local_addr=OTHER_ADDRESS) as ws:
        assert_refused(await speak_ws(ws), "rate_limited", 60_000)
    refused = await grpc_refusal(app, K1)
    assert (refused.code(), retry_delay_ms(refused)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        60_000,
    )
    async with open_ws(url(app), additional_headers={"Authorization": f"Bearer {K2}"}) as ws:
        assert (await speak_ws(ws))["type"] == "finished"


async def test_open_grpc_has_only_the_global_caps(app_factory: AppFactory) -> None:
    app = await app_factory(rate_limit_per_min=1, chars_per_min=10, max_streams_per_key=1)
    for _ in range(3):
        assert (await speak_grpc(app))[-1].HasField("finished")


# VOXRELAY_CHARS_PER_MIN


TEXT_59 = " ".join(["Words"] * 10)[:59]


async def test_ws_characters_per_minute(app_factory: AppFactory) -> None:
    app = await app_factory(chars_per_min=100)
    clock = with_clock(app)
    n = len(TEXT_59)
    wait_ms = round((n - (100 - n)) / (100 / 60) * 1000)
    assert wait_ms == 10_800
    async with open_ws(url(app)) as ws:
        assert (await speak_ws(ws, TEXT_59))["type"] == "finished"
        assert_refused(await speak_ws(ws, TEXT_59), "rate_limited", wait_ms)
        async with open_ws(url(app), local_addr=OTHER_ADDRESS) as other:
            assert (await speak_ws(other, TEXT_59))["type"] == "finished"
        clock.advance(wait_ms / 1000)
        assert (await speak_ws(ws, TEXT_59))["type"] == "finished"


async def test_grpc_characters_per_minute(app_factory: AppFactory) -> None:
    app = await app_factory(api_keys=f"{K1},{K2}", chars_per_min=100)
    clock = with_clock(app)
    assert (await speak_grpc(app, K1, TEXT_59))[-1].HasField("finished")
    refused = await grpc_refusal(app, K1, TEXT_59)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay_ms(refused) == 10_800
    assert "100 characters per minute" in (refused.details() or "")
    assert (await speak_grpc(app, K2, TEXT_59))[-1].HasField("finished")
    clock.advance(10.8)
    assert (await speak_grpc(app, K1, TEXT_59))[-1].HasField("finished")


async def test_a_request_over_the_whole_minute_budget_is_too_large(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(api_keys=K1, chars_per_min=20)
    async with open_ws(url(app), additional_headers={"Authorization": f"Bearer {K1}"}) as ws:
        assert_refused(await speak_ws(ws, SHORT), "too_large", None)
        assert (await speak_ws(ws, "Fits in twenty."))["type"] == "finished"
    refused = await grpc_refusal(app, K1, SHORT)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT


# VOXRELAY_MAX_STREAMS_PER_KEY


async def test_ws_streams_per_address_and_the_slot_returns(app_factory: AppFactory) -> None:
    app = await app_factory(max_streams_per_key=1)
    chat = GatedChat()
    app.synthesizer.engines.chat = chat
    async with open_ws(url(app)) as first, open_ws(url(app)) as second:
        await send(first, type="synthesize", id="held", text="talk")
        await until_type(first, "segment")
        assert_refused(await speak_ws(second, id="more"), "rate_limited", 1000)
        async with open_ws(url(app), local_addr=OTHER_ADDRESS) as other:
            assert (await speak_ws(other))["type"] == "finished"
        # A cancel returns the slot.
        await send(first, type="cancel", id="held")
        assert (await until_end(first))[-1]["type"] == "cancelled"  # type: ignore[index]
        assert (await speak_ws(second))["type"] == "finished"
        # So does an error.
        chat.fail = UpstreamError("the upstream broke", retryable=False)
        await send(first, type="synthesize", id="fails", text="talk")
        await until_type(first, "segment")
        assert_refused(await speak_ws(second), "rate_limited", 1000)
        chat.gate.set()
        error = (await until_end(first))[-1]
        assert isinstance(error, dict) and error["code"] == "upstream_error"
        assert (await speak_ws(second))["type"] == "finished"


async def test_grpc_streams_per_key_and_the_slot_returns(app_factory: AppFactory) -> None:
    app = await app_factory(api_keys=f"{K1},{K2}", max_streams_per_key=1)
    app.synthesizer.engines.chat = GatedChat()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        held = stub.Synthesize(pb.SynthesizeRequest(text="talk"), metadata=metadata(K1))
        async for response in held:
            if response.HasField("audio"):
                break
        refused = await grpc_refusal(app, K1)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay_ms(refused) == 1000
        assert "1 streams in flight" in (refused.details() or "")
        assert (await speak_grpc(app, K2))[-1].HasField("finished")
        held.cancel()
        await asyncio.wait_for(app.runtime.wait_idle(), WAIT)
        assert (await speak_grpc(app, K1))[-1].HasField("finished")


# VOXRELAY_MAX_STREAMS


async def test_global_stream_cap_is_busy_on_both_doors(app_factory: AppFactory) -> None:
    app = await app_factory(max_streams=1)
    chat = GatedChat()
    app.synthesizer.engines.chat = chat
    async with open_ws(url(app)) as first, open_ws(url(app), local_addr=OTHER_ADDRESS) as second:
        await send(first, type="synthesize", id="held", text="talk")
        await until_type(first, "segment")
        assert_refused(await speak_ws(second, id="b"), "busy", 1000)
        refused = await grpc_refusal(app)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay_ms(refused) == 1000
        assert "capacity" in (refused.details() or "")
        # Everything that is not a new stream is served meanwhile.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            voices = await pb_grpc.SynthesizerStub(channel).ListVoices(
                pb.ListVoicesRequest(), timeout=WAIT
            )
            assert voices.voices
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=WAIT
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert (await http_get(f"http://127.0.0.1:{app.ws_port}/readyz"))[0] == 200
        # The stream in flight is not disturbed, and its slot returns when it ends.
        chat.gate.set()
        assert (await until_end(first))[-1]["type"] == "finished"  # type: ignore[index]
        assert (await speak_ws(second))["type"] == "finished"
        assert (await speak_grpc(app))[-1].HasField("finished")


async def test_global_stream_slot_returns_after_a_grpc_cancel(app_factory: AppFactory) -> None:
    app = await app_factory(max_streams=1)
    app.synthesizer.engines.chat = GatedChat()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        held = pb_grpc.SynthesizerStub(channel).Synthesize(pb.SynthesizeRequest(text="talk"))
        async for response in held:
            if response.HasField("segment"):
                break
        assert (await grpc_refusal(app)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.cancel()
        await asyncio.wait_for(app.runtime.wait_idle(), WAIT)
    assert (await speak_grpc(app))[-1].HasField("finished")


# VOXRELAY_MAX_CONNECTIONS, VOXRELAY_MAX_CONNECTIONS_PER_IP


async def test_connections_per_address_503_then_free(app_factory: AppFactory) -> None:
    app = await app_factory(max_connections_per_ip=2)
    connections = app.ws.connections
    async with open_ws(url(app)) as a, open_ws(url(app)):
        status, headers = await handshake_status(open_ws(url(app)))
        assert (status, headers.get("Retry-After")) == (503, "1")
        async with open_ws(url(app), local_addr=OTHER_ADDRESS) as other:
            assert (await speak_ws(other))["type"] == "finished"
        await a.close()
        await eventually(lambda: connections.count("127.0.0.1") == 1)
        async with open_ws(url(app)) as again:
            assert (await speak_ws(again))["type"] == "finished"
    await eventually(lambda: connections.open == 0)


async def test_connections_in_total_503_then_free(app_factory: AppFactory) -> None:
    app = await app_factory(max_connections=2)
    async with open_ws(url(app)) as a, open_ws(url(app), local_addr=OTHER_ADDRESS) as b:
        third = open_ws(url(app), local_addr=("127.0.0.3", 0))
        assert (await handshake_status(third))[0] == 503
        # Plain HTTP on the same port is not a WebSocket connection: still answered.
        assert (await http_get(f"http://127.0.0.1:{app.ws_port}/healthz"))[0] == 200
        assert (await speak_ws(b))["type"] == "finished"
        await a.close()
        await eventually(lambda: app.ws.connections.open == 1)
        async with open_ws(url(app), local_addr=("127.0.0.3", 0)) as c:
            assert (await speak_ws(c))["type"] == "finished"


async def test_forwarded_for_counts_the_client_behind_a_trusted_proxy(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(
        trusted_proxies="127.0.0.1", max_connections_per_ip=1, rate_limit_per_min=1
    )
    with_clock(app)

    def behind_proxy(client: str, **options: Any) -> Any:
        return open_ws(url(app), additional_headers={"X-Forwarded-For": client}, **options)

    async with behind_proxy("203.0.113.5") as first:
        status, _ = await handshake_status(behind_proxy("203.0.113.5"))
        assert status == 503
        async with behind_proxy("198.51.100.1, 203.0.113.6") as second:
            assert (await speak_ws(second))["type"] == "finished"
            assert_refused(await speak_ws(second), "rate_limited", 60_000)
            assert (await speak_ws(first))["type"] == "finished"
            # From an address that is not a trusted proxy the header is ignored:
            # this client is 127.0.0.2, with its own connection slot and budget.
            async with behind_proxy("203.0.113.6", local_addr=OTHER_ADDRESS) as spoof:
                assert (await speak_ws(spoof))["type"] == "finished"


# VOXRELAY_WS_MAX_MESSAGE_BYTES


def frame_of(size: int) -> str:
    """A synthesize frame of exactly *size* bytes that the core refuses as empty."""
    base = {"type": "synthesize", "id": "fits", "text": " ", "pad": ""}
    pad = size - len(json.dumps(base))
    frame = json.dumps({**base, "pad": "x" * pad})
    assert len(frame.encode()) == size
    return frame


async def test_ws_message_size_1009_and_others_served(app_factory: AppFactory) -> None:
    app = await app_factory(ws_max_message_bytes=1024)
    async with open_ws(url(app)) as ws, open_ws(url(app)) as other:
        await ws.send(frame_of(1024))  # at the limit: read and answered
        error = await receive(ws)
        assert isinstance(error, dict) and (error["id"], error["code"]) == (
            "fits",
            "invalid_request",
        )
        await ws.send(frame_of(1025))
        assert (await closed(ws))[0] == 1009
        assert (await speak_ws(other))["type"] == "finished"
    async with open_ws(url(app)) as again:
        assert (await speak_ws(again))["type"] == "finished"


async def test_grpc_message_size_resource_exhausted(app_factory: AppFactory) -> None:
    app = await app_factory(ws_max_message_bytes=1024)
    refused = await grpc_refusal(app, text="a" * 2000)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await speak_grpc(app))[-1].HasField("finished")


# VOXRELAY_MAX_INPUT_CHARS (the input length)


async def test_input_length_on_both_doors(app_factory: AppFactory) -> None:
    app = await app_factory(max_input_chars=50)
    async with open_ws(url(app)) as ws:
        assert_refused(await speak_ws(ws, "a " * 25 + "b", id="big"), "too_large", None)
        assert (await speak_ws(ws, "Fifty. " * 7 + "1"))["type"] == "finished"
    refused = await grpc_refusal(app, text="x" * 51)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit is 50" in (refused.details() or "")
    assert (await speak_grpc(app, text="y" * 50))[-1].HasField("finished")


# VOXRELAY_MAX_REPLY_TOKENS


async def test_reply_tokens_cap_the_reply_on_both_doors(app_factory: AppFactory) -> None:
    app = await app_factory(max_reply_tokens=3)
    text = "one two three four five six seven."
    async with open_ws(url(app)) as ws:
        await send(ws, type="synthesize", text=text, format="pcm")
        finished = (await until_end(ws))[-1]
    assert isinstance(finished, dict) and finished["reply_text"].split() == ["one", "two", "three"]
    responses = await speak_grpc(app, text=text, mode=pb.MODE_CHAT)
    assert responses[-1].finished.reply_text.split() == ["one", "two", "three"]


@pytest.mark.parametrize(("limit", "sent"), [(None, 512), (7, 7), (0, None)])
async def test_reply_tokens_reach_the_upstream_as_max_tokens(
    app_factory: AppFactory, limit: int | None, sent: int | None
) -> None:
    async with FakeOpenAI(latency=Latency.zero()) as fake:
        options: dict[str, Any] = {} if limit is None else {"max_reply_tokens": limit}
        app = await app_factory(llm="openai", llm_base_url=fake.base_url, **options)
        assert (await speak_grpc(app, text="Hello.", mode=pb.MODE_CHAT))[-1].HasField("finished")
        body = fake.chat_requests[-1].body
        assert body.get("max_tokens") == sent
        await app.drain_and_stop()


# VOXRELAY_IDLE_TIMEOUT_S


async def test_idle_close_1000_while_a_busy_client_stays(app_factory: AppFactory) -> None:
    app = await app_factory(idle_timeout_s=0.5)
    async with open_ws(url(app)) as idle, open_ws(url(app)) as busy:
        waiting = asyncio.create_task(closed(idle))
        while not waiting.done():
            await send(busy, type="reset")  # a frame now and then keeps it alive
            await asyncio.sleep(0.1)  # the pace of a busy client is the behaviour under test
        assert waiting.result() == (1000, "idle")
        assert (await speak_ws(busy))["type"] == "finished"
    async with open_ws(url(app)) as again:
        assert (await speak_ws(again))["type"] == "finished"


# VOXRELAY_SEND_STALL_S


async def test_send_stall_drops_only_the_stalled_client(app_factory: AppFactory) -> None:
    app = await app_factory(send_stall_s=1.0)
    chat = EndlessChat()
    app.synthesizer.engines.chat = chat
    sock = await _raw_client(
        app.ws_port,
        {"type": "synthesize", "id": "stall", "text": "talk", "format": "pcm"},
    )
    try:
        await asyncio.wait_for(chat.started.wait(), WAIT)
        async with open_ws(url(app)) as other:  # served while the other stalls
            assert (await speak_ws(other))["type"] == "finished"
            await asyncio.wait_for(chat.closed.wait(), WAIT)  # its upstream was cancelled
            await asyncio.wait_for(app.runtime.wait_idle(), WAIT)
            assert (await speak_ws(other))["type"] == "finished"
    finally:
        sock.close()


# The handshake timeout


async def test_handshake_timeout_drops_a_silent_socket(
    app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ws_server, "HANDSHAKE_TIMEOUT_S", 0.5)
    app = await app_factory()
    loop = asyncio.get_running_loop()
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.setblocking(False)
    try:
        await loop.sock_connect(silent, ("127.0.0.1", app.ws_port))
        await loop.sock_sendall(silent, b"GET /v1/stream HTTP/1.1\r\n")  # ... and no more
        started = loop.time()
        async with open_ws(url(app)) as other:
            assert (await speak_ws(other))["type"] == "finished"
        assert await asyncio.wait_for(loop.sock_recv(silent, 1024), WAIT) == b""
        assert loop.time() - started < 5
    finally:
        silent.close()


# VOXRELAY_GRPC_REFLECTION


async def reflected_services(app: App) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT
        )
        names: list[str] = []
        async for reply in call:
            names += [s.name for s in reply.list_services_response.service]
        return names


async def test_reflection_is_off_by_default(app_factory: AppFactory) -> None:
    app = await app_factory()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await reflected_services(app)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    on = await app_factory(grpc_reflection=True)
    assert "voxrelay.v1.Synthesizer" in await reflected_services(on)
