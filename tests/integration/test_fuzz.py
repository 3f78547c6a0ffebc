"""Throw random frames at both doors: each gets a typed answer and the server lives on.

The server runs in its own thread and event loop for the whole module, so hypothesis
drives plain synchronous clients (websockets' sync client, grpcio's blocking stubs).
After every example a normal request must still be served; after all of them the
server is checked once more. Per-caller rate limits are off (``0``) here: hypothesis
sends hundreds of requests from one address.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from tests.servers import make_settings
from voxrelay.gateways.app import App
from voxrelay.service.model import AudioFormat
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

WAIT = 60.0
ERROR_CODES = {
    "invalid_request", "unauthorized", "forbidden", "rate_limited", "busy", "too_large",
    "upstream_error", "upstream_timeout", "unavailable", "internal",
}  # fmt: skip
#: What random input may earn on gRPC; INTERNAL or UNKNOWN would be a bug.
GRPC_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class ServerThread:
    """The whole app in a thread of its own, with its own event loop."""

    def __init__(self, **overrides: Any) -> None:
        self.overrides = overrides
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.app: App | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-server", daemon=True)
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.app = App(make_settings(**self.overrides))
        await self.app.start()
        self.ready.set()
        await self._stop.wait()
        await self.app.drain_and_stop()

    def __enter__(self) -> App:
        self.thread.start()
        assert self.ready.wait(WAIT), "the server did not start"
        assert self.app is not None
        return self.app

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[App]:
    with ServerThread(rate_limit_per_min=0, chars_per_min=0, max_input_chars=200) as app:
        yield app


# WebSocket


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                     max_size=3),
        max_leaves=8,
    )  # fmt: skip


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly valid values, sometimes anything at all."""
    return valid | json_values()


FRAME_TYPES = st.sampled_from(["synthesize", "cancel", "reset", "auth"]) | st.text(max_size=12)
REQUEST_FRAMES = st.fixed_dictionaries(
    {"type": FRAME_TYPES},
    optional={
        "id": field(st.text(max_size=140)),
        "text": field(st.text(max_size=80)),
        "mode": field(st.sampled_from(["chat", "speak", "SPEAK", "sing"])),
        "voice": field(st.sampled_from(["en-us", "en-gb", "fr", "nobody", ""])),
        "format": field(st.sampled_from([f.value for f in AudioFormat] + ["ogg", "MP3"])),
        "sample_rate_hz": field(st.integers(-10, 500_000)),
        "instructions": field(st.text(max_size=30)),
        "speed": field(st.floats(allow_nan=True, allow_infinity=True)),
        "stream": field(st.booleans()),
        "token": field(st.text(max_size=20)),
    },
)
#: Printable text of any script (letters, marks, digits, punctuation, symbols, spaces).
SPEAKABLE = st.text(
    alphabet=st.characters(categories=["L", "M", "N", "P", "S", "Zs"]), min_size=1, max_size=60
)
#: Requests that are probably valid, so that streams run (and get cancelled) too.
GOOD_FRAMES = st.fixed_dictionaries(
    {"type": st.just("synthesize"), "text": SPEAKABLE},
    optional={
        "id": st.text(max_size=20),
        "mode": st.sampled_from(["chat", "speak"]),
        "voice": st.sampled_from(["en-us", "en-gb", "de"]),
        "format": st.sampled_from([f.value for f in AudioFormat]),
        "sample_rate_hz": st.sampled_from([0, 8000, 16000, 24000, 48000]),
        "speed": st.floats(0.25, 4.0),
        "stream": st.booleans(),
        "instructions": SPEAKABLE,
    },
)
CONTROL_FRAMES = st.sampled_from([{"type": "cancel"}, {"type": "reset"}]) | st.fixed_dictionaries(
    {"type": st.sampled_from(["cancel", "reset"])}, optional={"id": st.text(max_size=20)}
)
FRAMES = st.one_of(
    GOOD_FRAMES.map(json.dumps),
    CONTROL_FRAMES.map(json.dumps),
    REQUEST_FRAMES.map(json.dumps),
    json_values().map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=300),
)


def check_frame(message: str | bytes) -> dict[str, Any] | None:
    """Check one server frame against SPEC; return it if it is JSON."""
    if isinstance(message, bytes):
        return None
    frame = json.loads(message)
    assert isinstance(frame, dict)
    assert frame["type"] in ("started", "segment", "finished", "cancelled", "error"), frame
    if frame["type"] == "error":
        assert frame["code"] in ERROR_CODES, frame
        assert frame["code"] != "internal", frame
        assert isinstance(frame["message"], str) and frame["message"]
        assert isinstance(frame["retryable"], bool)
        assert frame["retry_after_ms"] is None or isinstance(frame["retry_after_ms"], int)
        assert frame["id"] is None or isinstance(frame["id"], str)
    return frame


def probe(ws: ClientConnection) -> None:
    """Run a normal request on *ws* until it finishes; frames of a fuzz stream may come first."""
    probe_id = "probe-" + uuid.uuid4().hex
    request = {"type": "synthesize", "id": probe_id, "text": "Still here.", "mode": "speak",
               "format": "pcm"}  # fmt: skip
    ws.send(json.dumps(request))
    while True:
        frame = check_frame(ws.recv(timeout=WAIT))
        if frame is None or frame["type"] in ("started", "segment"):
            continue
        if frame["id"] != probe_id:
            # The end of the fuzz frame's own stream, or its refusal.
            event(f"fuzz frame: {frame['type']} {frame.get('code', '')}".strip())
            continue
        if frame["type"] == "error" and frame["code"] == "busy":
            # The fuzz frame started a stream: let it end, then ask again.
            while (end := check_frame(ws.recv(timeout=WAIT))) is None or end["type"] not in (
                "finished",
                "error",
                "cancelled",
            ):
                pass
            event(f"fuzz stream: {end['type']} {end.get('code', '')}".strip())
            ws.send(json.dumps(request))
            continue
        assert frame["type"] == "finished", frame
        return


def ws_connect(app: App) -> ClientConnection:
    return connect(
        f"ws://127.0.0.1:{app.ws_port}/v1/stream",
        compression=None,
        max_size=None,
        open_timeout=WAIT,
        proxy=None,
    )


@FUZZ
@given(frames=st.lists(FRAMES, min_size=1, max_size=4))
def test_random_websocket_frames(server: App, frames: list[str | bytes]) -> None:
    with ws_connect(server) as ws:
        # All at once: a cancel or a second request may meet a stream in flight.
        for frame in frames:
            ws.send(frame)
        probe(ws)
        probe(ws)


@settings(max_examples=40, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=400))
def test_random_bytes_on_the_socket(server: App, garbage: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.ws_port), timeout=WAIT) as sock:
        sock.sendall(garbage)
    with ws_connect(server) as ws:
        probe(ws)


# gRPC


TEXTS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60
)  # protobuf strings are UTF-8: no lone surrogates
GOOD_REQUESTS = st.builds(
    pb.SynthesizeRequest,
    text=SPEAKABLE,
    mode=st.sampled_from([pb.MODE_UNSPECIFIED, pb.MODE_CHAT, pb.MODE_SPEAK]),
    voice=st.sampled_from(["", "en-us", "en-gb"]),
    format=st.integers(0, 8),
    speed=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    history=st.lists(
        st.builds(pb.ChatMessage, role=st.sampled_from(["user", "assistant"]), content=SPEAKABLE),
        max_size=2,
    ),
)
REQUESTS = st.builds(
    pb.SynthesizeRequest,
    text=TEXTS,
    mode=st.sampled_from([pb.MODE_UNSPECIFIED, pb.MODE_CHAT, pb.MODE_SPEAK]) | st.integers(-3, 50),
    voice=st.sampled_from(["", "en-us", "nobody"]) | TEXTS,
    format=st.integers(-2, 12),
    sample_rate_hz=st.sampled_from([0, 8000, 16000, 48000]) | st.integers(0, 2**32 - 1),
    instructions=TEXTS,
    history=st.lists(
        st.builds(
            pb.ChatMessage,
            role=st.sampled_from(["user", "assistant", "system", "wizard"]),
            content=TEXTS,
        ),
        max_size=3,
    ),
    speed=st.floats(width=32) | st.sampled_from([0.0, 1.0, 4.0]),
    request_id=TEXTS,
)


@pytest.fixture(scope="module")
def stub(server: App) -> Iterator[pb_grpc.SynthesizerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb_grpc.SynthesizerStub(channel)


def speak(stub: pb_grpc.SynthesizerStub, request: pb.SynthesizeRequest) -> pb.StreamFinished:
    responses = list(stub.Synthesize(request, timeout=WAIT))
    assert responses[0].HasField("started") and responses[-1].HasField("finished")
    return responses[-1].finished


@FUZZ
@given(request=GOOD_REQUESTS | REQUESTS)
def test_random_grpc_requests(stub: pb_grpc.SynthesizerStub, request: pb.SynthesizeRequest) -> None:
    try:
        finished = speak(stub, request)
    except grpc.RpcError as exc:
        event(f"grpc: {exc.code().name}")  # type: ignore[attr-defined]
        assert exc.code() in GRPC_REFUSALS, (exc.code(), exc.details())  # type: ignore[attr-defined]
        assert exc.details()  # type: ignore[attr-defined]
    else:
        event("grpc: OK")
        assert finished.total_ms >= 0
        assert not math.isnan(request.speed)
    normal = pb.SynthesizeRequest(text="Still here.", mode=pb.MODE_SPEAK)
    assert speak(stub, normal).segments == 1


def test_after_the_fuzz_a_normal_request_works(server: App, stub: pb_grpc.SynthesizerStub) -> None:
    assert speak(stub, pb.SynthesizeRequest(text="All is well.", mode=pb.MODE_SPEAK)).segments
    with ws_connect(server) as ws:
        probe(ws)
    assert server.runtime.active_streams == 0
