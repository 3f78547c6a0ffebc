"""API keys and origins on both doors, end to end, and the key reload on SIGHUP.

SPEC rows: ``VOXRELAY_API_KEYS`` / ``VOXRELAY_API_KEYS_FILE`` and
``VOXRELAY_ALLOWED_ORIGINS``. Every refusal is checked for its typed form, for the
server going on serving others, and for the key never reaching a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from tests.conftest import AppFactory
from tests.integration.test_websocket import (
    SHORT,
    WAIT,
    closed,
    open_ws,
    send,
    until_end,
)
from tests.servers import make_settings, serve_process
from tests.waiting import eventually
from voxrelay.gateways import ws_session
from voxrelay.gateways.app import App
from voxrelay.service.auth import key_id
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

KEY = "vx-test-key-0123456789"
OTHER_KEY = "vx-other-key-9876543210"
SPEAK = pb.MODE_SPEAK


def ws_url(app: App) -> str:
    return f"ws://127.0.0.1:{app.ws_port}/v1/stream"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def speak_ws(ws: ClientConnection, text: str = SHORT) -> dict[str, Any]:
    """Run one speak request on *ws*; return its last frame."""
    await send(ws, type="synthesize", text=text, mode="speak", format="pcm")
    last = (await until_end(ws))[-1]
    assert isinstance(last, dict)
    return last


async def speak_grpc(app: App, key: str | None) -> list[pb.SynthesizeResponse]:
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        call = stub.Synthesize(
            pb.SynthesizeRequest(text=SHORT, mode=SPEAK, format=pb.AUDIO_FORMAT_PCM),
            timeout=WAIT,
            metadata=metadata,
        )
        return [r async for r in call]


async def voices_grpc(app: App, metadata: Any = None) -> pb.ListVoicesResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        return await pb_grpc.SynthesizerStub(channel).ListVoices(
            pb.ListVoicesRequest(language="en"), timeout=WAIT, metadata=metadata
        )


async def refused_status(ws: Any) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with ws:
            pass
    return refused.value.response.status_code


@pytest.fixture
def no_key_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail the test if a key shows up in any of voxrelay's own log records."""
    caplog.set_level(logging.DEBUG)
    yield None
    ours = [
        r for r in caplog.records if r.name.split(".")[0] in ("voxrelay", "service", "gateways")
    ]
    text = "\n".join(r.getMessage() + " " + repr(vars(r)) for r in ours)
    assert KEY not in text and OTHER_KEY not in text


@pytest.fixture
async def keyed(app_factory: AppFactory, no_key_in_logs: None) -> App:
    return await app_factory(api_keys=KEY)


# gRPC


async def test_grpc_refuses_missing_and_wrong_keys_unauthenticated(keyed: App) -> None:
    for metadata in (
        None,
        (("authorization", f"Bearer {OTHER_KEY}"),),
        (("authorization", f"Basic {KEY}"),),
        (("authorization", KEY),),
        (("x-api-key", KEY),),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await voices_grpc(keyed, metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await speak_grpc(keyed, OTHER_KEY)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await speak_grpc(keyed, None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert keyed.runtime.active_streams == 0
    # Meanwhile a caller with the key is served, on both methods.
    responses = await speak_grpc(keyed, KEY)
    assert responses[-1].HasField("finished")
    reply = await voices_grpc(keyed, (("authorization", f"Bearer {KEY}"),))
    assert any(v.name == "en-us" for v in reply.voices)


async def test_grpc_health_stays_open(keyed: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keyed.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_open_grpc_needs_no_key(app_factory: AppFactory) -> None:
    app = await app_factory()
    assert (await speak_grpc(app, None))[-1].HasField("finished")
    assert (await speak_grpc(app, "whatever"))[-1].HasField("finished")


# WebSocket


async def test_ws_header_key(keyed: App) -> None:
    async with open_ws(ws_url(keyed), additional_headers=bearer(KEY)) as ws:
        assert (await speak_ws(ws))["type"] == "finished"


@pytest.mark.parametrize(
    "header",
    [f"Bearer {OTHER_KEY}", f"Basic {KEY}", KEY, "Bearer ", f"Bearer {KEY}x"],
)
async def test_ws_wrong_header_is_401_before_the_upgrade(keyed: App, header: str) -> None:
    async with open_ws(ws_url(keyed), additional_headers=bearer(KEY)) as other:
        status = await refused_status(
            open_ws(ws_url(keyed), additional_headers={"Authorization": header})
        )
        assert status == 401
        # A client that was let in is served meanwhile.
        assert (await speak_ws(other))["type"] == "finished"


async def test_ws_auth_frame_for_browsers(keyed: App) -> None:
    async with open_ws(ws_url(keyed)) as ws:
        await send(ws, type="auth", token=KEY)
        assert (await speak_ws(ws))["type"] == "finished"
        await send(ws, type="auth", token="ignored-now")  # later auth frames change nothing
        assert (await speak_ws(ws))["type"] == "finished"


async def test_ws_wrong_auth_frame_closes_1008(keyed: App) -> None:
    async with open_ws(ws_url(keyed)) as ws:
        await send(ws, type="auth", token=OTHER_KEY)
        assert await closed(ws) == (1008, "authentication failed")


@pytest.mark.parametrize(
    "first",
    [
        {"type": "synthesize", "text": SHORT, "mode": "speak"},
        {"type": "auth"},
        {"type": "auth", "token": 5},
        {"type": "reset"},
    ],
)
async def test_ws_first_frame_other_than_auth_closes_1008(
    keyed: App, first: dict[str, Any]
) -> None:
    async with open_ws(ws_url(keyed)) as ws:
        await ws.send(json.dumps(first))
        assert await closed(ws) == (1008, "authentication required")
    assert keyed.runtime.active_streams == 0


async def test_ws_no_auth_frame_in_time_closes_1008(
    keyed: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ws_session, "AUTH_TIMEOUT_S", 0.3)
    async with open_ws(ws_url(keyed)) as ws:
        code, reason = await closed(ws)
    assert (code, reason) == (1008, "authentication required")


async def test_ws_token_in_the_url_is_not_accepted(keyed: App) -> None:
    async with open_ws(ws_url(keyed) + f"?token={KEY}&api_key={KEY}") as ws:
        await send(ws, type="synthesize", text=SHORT, mode="speak")
        assert (await closed(ws))[0] == 1008


async def test_ws_key_from_a_file_with_comments(
    app_factory: AppFactory, tmp_path: Path, no_key_in_logs: None
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# callers\n{KEY}\n\n  #{OTHER_KEY}\n")
    app = await app_factory(api_keys_file=path)
    async with open_ws(ws_url(app), additional_headers=bearer(KEY)) as ws:
        assert (await speak_ws(ws))["type"] == "finished"
    assert await refused_status(open_ws(ws_url(app), additional_headers=bearer(OTHER_KEY))) == 401


async def test_ws_key_with_a_hash_from_a_file_with_a_byte_order_mark(
    app_factory: AppFactory, tmp_path: Path
) -> None:
    hashed = "vx-key#with-a-hash-0123"
    path = tmp_path / "keys"
    path.write_bytes(f"\ufeff{KEY}\r\n{hashed}\r\n".encode())  # as Notepad saves it
    app = await app_factory(api_keys_file=path)
    for key in (KEY, hashed):
        async with open_ws(ws_url(app), additional_headers=bearer(key)) as ws:
            assert (await speak_ws(ws))["type"] == "finished"
    # The part before the "#" is no key of its own.
    cut = open_ws(ws_url(app), additional_headers=bearer(hashed.partition("#")[0]))
    assert await refused_status(cut) == 401


# Reloading keys


async def test_a_reload_refuses_a_removed_key_at_its_connections_next_request(
    app_factory: AppFactory, tmp_path: Path, no_key_in_logs: None
) -> None:
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    app = await app_factory(api_keys_file=path)
    async with (
        open_ws(ws_url(app), additional_headers=bearer(KEY)) as before,
        open_ws(ws_url(app)) as by_frame,
    ):
        await send(by_frame, type="auth", token=KEY)
        assert (await speak_ws(before))["type"] == "finished"
        path.write_text(OTHER_KEY + "\n")
        assert app.keys.reload()
        # Connections let in with the removed key are refused at their next request.
        for ws in (before, by_frame):
            refused = await speak_ws(ws)
            assert (refused["type"], refused["code"]) == ("error", "unauthorized")
            assert await closed(ws) == (1008, "API key revoked")
        old = open_ws(ws_url(app), additional_headers=bearer(KEY))
        assert await refused_status(old) == 401
        async with open_ws(ws_url(app), additional_headers=bearer(OTHER_KEY)) as after:
            assert (await speak_ws(after))["type"] == "finished"
        with pytest.raises(grpc.aio.AioRpcError):
            await speak_grpc(app, KEY)
        assert (await speak_grpc(app, OTHER_KEY))[-1].HasField("finished")


async def test_sighup_reloads_the_keys_in_app_run(tmp_path: Path, no_key_in_logs: None) -> None:
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    app = App(make_settings(api_keys_file=path))
    ready = asyncio.Event()
    before_run = signal.getsignal(signal.SIGHUP)
    running = asyncio.create_task(app.run(on_ready=lambda _: ready.set()))
    try:
        await asyncio.wait_for(ready.wait(), WAIT)
        async with open_ws(ws_url(app), additional_headers=bearer(KEY)) as kept:
            path.write_text(f"{OTHER_KEY}\n")
            os.kill(os.getpid(), signal.SIGHUP)
            # A signal has no event to await: its effect is polled.
            await eventually(lambda: app.keys.verify(OTHER_KEY) is not None, WAIT)
            assert app.keys.verify(KEY) is None
            assert (await speak_ws(kept))["code"] == "unauthorized"
            assert await refused_status(open_ws(ws_url(app), additional_headers=bearer(KEY))) == 401
            assert (await speak_grpc(app, OTHER_KEY))[-1].HasField("finished")
    finally:
        app.request_stop()
        await asyncio.wait_for(running, WAIT)
    assert signal.getsignal(signal.SIGHUP) == before_run


async def test_sighup_in_a_served_process_and_keys_never_logged(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# keys\n{KEY}\n")
    async with serve_process(
        VOXRELAY_API_KEYS_FILE=str(path), VOXRELAY_LOG_LEVEL="debug", VOXRELAY_LLM="echo",
        VOXRELAY_TTS="espeak",
    ) as server:  # fmt: skip
        assert server.startup["auth"] == "api_keys"
        url = server.ws_url
        async with open_ws(url, additional_headers=bearer(KEY)) as kept:
            path.write_text(f"{KEY}\n{OTHER_KEY}\n")
            server.signal(signal.SIGHUP)
            # The log is the only sign of the reload.
            await server.wait_for_line(
                lambda line: line.get("event") == "keys" and line.get("count") == 2, WAIT
            )
            assert (await speak_ws(kept))["type"] == "finished"
            async with open_ws(url, additional_headers=bearer(OTHER_KEY)) as ws:
                assert (await speak_ws(ws))["type"] == "finished"
            wrong = open_ws(url, additional_headers=bearer("wrong-" + KEY))
            assert await refused_status(wrong) == 401
    logged = json.dumps(server.lines)
    assert KEY not in logged and OTHER_KEY not in logged


async def test_keys_added_by_sighup_are_redacted_from_the_log(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    async with serve_process(
        VOXRELAY_API_KEYS_FILE=str(path), VOXRELAY_LLM="echo", VOXRELAY_TTS="espeak"
    ) as server:
        path.write_text(f"{KEY}\n{OTHER_KEY}\n")
        server.signal(signal.SIGHUP)
        # The log is the only sign of the reload.
        await server.wait_for_line(
            lambda line: line.get("event") == "keys" and line.get("count") == 2, WAIT
        )
        # A careless client names its request after its key: the log line must not show it.
        async with open_ws(server.ws_url, additional_headers=bearer(OTHER_KEY)) as ws:
            await send(ws, type="synthesize", id=f"req-{OTHER_KEY}", text=SHORT, mode="speak")
            end = (await until_end(ws))[-1]
            warned = [line for line in server.lines if line.get("level") != "info"]
            assert end["type"] == "finished", (end, warned)  # type: ignore[index]
        await server.wait_for_event("stream_end")
    ended = [line for line in server.lines if line.get("event") == "stream_end"]
    assert ended and ended[-1]["request_id"] == "req-[redacted]"
    assert OTHER_KEY not in json.dumps(server.lines)


# Caller identity


async def test_ws_callers_are_known_by_key_id(keyed: App) -> None:
    seen: list[str | None] = []
    stream = keyed.synthesizer.stream

    def spy(request: Any, **options: Any) -> Any:
        seen.append(options.get("caller"))
        return stream(request, **options)

    keyed.synthesizer.stream = spy  # type: ignore[method-assign]
    async with open_ws(ws_url(keyed), additional_headers=bearer(KEY)) as ws:
        await speak_ws(ws)
    async with open_ws(ws_url(keyed)) as ws:
        await send(ws, type="auth", token=KEY)
        await speak_ws(ws)
    await speak_grpc(keyed, KEY)
    assert seen == [key_id(KEY)] * 3


# Origins


async def test_origin_default_is_own_origin_and_no_origin(app_factory: AppFactory) -> None:
    app = await app_factory()
    own = f"http://127.0.0.1:{app.ws_port}"
    async with open_ws(ws_url(app), origin=own) as ws:
        assert (await speak_ws(ws))["type"] == "finished"
        for origin in ("https://evil.example", "null", f"https://127.0.0.1:{app.ws_port}"):
            refused = open_ws(ws_url(app), origin=origin)
            assert await refused_status(refused) == 403
        # A client that sends no Origin (not a browser) is let in.
        async with open_ws(ws_url(app)) as plain:
            assert (await speak_ws(plain))["type"] == "finished"
        # ... and the one let in first goes on being served.
        assert (await speak_ws(ws))["type"] == "finished"


def ws_via(app: App, host: str, **options: Any) -> Any:
    """Open the WebSocket at 127.0.0.1 with *host* in the URL: the Host header a browser sends."""
    return open_ws(f"ws://{host}:{app.ws_port}/v1/stream", host="127.0.0.1", **options)


async def test_a_rebound_host_name_is_not_the_own_origin(app_factory: AppFactory) -> None:
    app = await app_factory()
    # A page on rebind.example whose DNS now points at 127.0.0.1: its Origin matches its Host.
    page = f"http://rebind.example:{app.ws_port}"
    assert await refused_status(ws_via(app, "rebind.example", origin=page)) == 403
    # localhost and the address itself still serve the demo page.
    async with ws_via(app, "localhost", origin=f"http://localhost:{app.ws_port}") as ws:
        assert (await speak_ws(ws))["type"] == "finished"
    # A client that sends no Origin is no browser: any Host does.
    async with ws_via(app, "rebind.example") as ws:
        assert (await speak_ws(ws))["type"] == "finished"


async def test_public_hosts_are_the_own_origin(app_factory: AppFactory) -> None:
    app = await app_factory(public_hosts="voice.example.com")
    page = f"http://voice.example.com:{app.ws_port}"
    async with ws_via(app, "Voice.Example.com", origin=page) as ws:
        assert (await speak_ws(ws))["type"] == "finished"
    other = f"http://rebind.example:{app.ws_port}"
    assert await refused_status(ws_via(app, "rebind.example", origin=other)) == 403
    own = f"http://127.0.0.1:{app.ws_port}"
    async with open_ws(ws_url(app), origin=own) as ws:
        assert (await speak_ws(ws))["type"] == "finished"


async def test_origin_list_when_configured(app_factory: AppFactory) -> None:
    app = await app_factory(allowed_origins="https://app.example.com, http://localhost:3000")
    for origin in ("https://app.example.com", "http://localhost:3000"):
        async with open_ws(ws_url(app), origin=origin) as ws:
            assert (await speak_ws(ws))["type"] == "finished"
    for origin in ("https://evil.example", f"http://127.0.0.1:{app.ws_port}"):
        assert await refused_status(open_ws(ws_url(app), origin=origin)) == 403


async def test_origin_is_checked_before_the_key(
    app_factory: AppFactory, no_key_in_logs: None
) -> None:
    app = await app_factory(api_keys=KEY)
    refused = open_ws(ws_url(app), origin="https://evil.example", additional_headers=bearer(KEY))
    assert await refused_status(refused) == 403
    own = f"http://127.0.0.1:{app.ws_port}"
    async with open_ws(ws_url(app), origin=own) as ws:  # a browser: key in the first frame
        await send(ws, type="auth", token=KEY)
        assert (await speak_ws(ws))["type"] == "finished"


async def test_origin_behind_a_tls_terminating_proxy(app_factory: AppFactory) -> None:
    app = await app_factory(trusted_proxies="127.0.0.1")
    https_page = f"https://127.0.0.1:{app.ws_port}"
    proto = {"X-Forwarded-Proto": "https"}
    async with open_ws(ws_url(app), origin=https_page, additional_headers=proto) as ws:
        assert (await speak_ws(ws))["type"] == "finished"
    # The header counts only from a trusted proxy.
    spoofed = open_ws(
        ws_url(app), origin=https_page, additional_headers=proto, local_addr=("127.0.0.2", 0)
    )
    assert await refused_status(spoofed) == 403
