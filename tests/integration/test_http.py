"""The OpenAI-compatible speech door end to end, with OpenAI's own SDK as the client.

The whole app runs on free ports; the official ``openai`` SDK (sync and async, plain and
streaming), curl and raw sockets talk to it over real sockets. Upstream faults come from
:class:`FakeOpenAI` standing in for the speech upstream, whose records say when voxrelay
closed its request. Nothing waits on the wall clock except the 100 ms a disconnect has,
by SPEC, to close the upstream request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import av
import httpx2 as httpx  # the openai SDK's HTTP client
import openai
import pytest

from fakes.openai_upstream import (
    FakeOpenAI,
    Latency,
    hang,
    pcm_duration_s,
    reset_after,
    status,
)
from tests.conftest import AppFactory
from tests.integration.test_tls import certificate  # noqa: F401 - a fixture used below
from voxrelay.gateways.app import App
from voxrelay.service import metrics

TEXT = "Hello world. This is voxrelay, speaking through the OpenAI door. Goodbye for now."
SHORT = "Just one short sentence."
WAIT = 30.0  # safety net for every await on the network
KEY = "sk-voxrelay-test-9f2c"
TTS_KEY = "sk-fake-speech-1c7e"
CLOSE_BUDGET_S = 0.1  # SPEC: upstream requests closed within 100 ms of a disconnect
#: format → (PyAV demuxer, its options, Content-Type)
FORMATS: dict[str, tuple[str, dict[str, str], str]] = {
    "mp3": ("mp3", {}, "audio/mpeg"),
    "opus": ("ogg", {}, "audio/ogg; codecs=opus"),
    "aac": ("aac", {}, "audio/aac"),
    "flac": ("flac", {}, "audio/flac"),
    "wav": ("wav", {}, "audio/wav"),
    "pcm": ("s16le", {"sample_rate": "24000", "ch_layout": "mono"}, "audio/pcm"),
    "mulaw": ("mulaw", {"sample_rate": "8000", "ch_layout": "mono"}, ""),
    "alaw": ("alaw", {"sample_rate": "8000", "ch_layout": "mono"}, ""),
}


def base_url(app: App) -> str:
    return f"http://127.0.0.1:{app.http_port}/v1"


def sync_client(app: App, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(app), api_key=api_key, max_retries=0, timeout=WAIT)


def async_client(app: App, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(app), api_key=api_key, max_retries=0, timeout=WAIT)


def decode_seconds(data: bytes, fmt: str) -> float:
    demux, options, _ = FORMATS[fmt]
    with av.open(io.BytesIO(data), mode="r", format=demux, options=options) as container:
        samples = rate = 0
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """Parse a ``text/event-stream`` body into its JSON ``data`` payloads."""
    events = []
    for block in body.decode().split("\n\n"):
        data = [line[len("data: ") :] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def count(protocol: str, outcome: str) -> float:
    value: float = metrics.REQUESTS.labels(protocol, "speak", outcome)._value.get()
    return value


@asynccontextmanager
async def speech_upstream(
    app_factory: AppFactory, latency: Latency | None = None, **overrides: Any
) -> AsyncIterator[tuple[App, FakeOpenAI]]:
    """The app with a fake OpenAI speech upstream behind it."""
    async with FakeOpenAI(latency=latency or Latency.zero(), api_key=TTS_KEY) as tts:
        settings: dict[str, Any] = dict(
            tts="openai",
            tts_base_url=tts.base_url,
            tts_api_key=TTS_KEY,
            tts_timeout_s=2,
            upstream_retries=0,
        )
        settings.update(overrides)
        app = await app_factory(**settings)
        yield app, tts


async def wait_until_idle(app: App) -> None:
    await asyncio.wait_for(app.runtime.wait_idle(), WAIT)


# Every format, with the SDK as it is used


async def test_every_format_through_the_sync_sdk(app_factory: AppFactory) -> None:
    app = await app_factory()
    before = count("http", "ok")

    def speak(fmt: str) -> tuple[bytes, httpx.Headers]:
        with sync_client(app) as client:
            response = client.audio.speech.create(
                model="tts-1",
                voice="alloy",
                input=TEXT,
                response_format=fmt,  # type: ignore[arg-type]  # mulaw, alaw: voxrelay's
            )
            return response.content, response.response.headers

    durations = {}
    for fmt in FORMATS:
        data, headers = await asyncio.to_thread(speak, fmt)
        content_type = FORMATS[fmt][2]
        if content_type:
            assert headers["content-type"] == content_type, fmt
        assert headers["transfer-encoding"] == "chunked"
        durations[fmt] = decode_seconds(data, fmt)
        if fmt == "pcm":  # OpenAI's pcm: 24 kHz s16le mono, whatever the engine's rate
            assert headers["x-voxrelay-sample-rate"] == "24000"
            assert len(data) / 2 / 24000 == pytest.approx(durations[fmt])
    # The same speech in every format (encoders pad by a frame or two).
    reference = durations["pcm"]
    assert reference > 2.0
    for fmt, seconds in durations.items():
        assert seconds == pytest.approx(reference, abs=0.1), (fmt, durations)
    assert count("http", "ok") == before + len(FORMATS)


async def test_async_sdk_streams_the_body_while_the_speech_is_made(
    app_factory: AppFactory,
) -> None:
    # Speech at real time: the first audio reaches the client while the upstream is
    # still speaking the first sentence.
    latency = Latency(tts_first_byte_s=0.0, tts_rtf=1.0)
    async with speech_upstream(app_factory, latency) as (app, tts):
        client = async_client(app)
        chunks: list[bytes] = []
        upstream_done_at_first_chunk: list[bool] = []
        async with client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="alloy", input=TEXT, response_format="pcm"
        ) as response:
            assert response.headers["content-type"] == "audio/pcm"
            async for chunk in response.iter_bytes():
                if not chunks:
                    upstream_done_at_first_chunk.append(
                        tts.speech_requests[0].finished_at is not None
                    )
                chunks.append(chunk)
        await client.close()
    assert upstream_done_at_first_chunk == [False]
    assert len(chunks) > 1
    assert decode_seconds(b"".join(chunks), "pcm") > 2.0
    # voxrelay asked its upstream for the voice the client named.
    assert {r.body["voice"] for r in tts.speech_requests} == {"alloy"}


async def test_async_sdk_create_returns_the_whole_file(app_factory: AppFactory) -> None:
    app = await app_factory()
    async with async_client(app) as client:
        response = await client.audio.speech.create(
            model="tts-1", voice="alloy", input=SHORT, response_format="wav", speed=1.5
        )
        data = await response.aread()
    assert data[:4] == b"RIFF"
    assert decode_seconds(data, "wav") > 0.5


async def test_curl_sees_a_chunked_body(app_factory: AppFactory) -> None:
    app = await app_factory()
    body = json.dumps({"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "mp3"})
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--raw", "-D", "-", "--max-time", str(WAIT),
        "-H", "Content-Type: application/json", "-d", body,
        f"{base_url(app)}/audio/speech",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    head, _, raw = out.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0].startswith("http/1.1 200")
    assert "transfer-encoding: chunked" in lines
    assert "content-type: audio/mpeg" in lines
    # Undo the chunked framing by hand: more than one chunk, then the last, empty one.
    audio, chunks = bytearray(), 0
    while True:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        audio += raw[:size]
        raw = raw[size + 2 :]
        chunks += 1
    assert chunks > 1
    assert decode_seconds(bytes(audio), "mp3") > 2.0


# Server-Sent Events


async def test_sse_sends_openai_delta_and_done_events(app_factory: AppFactory) -> None:
    app = await app_factory()
    async with (
        async_client(app) as client,
        client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts",
            voice="alloy",
            input=TEXT,
            response_format="pcm",
            stream_format="sse",
        ) as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        body = await response.read()
    events = sse_events(body)
    deltas, done = events[:-1], events[-1]
    assert len(deltas) > 1
    assert {e["type"] for e in deltas} == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert decode_seconds(audio, "pcm") > 2.0
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert set(usage) == {"input_tokens", "output_tokens", "total_tokens"}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert done["voxrelay"]["audio_bytes"] == len(audio)


async def test_sse_carries_word_timings_as_an_event_openai_clients_skip(
    app_factory: AppFactory,
) -> None:
    app = await app_factory()
    async with (
        async_client(app) as client,
        client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts",
            voice="alloy",
            input="It costs $3.50. Trains leave at 9am.",
            response_format="pcm",
            stream_format="sse",
            extra_body={"word_timestamps": True},
        ) as response,
    ):
        body = await response.read()
    events = sse_events(body)
    words = [e for e in events if e["type"] == "voxrelay.words"]
    assert [w["segment_index"] for w in words] == list(range(len(words))) and words
    said = [word["text"] for event in words for word in event["words"]]
    assert said[:3] == ["It", "costs", "$3.50"]
    assert events[-1]["type"] == "speech.audio.done"


async def test_sse_error_after_audio_is_an_error_event(app_factory: AppFactory) -> None:
    async with speech_upstream(app_factory) as (app, tts):
        tts.speech_faults.append(reset_after(10))
        async with (
            async_client(app) as client,
            client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input=TEXT, response_format="pcm",
                stream_format="sse",
            ) as response,
        ):  # fmt: skip
            body = await response.read()
    events = sse_events(body)
    assert events[0]["type"] == "speech.audio.delta"
    error = events[-1]
    assert error["type"] == "error"
    assert error["error"]["code"] == "upstream_error"
    assert set(error["error"]) == {"message", "type", "param", "code"}


async def test_error_after_audio_cuts_the_chunked_body_off(app_factory: AppFactory) -> None:
    async with speech_upstream(app_factory) as (app, tts):
        tts.speech_faults.append(reset_after(10))
        received = bytearray()
        async with async_client(app) as client:
            with pytest.raises((httpx.RemoteProtocolError, openai.APIConnectionError)):
                async with client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="alloy", input=TEXT, response_format="pcm"
                ) as response:
                    assert response.status_code == 200
                    async for chunk in response.iter_bytes():
                        received += chunk
        assert received  # the audio before the fault arrived; its end did not
        await wait_until_idle(app)


# Errors: OpenAI's body, the status its clients expect


async def test_bad_requests_are_400_in_openai_shape(app_factory: AppFactory) -> None:
    app = await app_factory()
    url = f"{base_url(app)}/audio/speech"
    cases: list[tuple[Any, str | None]] = [
        ({"model": "tts-1", "voice": "alloy"}, "input"),
        ({"model": "tts-1", "input": "hi", "response_format": "ogg"}, "response_format"),
        ({"model": "tts-1", "input": "hi", "stream_format": "video"}, "stream_format"),
        ({"model": "tts-1", "input": "hi", "speed": "fast"}, "speed"),
        ({"model": "tts-1", "input": "hi", "voice": 7}, "voice"),
        ({"model": "tts-1", "input": "  "}, None),
        ({"model": "tts-1", "input": "bell \x07"}, None),
        ({"model": "tts-1", "input": "hi", "voice": "no-such-voice"}, None),
        ({"model": "tts-1", "input": "hi", "speed": 9}, None),
        (["not", "an", "object"], None),
    ]
    async with httpx.AsyncClient(timeout=WAIT) as http:
        for body, param in cases:
            response = await http.post(url, json=body)
            assert response.status_code == 400, body
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["type"], error["code"], error["param"]) == (
                "invalid_request_error",
                "invalid_request",
                param,
            ), body
            assert error["message"]
        response = await http.post(url, content=b"{not json", headers={"X-Request-Id": "r-42"})
        assert response.status_code == 400
        assert response.headers["x-request-id"] == "r-42"
        missing = await http.get(f"{base_url(app)}/audio/nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"

    def sdk_error() -> openai.BadRequestError:
        with sync_client(app) as client, pytest.raises(openai.BadRequestError) as caught:
            client.audio.speech.create(model="tts-1", voice="alloy", input="")
        return caught.value

    error = await asyncio.to_thread(sdk_error)
    assert error.status_code == 400
    assert error.code == "invalid_request"


async def test_over_long_input_is_413(app_factory: AppFactory) -> None:
    app = await app_factory(max_input_chars=50)
    async with async_client(app) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.audio.speech.create(model="tts-1", voice="alloy", input="a" * 51)
    assert caught.value.status_code == 413
    assert caught.value.code == "too_large"
    # A body far beyond any legal input is refused before it is read whole.
    async with httpx.AsyncClient(timeout=WAIT) as http:
        response = await http.post(
            f"{base_url(app)}/audio/speech", json={"model": "tts-1", "input": "a" * 1_000_000}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


async def test_api_keys(app_factory: AppFactory) -> None:
    app = await app_factory(api_keys=KEY)
    async with async_client(app, api_key="wrong-key") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
        assert caught.value.status_code == 401
        assert caught.value.response.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with httpx.AsyncClient(timeout=WAIT) as http:  # no key at all
        for response in (
            await http.post(f"{base_url(app)}/audio/speech", json={"input": SHORT}),
            await http.get(f"{base_url(app)}/audio/voices"),
        ):
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
    async with async_client(app, api_key=KEY) as client:
        response = await client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
        assert decode_seconds(await response.aread(), "mp3") > 0.5
        assert [m.id async for m in client.models.list()]


async def test_rate_limit_is_429_with_retry_after(app_factory: AppFactory) -> None:
    app = await app_factory(rate_limit_per_min=1)
    async with async_client(app) as client:
        await (await client.audio.speech.create(model="tts-1", voice="en", input=SHORT)).aread()
        with pytest.raises(openai.RateLimitError) as caught:
            await client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limited"
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000


async def test_at_capacity_is_429(app_factory: AppFactory) -> None:
    latency = Latency(tts_first_byte_s=0.0, tts_rtf=1.0)
    async with speech_upstream(app_factory, latency, max_streams_per_key=1) as (app, _):
        async with (
            async_client(app) as client,
            client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input=TEXT, response_format="pcm"
            ) as first,
        ):
            async for _ in first.iter_bytes():
                break  # the first stream is under way
            with pytest.raises(openai.RateLimitError) as caught:
                await client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
        assert "retry-after" in caught.value.response.headers


async def test_upstream_down_is_503_and_timeout_is_504(app_factory: AppFactory) -> None:
    async with (
        speech_upstream(app_factory, tts_timeout_s=0.5) as (app, tts),
        async_client(app) as client,
    ):
        tts.speech_faults.append(status(500))
        with pytest.raises(openai.InternalServerError) as down:
            await client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
        assert down.value.status_code == 503
        assert down.value.code == "upstream_error"

        tts.speech_faults.append(hang())
        with pytest.raises(openai.InternalServerError) as slow:
            await client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
        assert slow.value.status_code == 504
        assert slow.value.code == "upstream_timeout"
    assert count("http", "upstream_timeout") >= 1


async def test_draining_is_503_with_retry_after_and_streams_in_flight_finish(
    app_factory: AppFactory,
) -> None:
    latency = Latency(tts_first_byte_s=0.0, tts_rtf=0.5)
    async with speech_upstream(app_factory, latency) as (app, _):
        async with (
            async_client(app) as client,
            client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input=SHORT, response_format="pcm"
            ) as first,
        ):
            chunks = []
            async for chunk in first.iter_bytes():
                if not chunks:
                    await app.runtime.begin_drain()
                    with pytest.raises(openai.InternalServerError) as caught:
                        await client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
                chunks.append(chunk)
        assert caught.value.status_code == 503
        assert caught.value.code == "unavailable"
        assert caught.value.response.headers["retry-after"] == "1"
        # The stream already under way was not cut: all of its audio arrived.
        assert decode_seconds(b"".join(chunks), "pcm") == pytest.approx(
            pcm_duration_s(SHORT), abs=0.05
        )
        await app.drain_and_stop()  # the fixture stops only apps that are not draining


async def test_drain_window_over_ends_the_bodies_in_flight(app_factory: AppFactory) -> None:
    latency = Latency(tts_first_byte_s=0.0, tts_rtf=1.0)
    async with speech_upstream(app_factory, latency, drain_s=0) as (app, _):
        body = {"model": "tts-1", "input": TEXT, "response_format": "pcm"}
        async with (
            httpx.AsyncClient(timeout=WAIT) as http,
            http.stream("POST", f"{base_url(app)}/audio/speech", json=body) as chunked,
            http.stream(
                "POST", f"{base_url(app)}/audio/speech", json={**body, "stream_format": "sse"}
            ) as sse,
        ):
            chunked_body, sse_body = chunked.aiter_bytes(), sse.aiter_bytes()
            await anext(chunked_body)
            first_event = await anext(sse_body)
            # SIGTERM with no drain window: what is in flight ends at once, and says so.
            stopping = asyncio.create_task(app.drain_and_stop())
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in chunked_body:
                    pass
            rest = b"".join([chunk async for chunk in sse_body])
            await asyncio.wait_for(stopping, WAIT)
    events = sse_events(first_event + rest)
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "unavailable"


# Disconnects


async def test_a_client_that_disconnects_mid_body_closes_the_upstream_request(
    app_factory: AppFactory,
) -> None:
    latency = Latency(tts_first_byte_s=0.0, tts_rtf=1.0)
    async with speech_upstream(app_factory, latency) as (app, tts):
        before = count("http", "cancelled")
        reader, writer = await asyncio.open_connection("127.0.0.1", app.http_port)
        body = json.dumps({"model": "tts-1", "input": TEXT, "response_format": "pcm"}).encode()
        writer.write(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.read(100), WAIT)  # audio is flowing
        request = tts.speech_requests[0]
        assert request.finished_at is None
        writer.transport.abort()
        closed_at = time.monotonic()
        await tts.wait_for(lambda: request.client_gone_at is not None, timeout=WAIT)
        assert request.client_gone_at is not None
        assert request.client_gone_at - closed_at <= CLOSE_BUDGET_S
        await wait_until_idle(app)
        await asyncio.wait_for(_until(lambda: count("http", "cancelled") == before + 1), WAIT)


async def test_a_client_that_disconnects_before_the_first_audio_closes_the_upstream(
    app_factory: AppFactory,
) -> None:
    async with speech_upstream(app_factory, tts_timeout_s=10) as (app, tts):
        tts.speech_faults.append(hang())
        sock = socket.create_connection(("127.0.0.1", app.http_port), timeout=WAIT)
        try:
            body = json.dumps({"model": "tts-1", "input": SHORT}).encode()
            sock.sendall(
                b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await tts.wait_for(lambda: len(tts.speech_requests) == 1, timeout=WAIT)
        finally:
            sock.close()
        closed_at = time.monotonic()
        request = tts.speech_requests[0]
        await tts.wait_for(lambda: request.client_gone_at is not None, timeout=WAIT)
        assert request.client_gone_at is not None
        assert request.client_gone_at - closed_at <= CLOSE_BUDGET_S
        await wait_until_idle(app)


async def test_a_client_that_stops_reading_is_dropped_and_its_upstream_closed(
    app_factory: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Minutes of audio as fast as the upstream can speak: far more than socket buffers hold.
    text = "This sentence is spoken again and again for a reader that never reads. " * 50
    async with speech_upstream(app_factory, send_stall_s=0.5) as (app, tts):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        sock.connect(("127.0.0.1", app.http_port))
        try:
            body = json.dumps({"model": "tts-1", "input": text, "response_format": "pcm"})
            sock.sendall(
                b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body.encode()
            )
            # Never read: voxrelay's writes stall, and it drops the client and the stream.
            await asyncio.wait_for(
                _until(lambda: any(getattr(r, "event", None) == "http_send_stall"
                                   for r in caplog.records)),
                WAIT,
            )  # fmt: skip
            await wait_until_idle(app)
            await tts.wait_for(
                lambda: all(
                    r.finished_at is not None or r.client_gone_at is not None
                    for r in tts.speech_requests
                ),
                timeout=WAIT,
            )
        finally:
            sock.close()
    # The rest of the text was never asked for: one segment a sentence, 50 sentences.
    assert len(tts.speech_requests) < 50


async def _until(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 - a counter has no event to await
        await asyncio.sleep(0.01)


# Voices, models, metrics and logs


async def test_voices_models_and_voice_mapping(
    app_factory: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = await app_factory()
    async with httpx.AsyncClient(timeout=WAIT) as http:
        voices = (await http.get(f"{base_url(app)}/audio/voices")).json()["voices"]
        english = (await http.get(f"{base_url(app)}/audio/voices?language=en")).json()["voices"]
        models = (await http.get(f"{base_url(app)}/audio/models")).json()["models"]
    assert {"id", "name", "language"} == set(voices[0])
    assert all(v["id"] == v["name"] for v in voices)
    assert {"tts-1", "gpt-4o-mini-tts"} <= {m["id"] for m in models}
    assert "en-us" in {v["name"] for v in voices}
    assert 0 < len(english) < len(voices)
    async with async_client(app) as client:
        models = [m.id async for m in client.models.list()]
        assert models[0] == app.synthesizer.engines.speech.model
        assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= set(models)
        assert (await client.models.retrieve("tts-1")).id == "tts-1"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("no-such-model")

        with caplog.at_level(logging.INFO, logger="voxrelay"):
            for voice in ("alloy", "alloy", "en-us", {"id": "en-gb-x-rp"}):
                response = await client.audio.speech.create(
                    model="tts-1",
                    voice=voice,  # type: ignore[arg-type]
                    input=SHORT,
                    response_format="wav",
                )
                await response.aread()
                spoken = response.response.headers["x-voxrelay-voice"]
                named = voice if isinstance(voice, str) else voice["id"]
                assert spoken == {"alloy": "en-us"}.get(named, named)
    mapped = [r for r in caplog.records if getattr(r, "event", None) == "voice_mapped"]
    assert len(mapped) == 1
    assert (mapped[0].voice, mapped[0].engine_voice) == ("alloy", "en-us")  # type: ignore[attr-defined]


async def test_streams_are_logged_and_counted_as_http(
    app_factory: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = await app_factory()
    ttfa = metrics.TIME_TO_FIRST_AUDIO.labels("http")._sum.get()
    audio = metrics.AUDIO_BYTES.labels("http", "flac")._value.get()
    with caplog.at_level(logging.INFO, logger="voxrelay"):
        async with httpx.AsyncClient(timeout=WAIT) as http:
            response = await http.post(
                f"{base_url(app)}/audio/speech",
                json={"model": "tts-1", "input": SHORT, "response_format": "flac"},
                headers={"X-Request-Id": "http-log-1"},
            )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "http-log-1"
    assert metrics.TIME_TO_FIRST_AUDIO.labels("http")._sum.get() > ttfa
    assert metrics.AUDIO_BYTES.labels("http", "flac")._value.get() == audio + len(response.content)
    ends = [r for r in caplog.records if getattr(r, "event", None) == "stream_end"]
    line = ends[-1]
    assert (line.protocol, line.request_id, line.mode, line.outcome) == (  # type: ignore[attr-defined]
        "http", "http-log-1", "speak", "ok",
    )  # fmt: skip
    assert line.peer.startswith("127.0.0.1:")  # type: ignore[attr-defined]


async def test_tls_serves_https(
    app_factory: AppFactory,
    certificate: tuple[Path, Path],  # noqa: F811 - the fixture imported above
) -> None:
    cert, key = certificate
    app = await app_factory(tls_cert=cert, tls_key=key, api_keys=KEY)
    url = f"https://127.0.0.1:{app.http_port}/v1"
    trusting = ssl.create_default_context(cafile=str(cert))
    async with openai.AsyncOpenAI(
        base_url=url,
        api_key=KEY,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(verify=trusting, timeout=WAIT),
    ) as client:
        response = await client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT)
        assert decode_seconds(await response.aread(), "mp3") > 0.5
    async with httpx.AsyncClient(timeout=WAIT) as untrusting:  # the system's CAs only
        with pytest.raises(httpx.ConnectError):
            await untrusting.get(f"{url}/models")


async def test_the_door_can_be_off(app_factory: AppFactory) -> None:
    app = await app_factory(http_port="off")
    assert app.http is None
    assert app.http_port == 0
