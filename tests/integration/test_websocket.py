"""The WebSocket door end to end: a real server on a free port, real clients, real sockets.

Most tests run the core and the door alone (``door_factory``) so they can give the core
a chat provider of :mod:`fakes.providers` that is observable (it records what it was
asked) or controllable (it holds its reply until the test lets it go); espeak speaks for
real. A few run the whole app. Nothing here waits on the wall clock: tests await frames,
closes and conditions, with timeouts only as safety nets.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fakes.providers import EndlessChat, GatedChat, SpyChat
from tests.conftest import AppFactory
from tests.servers import make_settings
from tests.waiting import eventually
from voxrelay.client import AudioChunk, Client, StreamFinished
from voxrelay.gateways.app import App
from voxrelay.gateways.ws_server import WsDoor
from voxrelay.service import __version__, metrics
from voxrelay.service.auth import KeyStore
from voxrelay.service.errors import InvalidRequest, Unavailable
from voxrelay.service.providers.base import ChatProvider
from voxrelay.service.providers.registry import make_chat, make_speech
from voxrelay.service.relay import Relay
from voxrelay.service.synthesizer import Synthesizer

TEXT = "Hello world. This is voxrelay, speaking one sentence at a time. Goodbye for now."
SHORT = "Just one short sentence."
WAIT = 30.0  # safety net for every await on the network
Frame = dict[str, Any] | bytes


# Servers and clients


@dataclass
class Served:
    door: WsDoor
    synthesizer: Synthesizer

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.door.port}/v1/stream"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.door.port}{path}"


DoorFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def door_factory() -> AsyncIterator[DoorFactory]:
    """Start the core and the WebSocket door with *chat* and setting overrides."""
    served: list[Served] = []

    async def start(chat: ChatProvider | None = None, **overrides: Any) -> Served:
        settings = make_settings(**overrides)
        synthesizer = Synthesizer(settings, chat or make_chat(settings), make_speech(settings))
        door = WsDoor(settings, Relay(synthesizer), KeyStore(settings), synthesizer.runtime)
        await door.start()
        served.append(Served(door, synthesizer))
        return served[-1]

    yield start
    for s in served:
        await s.synthesizer.runtime.begin_drain()
        s.synthesizer.runtime.abort_all(Unavailable("test over"))
        await s.door.close_all()
        await s.door.stop()
        await s.synthesizer.aclose()


def open_ws(url: str, **options: Any) -> connect:
    return connect(url, compression=None, max_size=None, proxy=None, open_timeout=WAIT, **options)


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def receive(ws: ClientConnection) -> Frame:
    message = await asyncio.wait_for(ws.recv(), WAIT)
    return message if isinstance(message, bytes) else json.loads(message)


async def until_end(ws: ClientConnection) -> list[Frame]:
    """Receive frames up to and including the next finished, error or cancelled."""
    frames: list[Frame] = []
    while True:
        frame = await receive(ws)
        frames.append(frame)
        if isinstance(frame, dict) and frame["type"] in ("finished", "error", "cancelled"):
            return frames


async def until_type(ws: ClientConnection, kind: str) -> list[Frame]:
    frames: list[Frame] = []
    while not (frames and isinstance(frames[-1], dict) and frames[-1]["type"] == kind):
        frames.append(await receive(ws))
    return frames


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    await asyncio.wait_for(ws.wait_closed(), WAIT)
    return ws.close_code, ws.close_reason


def events(frames: list[Frame], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if isinstance(f, dict) and f["type"] == kind]


def audio_of(frames: list[Frame]) -> bytes:
    return b"".join(f for f in frames if isinstance(f, bytes))


def decode_seconds(data: bytes, fmt: str, **options: str) -> float:
    with av.open(io.BytesIO(data), mode="r", format=fmt, options=options) as container:
        samples = rate = 0
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate


async def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    def get() -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(url, timeout=WAIT) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(get)


# A stream end to end


@pytest.mark.parametrize(
    ("fmt", "demux", "options"),
    [
        ("mp3", "mp3", {}),
        ("wav", "wav", {}),
        ("pcm", "s16le", {"sample_rate": "22050", "ch_layout": "mono"}),
    ],
)
async def test_stream_order_figures_and_audio(
    door_factory: DoorFactory, fmt: str, demux: str, options: dict[str, str]
) -> None:
    served = await door_factory()
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", id="r1", text=TEXT, mode="speak", format=fmt)
        frames = await until_end(ws)

    started, finished = frames[0], frames[-1]
    assert isinstance(started, dict) and started["type"] == "started"
    assert isinstance(finished, dict) and finished["type"] == "finished"
    assert started["id"] == finished["id"] == "r1"
    assert started["format"] == fmt and started["channels"] == 1
    assert started["voice"] == "en-us" and started["tts_model"]
    assert isinstance(frames[1], dict) and frames[1]["type"] == "segment", (
        "no audio byte may precede segment(0)"
    )
    segments = events(frames, "segment")
    assert [s["index"] for s in segments] == list(range(len(segments)))
    assert all(s["id"] == "r1" for s in segments)
    starts = [s["start_ms"] for s in segments]
    assert starts[0] == 0 and starts == sorted(starts)

    data = audio_of(frames)
    assert finished["segments"] == len(segments) >= 2
    assert finished["audio_bytes"] == len(data)
    assert finished["reply_text"] == TEXT
    assert "extra" not in finished
    assert set(finished) >= {
        "audio_ms",
        "time_to_first_audio_ms",
        "total_ms",
        "llm_first_token_ms",
        "tts_first_byte_ms",
        "prompt_tokens",
        "completion_tokens",
    }
    if fmt == "pcm":
        assert started["sample_rate_hz"] == 22050
    seconds = decode_seconds(data, demux, **options)
    assert seconds == pytest.approx(finished["audio_ms"] / 1000, abs=0.15, rel=0.05)


async def test_chat_mode_assigns_an_id_when_none_is_sent(door_factory: DoorFactory) -> None:
    served = await door_factory()
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", text=SHORT)
        frames = await until_end(ws)
    started, finished = frames[0], frames[-1]
    assert isinstance(started, dict) and isinstance(finished, dict)
    assert started["id"] and started["id"] == finished["id"]
    assert started["llm_model"] == "echo"
    assert finished["reply_text"] == SHORT
    assert finished["audio_bytes"] == len(audio_of(frames)) > 0


async def test_stream_false_sends_one_binary_frame_just_before_finished(
    door_factory: DoorFactory,
) -> None:
    served = await door_factory()
    async with open_ws(served.url) as ws:
        await send(
            ws, type="synthesize", id="s1", text=TEXT, mode="speak", format="mp3", stream=False
        )
        frames = await until_end(ws)
    binary = [i for i, f in enumerate(frames) if isinstance(f, bytes)]
    assert binary == [len(frames) - 2]
    finished = frames[-1]
    assert isinstance(finished, dict) and finished["type"] == "finished"
    data = frames[-2]
    assert isinstance(data, bytes) and finished["audio_bytes"] == len(data)
    assert len(events(frames, "segment")) == finished["segments"] >= 2
    assert decode_seconds(data, "mp3") == pytest.approx(
        finished["audio_ms"] / 1000, abs=0.15, rel=0.05
    )


# Cancel, busy, memory


async def test_cancel_mid_stream_stops_it_and_its_upstream(door_factory: DoorFactory) -> None:
    chat = GatedChat()
    served = await door_factory(chat)
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", id="c1", text="talk", format="pcm")
        before = await until_type(ws, "segment")
        before.append(await receive(ws))  # the first sentence's audio
        assert isinstance(before[-1], bytes)
        await send(ws, type="cancel", id="c1")
        rest = await until_end(ws)
        cancelled = rest[-1]
        assert isinstance(cancelled, dict) and cancelled["type"] == "cancelled"
        assert cancelled["id"] == "c1"
        sent = len(audio_of(before + rest))
        assert cancelled["audio_ms"] == pytest.approx(sent / 2 / 22050 * 1000, abs=2)
        await asyncio.wait_for(chat.closed.wait(), WAIT)
        assert served.synthesizer.runtime.active_streams == 0

        # Not one frame of c1 after "cancelled": the next frame is c2's start.
        await send(ws, type="synthesize", id="c2", text=SHORT, mode="speak")
        after = await until_end(ws)
    first = after[0]
    assert isinstance(first, dict) and first["type"] == "started" and first["id"] == "c2"
    assert all(f["id"] == "c2" for f in after if isinstance(f, dict))
    assert isinstance(after[-1], dict) and after[-1]["type"] == "finished"


async def test_cancel_of_a_stream_not_in_flight_is_ignored(door_factory: DoorFactory) -> None:
    chat = GatedChat()
    served = await door_factory(chat)
    async with open_ws(served.url) as ws:
        await send(ws, type="cancel", id="nope")
        await send(ws, type="cancel")
        await send(ws, type="synthesize", id="k1", text="talk")
        first = await receive(ws)
        assert isinstance(first, dict) and first["type"] == "started" and first["id"] == "k1"
        await send(ws, type="cancel", id="someone-else")
        chat.gate.set()
        frames = await until_end(ws)
        assert isinstance(frames[-1], dict) and frames[-1]["type"] == "finished"
        # A late cancel of the finished stream is ignored too.
        await send(ws, type="cancel", id="k1")
        await send(ws, type="synthesize", id="k2", text=SHORT, mode="speak")
        nxt = await receive(ws)
        assert isinstance(nxt, dict) and nxt["type"] == "started" and nxt["id"] == "k2"
        await until_end(ws)


async def test_second_request_while_busy_is_refused_and_first_goes_on(
    door_factory: DoorFactory,
) -> None:
    chat = GatedChat()
    served = await door_factory(chat)
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", id="a", text="talk")
        await until_type(ws, "started")
        await send(ws, type="synthesize", id="b", text="me too")
        frames = await until_type(ws, "error")
        error = frames[-1]
        assert isinstance(error, dict)
        assert (error["id"], error["code"], error["retryable"]) == ("b", "busy", True)
        chat.gate.set()
        frames += await until_end(ws)
    finished = frames[-1]
    assert isinstance(finished, dict) and finished["type"] == "finished" and finished["id"] == "a"
    assert finished["reply_text"] == "The first sentence is out. And the second one follows."


async def test_chat_memory_is_bounded_and_reset_forgets_it(door_factory: DoorFactory) -> None:
    chat = SpyChat()
    served = await door_factory(chat, memory_turns=2)

    def history() -> list[tuple[str, str]]:
        return [(m.role, m.content.strip()) for m in chat.calls[-1] if m.role != "system"]

    async with open_ws(served.url) as ws:

        async def turn(text: str, mode: str = "chat") -> None:
            await send(ws, type="synthesize", text=text, mode=mode)
            frames = await until_end(ws)
            assert isinstance(frames[-1], dict) and frames[-1]["type"] == "finished"

        await turn("one")
        assert history() == [("user", "one")]
        await turn("two")
        assert history() == [("user", "one"), ("assistant", "You said: one"), ("user", "two")]
        await turn("Spoken, not remembered.", mode="speak")
        assert len(chat.calls) == 2
        await turn("three")
        assert history() == [
            ("user", "one"),
            ("assistant", "You said: one"),
            ("user", "two"),
            ("assistant", "You said: two"),
            ("user", "three"),
        ]
        await turn("four")  # only the last two turns are kept
        assert history()[:2] == [("user", "two"), ("assistant", "You said: two")]
        assert len(history()) == 5
        await send(ws, type="reset")
        await turn("five")
        assert history() == [("user", "five")]

    async with open_ws(served.url) as other:  # memory belongs to a connection
        await send(other, type="synthesize", text="six")
        await until_end(other)
        assert history() == [("user", "six")]


async def test_memory_is_trimmed_to_what_the_core_accepts(door_factory: DoorFactory) -> None:
    chat = SpyChat()
    # Each turn costs ~110 characters; the core takes 8 x 60 = 480 of history.
    served = await door_factory(chat, memory_turns=8, max_input_chars=60)
    async with open_ws(served.url) as ws:
        for n in range(7):
            await send(ws, type="synthesize", text=f"Turn {n}: " + "words " * 7)
            frames = await until_end(ws)
            assert isinstance(frames[-1], dict) and frames[-1]["type"] == "finished"
    history = [m for m in chat.calls[-1] if m.role != "system"][:-1]
    assert len(history) == 8
    assert history[0].content.startswith("Turn 2:")
    assert sum(len(m.content) for m in history) <= 8 * 60


# Bad input


@pytest.mark.parametrize(
    ("message", "request_id"),
    [
        (b"\x00\x01binary", None),
        ("not json", None),
        ("[1, 2]", None),
        ('"a string"', None),
        ("[" * 5000 + "]" * 5000, None),
        ('{"type": "sing"}', None),
        ('{"id": "x0"}', "x0"),
        ('{"type": "synthesize", "id": 7, "text": "hi"}', None),
        ('{"type": "synthesize", "id": "x1"}', "x1"),
        ('{"type": "synthesize", "id": "x2", "text": 5}', "x2"),
        ('{"type": "synthesize", "id": "x3", "text": "hi", "mode": "sing"}', "x3"),
        ('{"type": "synthesize", "id": "x4", "text": "hi", "format": "ogg"}', "x4"),
        ('{"type": "synthesize", "id": "x5", "text": "hi", "speed": "fast"}', "x5"),
        ('{"type": "synthesize", "id": "x6", "text": "hi", "stream": "yes"}', "x6"),
        ('{"type": "synthesize", "id": "x7", "text": "hi", "sample_rate_hz": -1}', "x7"),
        ('{"type": "synthesize", "id": "x8", "text": "hi", "sample_rate_hz": true}', "x8"),
        ('{"type": "synthesize", "id": "x9", "text": "hi", "voice": "nobody"}', "x9"),
        ('{"type": "synthesize", "id": "x10", "text": "   "}', "x10"),
        ('{"type": "auth"}', None),
    ],
)
async def test_malformed_frame_gets_an_error_and_the_connection_stays_usable(
    door_factory: DoorFactory, message: str | bytes, request_id: str | None
) -> None:
    served = await door_factory()
    async with open_ws(served.url) as ws:
        await ws.send(message)
        error = await receive(ws)
        assert isinstance(error, dict) and error["type"] == "error"
        assert error["code"] == "invalid_request" and error["retryable"] is False
        assert error["id"] == request_id and error["message"]
        await send(ws, type="synthesize", id="ok", text=SHORT, mode="speak")
        frames = await until_end(ws)
    assert isinstance(frames[-1], dict) and frames[-1]["type"] == "finished"


async def test_text_over_the_limit_is_too_large(door_factory: DoorFactory) -> None:
    served = await door_factory(max_input_chars=50)
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", id="big", text="a" * 51)
        error = await receive(ws)
        await send(ws, type="synthesize", id="fits", text="a" * 50, mode="speak")
        frames = await until_end(ws)
    assert isinstance(error, dict)
    assert (error["type"], error["id"], error["code"]) == ("error", "big", "too_large")
    assert isinstance(frames[-1], dict) and frames[-1]["type"] == "finished"


async def test_control_characters_are_refused(door_factory: DoorFactory) -> None:
    served = await door_factory()
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", id="bell", text="ring \x07 the bell")
        error = await receive(ws)
    assert isinstance(error, dict)
    assert (error["id"], error["code"]) == ("bell", "invalid_request")
    assert "U+0007" in error["message"]


# Socket limits


async def test_frame_over_the_size_limit_closes_1009(door_factory: DoorFactory) -> None:
    served = await door_factory(ws_max_message_bytes=1024)
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", text="a" * 2000)
        code, _ = await closed(ws)
    assert code == 1009


async def test_idle_connection_is_closed_1000(door_factory: DoorFactory) -> None:
    served = await door_factory(idle_timeout_s=0.5)
    async with open_ws(served.url) as ws:
        assert await closed(ws) == (1000, "idle")


async def test_a_stream_in_flight_is_not_idle(door_factory: DoorFactory) -> None:
    chat = GatedChat()
    served = await door_factory(chat, idle_timeout_s=0.3)
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", id="long", text="talk")
        await until_type(ws, "segment")
        # Hold the stream well past the idle timeout (asserting an absence takes time).
        await asyncio.sleep(1.0)
        chat.gate.set()
        frames = await until_end(ws)
        assert isinstance(frames[-1], dict) and frames[-1]["type"] == "finished"
        # Once it is over, the idle clock runs again.
        assert await closed(ws) == (1000, "idle")


async def _raw_client(port: int, frame: dict[str, Any]) -> socket.socket:
    """Open a WebSocket by hand with a tiny receive window, send *frame*, never read again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        (
            f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), WAIT)
        assert chunk, "server closed during the handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101")
    payload = json.dumps(frame).encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await loop.sock_sendall(sock, bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock


async def test_a_client_that_stops_reading_is_dropped_and_its_upstream_cancelled(
    door_factory: DoorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    chat = EndlessChat()
    served = await door_factory(chat, send_stall_s=0.5)
    connections = metrics.WS_CONNECTIONS._value.get()
    sock = await _raw_client(
        served.door.port,
        {
            "type": "synthesize",
            "id": "stall",
            "text": "talk",
            "format": "pcm",
            "sample_rate_hz": 48000,
        },
    )
    try:
        await asyncio.wait_for(chat.started.wait(), WAIT)
        await asyncio.wait_for(chat.closed.wait(), WAIT)
        await asyncio.wait_for(served.synthesizer.runtime.wait_idle(), WAIT)
        await eventually(lambda: metrics.WS_CONNECTIONS._value.get() == connections)
        assert any(getattr(r, "event", None) == "ws_send_stall" for r in caplog.records)
    finally:
        sock.close()


# Drain


async def test_drain_lets_the_stream_finish_then_closes_1001(door_factory: DoorFactory) -> None:
    chat = GatedChat()
    served = await door_factory(chat)
    synthesizer, door = served.synthesizer, served.door
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", id="d1", text="talk")
        await until_type(ws, "segment")

        await synthesizer.runtime.begin_drain()
        status, _, body = await http_get(served.http("/readyz"))
        assert (status, body) == (503, b"draining\n")
        assert (await http_get(served.http("/healthz")))[0] == 200
        await send(ws, type="synthesize", id="d2", text="more")
        error = await until_type(ws, "error")
        assert isinstance(error[-1], dict)
        assert (error[-1]["id"], error[-1]["code"]) == ("d2", "unavailable")
        with pytest.raises(InvalidStatus) as refused:
            async with open_ws(served.url):
                pass
        assert refused.value.response.status_code == 503

        chat.gate.set()
        frames = await until_end(ws)
        assert isinstance(frames[-1], dict)
        assert (frames[-1]["type"], frames[-1]["id"]) == ("finished", "d1")
        await asyncio.wait_for(synthesizer.runtime.wait_idle(), WAIT)
        await door.close_all()
        assert await closed(ws) == (1001, "server shutting down")


async def test_drain_window_over_sends_unavailable_then_1001(door_factory: DoorFactory) -> None:
    chat = GatedChat()
    served = await door_factory(chat)
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", id="d1", text="talk")
        await until_type(ws, "segment")
        await served.synthesizer.runtime.begin_drain()
        served.synthesizer.runtime.abort_all(
            Unavailable("voxrelay is shutting down", retry_after_s=1)
        )
        await served.door.close_all()
        frames = await until_type(ws, "error")
        error = frames[-1]
        assert isinstance(error, dict)
        assert (error["id"], error["code"], error["retryable"]) == ("d1", "unavailable", True)
        assert error["retry_after_ms"] == 1000
        with pytest.raises(ConnectionClosed):
            await receive(ws)
        assert (ws.close_code, ws.close_reason) == (1001, "server shutting down")


# The whole app: HTTP on the same port, the client library, SIGTERM-style drain


async def test_http_endpoints_on_the_websocket_port(app_factory: AppFactory) -> None:
    app = await app_factory()
    base = f"http://127.0.0.1:{app.ws_port}"
    status, headers, body = await http_get(base + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert (await http_get(base + "/readyz"))[::2] == (200, b"ready\n")
    status, headers, body = await http_get(base + "/version")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"version": __version__}
    status, headers, body = await http_get(base + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and b"<html" in body.lower()
    status, headers, _ = await http_get(base + "/nope")
    assert status == 404 and headers["X-Content-Type-Options"] == "nosniff"


async def test_client_and_app_drain(app_factory: AppFactory) -> None:
    app: App = await app_factory()
    url = f"ws://127.0.0.1:{app.ws_port}/v1/stream"
    async with Client(url, timeout=WAIT) as client:
        events = [e async for e in client.synthesize(TEXT, mode="speak", format="wav")]
        audio = b"".join(e.data for e in events if isinstance(e, AudioChunk))
        assert isinstance(finished := events[-1], StreamFinished)
        assert finished.audio_bytes == len(audio) > 0
        with pytest.raises(InvalidRequest):
            async for _ in client.synthesize(" "):
                pass

    async with open_ws(url) as ws:
        await app.drain_and_stop()
        assert await closed(ws) == (1001, "server shutting down")


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI: `make test-deps` installs it")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_serves_wss(door_factory: DoorFactory, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    served = await door_factory(tls_cert=cert, tls_key=key)
    context = ssl.create_default_context(cafile=str(cert))
    url = f"wss://127.0.0.1:{served.door.port}/v1/stream"
    async with Client(url, tls=context, timeout=WAIT) as client:
        events = [e async for e in client.synthesize(SHORT, mode="speak")]
    audio = b"".join(e.data for e in events if isinstance(e, AudioChunk))
    assert isinstance(finished := events[-1], StreamFinished)
    assert finished.audio_bytes == len(audio) > 0


# API keys (the hook for issue 6)


async def test_api_keys_by_header_or_first_frame(door_factory: DoorFactory) -> None:
    served = await door_factory(api_keys=["k-123"])
    async with open_ws(served.url, additional_headers={"Authorization": "Bearer k-123"}) as ws:
        await send(ws, type="synthesize", text=SHORT, mode="speak")
        assert isinstance(frames := (await until_end(ws))[-1], dict)
        assert frames["type"] == "finished"
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(served.url, additional_headers={"Authorization": "Bearer wrong"}):
            pass
    assert refused.value.response.status_code == 401
    async with open_ws(served.url) as ws:
        await send(ws, type="auth", token="k-123")
        await send(ws, type="synthesize", text=SHORT, mode="speak")
        last = (await until_end(ws))[-1]
        assert isinstance(last, dict) and last["type"] == "finished"
    async with open_ws(served.url) as ws:
        await send(ws, type="synthesize", text=SHORT, mode="speak")
        assert (await closed(ws))[0] == 1008
