"""deploy/nginx/voxrelay.conf for real: Debian's nginx in front of real voxrelay replicas.

One request through each door (gRPC, WebSocket, the OpenAI-compatible HTTP one), the
small HTTP endpoints, X-Forwarded-For, and new requests passed on from a replica that
refuses connections or is draining.
"""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import AppFactory
from tests.integration.test_limits import speak_ws
from tests.integration.test_websocket import WAIT, http_get, open_ws
from tests.nginx_server import needs_nginx, refused_address, running_nginx
from voxrelay.gateways.app import App
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

pytestmark = needs_nginx


def grpc_address(app: App) -> str:
    return f"127.0.0.1:{app.grpc_port}"


def ws_address(app: App) -> str:
    return f"127.0.0.1:{app.ws_port}"


def http_address(app: App) -> str:
    return f"127.0.0.1:{app.http_port}"


async def speak_grpc(target: str) -> list[pb.SynthesizeResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.SynthesizerStub(channel).Synthesize(
            pb.SynthesizeRequest(
                text="Through the proxy.", mode=pb.MODE_SPEAK, format=pb.AUDIO_FORMAT_PCM
            ),
            timeout=WAIT,
        )
        return [r async for r in call]


async def test_both_doors_and_the_http_endpoints_through_nginx(
    app_factory: AppFactory,
) -> None:
    one, two = await app_factory(), await app_factory()
    replicas = (one, two)
    async with running_nginx(
        grpc=[grpc_address(a) for a in replicas],
        ws=[ws_address(a) for a in replicas],
        http=[http_address(a) for a in replicas],
    ) as front:
        for _ in range(2):  # round robin: each replica once
            events = await speak_grpc(front.grpc_target)
            assert events[0].HasField("started") and events[-1].HasField("finished")
            assert sum(len(e.audio.data) for e in events if e.HasField("audio")) > 0
        async with grpc.aio.insecure_channel(front.grpc_target) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="voxrelay.v1.Synthesizer"), timeout=WAIT
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(2):
            async with open_ws(front.ws_url) as ws:
                finished = await speak_ws(ws)
            assert finished["type"] == "finished" and finished["audio_bytes"] > 0
        for path, body in (("/healthz", b""), ("/readyz", b""), ("/", b"<")):
            status, _, content = await http_get(front.http_url + path)
            assert status == 200 and content.startswith(body), (path, front.errors())
        # The OpenAI-compatible door, streamed through (chunked, unbuffered).
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                front.http_url + "/v1/audio/speech",
                json={"model": "tts-1", "input": "Through the proxy.", "response_format": "mp3"},
                timeout=aiohttp.ClientTimeout(total=WAIT),
            ) as response,
        ):
            audio = await response.read()
            assert response.status == 200, (audio[:200], front.errors())
            assert response.headers["Content-Type"] == "audio/mpeg" and len(audio) > 0
        status, _, models = await http_get(front.http_url + "/v1/models")
        assert status == 200 and b'"object"' in models


async def test_a_refused_replica_is_skipped_for_new_requests(app_factory: AppFactory) -> None:
    live = await app_factory()
    async with running_nginx(
        grpc=[refused_address(), grpc_address(live)], ws=[refused_address(), ws_address(live)]
    ) as front:
        for _ in range(3):
            assert (await speak_grpc(front.grpc_target))[-1].HasField("finished")
            async with open_ws(front.ws_url) as ws:
                assert (await speak_ws(ws))["type"] == "finished"


async def test_a_draining_replica_is_skipped_for_new_websocket_requests(
    app_factory: AppFactory,
) -> None:
    draining, live = await app_factory(), await app_factory()
    async with running_nginx(
        grpc=[grpc_address(draining), grpc_address(live)],
        ws=[ws_address(draining), ws_address(live)],
    ) as front:
        try:
            await draining.runtime.begin_drain()
            status, _, _ = await http_get(f"http://{ws_address(draining)}/readyz")
            assert status == 503
            for _ in range(4):  # round robin would send half of them to the draining one
                async with open_ws(front.ws_url) as ws:
                    assert (await speak_ws(ws))["type"] == "finished"
                status, _, _ = await http_get(front.http_url + "/readyz")
                assert status == 200
        finally:
            await draining.drain_and_stop()  # the factory leaves a draining app alone


@pytest.mark.parametrize("trusted", [True, False])
async def test_x_forwarded_for_reaches_voxrelay(app_factory: AppFactory, trusted: bool) -> None:
    # Open service: per-address limits on the WebSocket door, the address read from
    # X-Forwarded-For when the proxy (here, 127.0.0.1) is trusted.
    app = await app_factory(rate_limit_per_min=1, trusted_proxies="127.0.0.1" if trusted else "")
    async with running_nginx(grpc=[grpc_address(app)], ws=[ws_address(app)]) as front:

        async def speak_as(address: str) -> dict[str, object]:
            headers = {"X-Forwarded-For": address}
            async with open_ws(front.ws_url, additional_headers=headers) as ws:
                return await speak_ws(ws)

        assert (await speak_as("203.0.113.9"))["type"] == "finished"
        again = await speak_as("203.0.113.9")
        assert again["type"] == "error" and again["code"] == "rate_limited", again
        other = await speak_as("203.0.113.10")
        if trusted:
            assert other["type"] == "finished"  # another caller, by its forwarded address
        else:
            assert other["type"] == "error"  # everyone is nginx's own address
