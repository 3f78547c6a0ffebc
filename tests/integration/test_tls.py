"""TLS on both doors (``VOXRELAY_TLS_CERT`` / ``VOXRELAY_TLS_KEY``) and ``say --tls/--ca``.

The certificate is made for the test with the openssl CLI (for 127.0.0.1); clients
trust it explicitly, as a user of a private CA would.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.exceptions import InvalidHandshake, InvalidStatus

from tests.conftest import AppFactory
from tests.integration.test_websocket import SHORT, WAIT, open_ws
from tests.servers import ROOT
from voxrelay.client import AudioChunk, Client, StreamFinished
from voxrelay.gateways.app import App
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

KEY = "tls-test-key"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI: `make test-deps` installs it")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_app(app_factory: AppFactory, certificate: tuple[Path, Path]) -> App:
    cert, key = certificate
    return await app_factory(tls_cert=cert, tls_key=key, api_keys=KEY)


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def test_grpcs(tls_app: App, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    target = f"127.0.0.1:{tls_app.grpc_port}"
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        request = pb.SynthesizeRequest(text=SHORT, mode=pb.MODE_SPEAK)
        auth = (("authorization", f"Bearer {KEY}"),)
        responses = [r async for r in stub.Synthesize(request, timeout=WAIT, metadata=auth)]
        assert responses[-1].finished.audio_bytes > 0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListVoices(pb.ListVoicesRequest(), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=WAIT
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # A plain-text client cannot talk to the TLS port.
    async with grpc.aio.insecure_channel(target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_wss_and_https(tls_app: App, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    port = tls_app.ws_port
    async with Client(
        f"wss://127.0.0.1:{port}", api_key=KEY, tls=trusting(cert), timeout=WAIT
    ) as client:
        events = [e async for e in client.synthesize(SHORT, mode="speak")]
    audio = b"".join(e.data for e in events if isinstance(e, AudioChunk))
    assert isinstance(finished := events[-1], StreamFinished)
    assert finished.audio_bytes == len(audio) > 0

    def get(path: str) -> int:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}{path}", timeout=WAIT, context=trusting(cert)
        ) as response:
            return int(response.status)

    assert await asyncio.to_thread(get, "/healthz") == 200
    # The server's own origin is now https://, and only that.
    wss = f"wss://127.0.0.1:{port}/v1/stream"
    async with open_ws(wss, ssl=trusting(cert), origin=f"https://127.0.0.1:{port}") as ws:
        await ws.send(f'{{"type":"auth","token":"{KEY}"}}')
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(wss, ssl=trusting(cert), origin=f"http://127.0.0.1:{port}"):
            pass
    assert refused.value.response.status_code == 403
    # Plain ws:// to the TLS port fails; so does a client that does not trust the cert.
    with pytest.raises((InvalidHandshake, OSError, EOFError)):
        async with open_ws(f"ws://127.0.0.1:{port}/v1/stream"):
            pass
    with pytest.raises(ssl.SSLCertVerificationError):
        async with open_ws(wss, ssl=ssl.create_default_context()):
            pass


async def say(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxrelay.gateways.cli", "say", *args,
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize("via", ["grpc", "ws"])
async def test_say_with_ca(
    tls_app: App, certificate: tuple[Path, Path], tmp_path: Path, via: str
) -> None:
    cert, _ = certificate
    port = tls_app.grpc_port if via == "grpc" else tls_app.ws_port
    out = tmp_path / "out.wav"
    common = ["--via", via, "--mode", "speak", "--format", "wav", "--server", f"127.0.0.1:{port}"]
    code, err = await say(SHORT, *common, "--ca", str(cert), "--api-key", KEY, "-o", str(out))
    assert code == 0, err
    assert out.read_bytes()[:4] == b"RIFF" and "time to first audio" in err
    # --tls alone trusts only the system's CAs: this certificate is refused, clearly.
    code, err = await say(SHORT, *common, "--tls", "--api-key", KEY, "-o", str(out))
    # (gRPC's C core may log its TLS failure first; our one line comes last.)
    assert code == 1 and err.strip().splitlines()[-1].startswith("voxrelay: "), err
    assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate verify failed" in err
    assert KEY not in err
    # And without a key the server refuses, over TLS too.
    code, err = await say(SHORT, *common, "--ca", str(cert), "-o", str(out))
    expected = "UNAUTHENTICATED" if via == "grpc" else "1008 (policy violation) authentication"
    assert code == 1 and expected in err, err
