"""The fake OpenAI Realtime API, checked with a raw WebSocket client and the real SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    InvalidMessage,
    InvalidStatus,
)
from websockets.sync.client import connect as sync_connect

from fakes.openai_realtime import (
    AUDIO_CHUNK_MS,
    DEFAULT_REPLY,
    SAMPLE_RATE,
    FakeRealtime,
    Latency,
    close_after,
    error_event,
    expected_pcm_bytes,
    hang,
    malformed,
    reset_after,
    slow_first_byte,
    status,
    tokenize,
)
from fakes.openai_upstream import voice_pcm

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-unit-test-key"
MODEL = "gpt-realtime-2.1-mini"
SPEECH: dict[str, Any] = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "instructions": "Be brief.",
    "audio": {
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0}
    },
    "max_output_tokens": "inf",
}
TRANSCRIPT_DELTA = "response.output_audio_transcript.delta"
AUDIO_DELTA = "response.output_audio.delta"


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtime]:
    async with FakeRealtime(latency=Latency.zero()) as server:
        yield server


def ws_url(fake: FakeRealtime, path: str = "/v1/realtime") -> str:
    return f"ws://{fake.host}:{fake.port}{path}?model={MODEL}"


@asynccontextmanager
async def session(
    fake: FakeRealtime, *, key: str = KEY, **options: Any
) -> AsyncIterator[ClientConnection]:
    """Connect like the SDK does and read ``session.created``."""
    headers = {"Authorization": f"Bearer {key}"}
    async with connect(ws_url(fake), additional_headers=headers, **options) as ws:
        created = await recv(ws)
        assert created["type"] == "session.created"
        assert created["session"]["model"] == MODEL
        yield ws


async def recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5):
        event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def send(ws: ClientConnection, kind: str, **fields: Any) -> None:
    await ws.send(json.dumps({"type": kind, **fields}))


async def until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Return the events up to and including the first of *kind*."""
    events = [await recv(ws)]
    while events[-1]["type"] != kind:
        events.append(await recv(ws))
    return events


def message(text: str, role: str = "user") -> dict[str, Any]:
    part = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": part, "text": text}]}


def transcript_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == TRANSCRIPT_DELTA)


def audio_of(events: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == AUDIO_DELTA)


async def respond(ws: ClientConnection, **fields: Any) -> list[dict[str, Any]]:
    await send(ws, "response.create", **fields)
    return await until(ws, "response.done")


# A whole response


async def test_a_response_has_the_shape_of_the_ga_api(fake: FakeRealtime) -> None:
    async with session(fake) as ws:
        await send(ws, "session.update", session=SPEECH)
        assert (await recv(ws))["type"] == "session.updated"
        await send(ws, "conversation.item.create", item=message("How much is a ticket?"))
        added, done = await recv(ws), await recv(ws)
        assert [added["type"], done["type"]] == [
            "conversation.item.added",
            "conversation.item.done",
        ]
        assert done["item"]["id"].startswith("item_")
        events = await respond(ws)

    types = [e["type"] for e in events]
    assert [t for t in types if t not in (TRANSCRIPT_DELTA, AUDIO_DELTA)] == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    body = types[4:-6]
    assert set(body) == {TRANSCRIPT_DELTA, AUDIO_DELTA}
    assert body[0] == TRANSCRIPT_DELTA
    assert events[0]["response"]["status"] == "in_progress"

    # the transcript, token by token, and each token's audio right after it
    tokens = tokenize(DEFAULT_REPLY)
    assert [e["delta"] for e in events if e["type"] == TRANSCRIPT_DELTA] == tokens
    assert events[-5]["transcript"] == DEFAULT_REPLY
    spoken, audio_bytes = "", 0
    for event in events[4:-6]:
        if event["type"] == TRANSCRIPT_DELTA:
            assert audio_bytes == expected_pcm_bytes(spoken)
            spoken += event["delta"]
        else:
            chunk = len(base64.b64decode(event["delta"]))
            assert 0 < chunk <= SAMPLE_RATE * AUDIO_CHUNK_MS // 1000 * 2
            audio_bytes += chunk
    pcm = audio_of(events)
    assert len(pcm) == expected_pcm_bytes(DEFAULT_REPLY)
    assert pcm == voice_pcm(len(pcm) // 2)  # one continuous signal across tokens

    response = events[-1]["response"]
    item = response["output"][0]
    assert response["status"] == "completed"
    assert item["role"] == "assistant"
    assert item["content"][0]["transcript"] == DEFAULT_REPLY
    assert {e["response_id"] for e in events[4:-6]} == {response["id"]}
    assert {e["item_id"] for e in events[4:-6]} == {item["id"]}
    usage = response["usage"]
    audio_tokens = math.ceil(len(pcm) / 2 / (SAMPLE_RATE * 0.05))
    assert usage["output_token_details"] == {
        "text_tokens": len(tokens),
        "audio_tokens": audio_tokens,
    }
    assert usage["input_tokens"] == len(tokenize("Be brief.")) + len(
        tokenize("How much is a ticket?")
    )
    assert usage["output_tokens"] == len(tokens) + audio_tokens
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    record = fake.sessions[0]
    assert (record.path, record.model, record.api_key) == ("/v1/realtime", MODEL, KEY)
    assert [e["type"] for _, e in record.client_events] == [
        "session.update",
        "conversation.item.create",
        "response.create",
    ]
    kinds = [k for _, k in record.events]
    order = ["connected", "session_updated", "item_created", "response_created"]
    order += ["first_transcript", "first_audio", "response_done"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order)
    (recorded,) = record.responses
    assert (recorded.status, recorded.transcript, recorded.pcm_bytes) == (
        "completed",
        DEFAULT_REPLY,
        len(pcm),
    )
    await fake.wait_for(lambda: record.closed_at is not None)
    assert record.close_code == 1000
    assert record.conversation[-1] == {"role": "assistant", "content": DEFAULT_REPLY}


async def test_audio_length_is_exact_at_any_speed(fake: FakeRealtime) -> None:
    async with session(fake) as ws:
        for text in ("Hi.", "Two tickets, please!", "A b c d e f g.", DEFAULT_REPLY[:77]):
            fake.reply = text
            for speed in (0.25, 0.7, 1.0, 1.3, 1.5):
                update = {"type": "realtime", "audio": {"output": {"speed": speed}}}
                await send(ws, "session.update", session=update)
                assert (await recv(ws))["type"] == "session.updated"
                events = await respond(ws)
                assert transcript_of(events) == text
                assert len(audio_of(events)) == expected_pcm_bytes(text, speed), (text, speed)


async def test_text_only_responses_carry_no_audio(fake: FakeRealtime) -> None:
    async with session(fake) as ws:
        events = await respond(ws, response={"output_modalities": ["text"]})
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == DEFAULT_REPLY
    assert not audio_of(events)
    assert [e["text"] for e in events if e["type"] == "response.output_text.done"] == [
        DEFAULT_REPLY
    ]
    assert events[-1]["response"]["usage"]["output_token_details"]["audio_tokens"] == 0


# The session and the conversation


async def test_session_update_is_merged_and_bad_ones_refused(fake: FakeRealtime) -> None:
    async with session(fake) as ws:
        update = {
            "type": "realtime",
            "instructions": "Be kind.",
            "audio": {"output": {"voice": "cedar"}},
        }
        await send(ws, "session.update", session=update)
        updated = (await recv(ws))["session"]
        assert updated["instructions"] == "Be kind."
        assert updated["audio"]["output"] == {
            "format": {"type": "audio/pcm", "rate": 24000},
            "voice": "cedar",
            "speed": 1.0,
        }
        bad = [
            ({"instructions": "no type"}, "missing_required_parameter"),
            ({"type": "transcription"}, "invalid_value"),
            (
                {"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}}}},
                "invalid_value",
            ),
            ({"type": "realtime", "audio": {"output": {"speed": 3.0}}}, "invalid_value"),
            ({"type": "realtime", "max_output_tokens": 0}, "invalid_value"),
        ]
        for i, (wrong, code) in enumerate(bad):
            await send(ws, "session.update", session=wrong, event_id=f"evt_{i}")
            error = await recv(ws)
            assert error["type"] == "error"
            assert (error["error"]["code"], error["error"]["event_id"]) == (code, f"evt_{i}")
    assert fake.sessions[0].session["audio"]["output"]["voice"] == "cedar"
    assert fake.sessions[0].session["instructions"] == "Be kind."


async def test_a_callable_reply_sees_the_conversation(fake: FakeRealtime) -> None:
    seen: list[list[dict[str, str]]] = []

    def reply(conversation: Any) -> str:
        seen.append(list(conversation))
        return f"You said: {conversation[-1]['content']}"

    fake.reply = reply
    history = [
        message("Be brief.", "system"),
        message("Hello"),
        message("Hi! How can I help?", "assistant"),
        message("Two tickets, please."),
    ]
    async with session(fake) as ws:
        for item in history:
            await send(ws, "conversation.item.create", item=item)
            await until(ws, "conversation.item.done")
        assert transcript_of(await respond(ws)) == "You said: Two tickets, please."
        await send(ws, "conversation.item.create", item=message("Thanks"))
        done = (await until(ws, "conversation.item.done"))[-1]
        assert done["previous_item_id"] == fake.sessions[0].items[-2]["id"]  # the reply's item
        assert transcript_of(await respond(ws)) == "You said: Thanks"
        system_id = fake.sessions[0].items[0]["id"]
        await send(ws, "conversation.item.delete", item_id=system_id)
        assert (await recv(ws)) | {"event_id": None} == {
            "type": "conversation.item.deleted",
            "event_id": None,
            "item_id": system_id,
        }
        await send(ws, "conversation.item.delete", item_id="item_nope")
        assert (await recv(ws))["error"]["code"] == "item_not_found"
        await respond(ws)
    assert seen[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Two tickets, please."},
    ]
    # the first response joined the conversation, as on the real API
    assert seen[1][-2:] == [
        {"role": "assistant", "content": "You said: Two tickets, please."},
        {"role": "user", "content": "Thanks"},
    ]
    assert seen[2][0] == {"role": "user", "content": "Hello"}  # the system item was deleted


async def test_max_output_tokens_makes_it_incomplete(fake: FakeRealtime) -> None:
    tokens = tokenize(DEFAULT_REPLY)
    async with session(fake) as ws:
        await send(ws, "session.update", session={"type": "realtime", "max_output_tokens": 3})
        await recv(ws)
        events = await respond(ws)
        short = "".join(tokens[:3])
        assert transcript_of(events) == short
        assert len(audio_of(events)) == expected_pcm_bytes(short)
        response = events[-1]["response"]
        assert response["status"] == "incomplete"
        assert response["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
        assert response["usage"]["output_token_details"]["text_tokens"] == 3
        # a response's own options win over the session's
        events = await respond(ws, response={"max_output_tokens": "inf"})
        assert transcript_of(events) == DEFAULT_REPLY
        assert events[-1]["response"]["status"] == "completed"
    assert fake.sessions[0].first("response_incomplete") is not None


async def test_one_response_at_a_time(fake: FakeRealtime) -> None:
    fake.latency = Latency(ttft_s=0.0, token_s=0.005, tts_first_byte_s=0.0, tts_rtf=0.0)
    async with session(fake) as ws:
        await send(ws, "response.create")
        await fake.wait_for_event("response_created")
        await send(ws, "response.create", event_id="evt_again")
        events = await until(ws, "response.done")
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [(e["code"], e["event_id"]) for e in errors] == [
        ("conversation_already_has_active_response", "evt_again")
    ]
    assert transcript_of(events) == DEFAULT_REPLY
    assert len(fake.sessions[0].responses) == 1


async def test_cancel_stops_the_response_at_once(fake: FakeRealtime) -> None:
    fake.latency = Latency(ttft_s=0.0, token_s=0.05, tts_first_byte_s=0.0, tts_rtf=0.0)
    async with session(fake) as ws:
        await send(ws, "response.create")
        await fake.wait_for_event("transcript_delta", 2)
        sent_at = time.monotonic()
        await send(ws, "response.cancel")
        events = await until(ws, "response.done")
        response = events[-1]["response"]
        assert response["status"] == "cancelled"
        assert response["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        transcript = transcript_of(events)
        assert 2 <= len(tokenize(transcript)) <= 3
        assert DEFAULT_REPLY.startswith(transcript)
        assert 0 < len(audio_of(events)) <= expected_pcm_bytes(transcript)
        assert response["output"][0]["content"][0]["transcript"] == transcript

        await send(ws, "response.cancel")
        assert (await recv(ws))["error"]["code"] == "response_cancel_not_active"
        fake.latency = Latency.zero()
        assert transcript_of(await respond(ws)) == DEFAULT_REPLY  # the session goes on

    record = fake.sessions[0].responses[0]
    assert record.status == "cancelled"
    assert record.cancel_received_at is not None and record.done_at is not None
    assert record.cancel_received_at >= sent_at
    assert record.done_at - record.cancel_received_at < 0.05
    assert fake.sessions[0].first("response_cancelled") == record.done_at


async def test_events_it_cannot_read_get_invalid_event(fake: FakeRealtime) -> None:
    async with session(fake) as ws:
        await ws.send("not json")
        await ws.send("[1, 2]")
        await ws.send(b"\x00\x01")
        await send(ws, "bogus.event", event_id="evt_bogus")
        errors = [await recv(ws) for _ in range(4)]
        assert {e["type"] for e in errors} == {"error"}
        assert {e["error"]["code"] for e in errors} == {"invalid_event"}
        assert {e["error"]["type"] for e in errors} == {"invalid_request_error"}
        assert errors[3]["error"]["event_id"] == "evt_bogus"
        await send(ws, "conversation.item.create", item={"type": "function_call"})
        assert (await recv(ws))["error"]["code"] == "invalid_value"
        assert transcript_of(await respond(ws)) == DEFAULT_REPLY  # still usable
    assert fake.sessions[0].client_events[0][1] == {"_raw": "not json"}


# Handshake faults


async def test_handshake_429_carries_retry_after(fake: FakeRealtime) -> None:
    fake.connect_faults.append(status(429, retry_after=2))
    with pytest.raises(InvalidStatus) as info:
        async with session(fake):
            pass
    response = info.value.response
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body)["error"]["code"] == "rate_limit_exceeded"
    async with session(fake):  # the fault was used up
        pass
    refused = fake.sessions[0]
    assert refused.status == 429 and refused.fault is not None
    assert refused.first("refused") is not None
    assert fake.sessions[1].status == 101
    assert fake.connections_total == 2


async def test_wrong_key_gets_401_and_wrong_path_404() -> None:
    async with FakeRealtime(latency=Latency.zero(), api_key="sk-the-right-one") as fake:
        with pytest.raises(InvalidStatus) as info:
            async with session(fake, key="sk-wrong-key"):
                pass
        assert info.value.response.status_code == 401
        error = json.loads(info.value.response.body)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
        assert "sk-***ey" in error["message"]
        async with session(fake, key="sk-the-right-one"):
            pass
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(fake, "/v1/elsewhere")):
                pass
        assert info.value.response.status_code == 404
        assert [s.status for s in fake.sessions] == [401, 101, 404]


async def test_hang_at_handshake_until_the_client_gives_up(fake: FakeRealtime) -> None:
    fake.connect_faults.append(hang())
    with pytest.raises(TimeoutError):
        async with session(fake, open_timeout=0.2):
            pass
    record = fake.sessions[0]
    await fake.wait_for(lambda: record.closed_at is not None)
    assert record.status is None
    assert record.first("fault:hang") is not None
    assert fake.open_connections == 0


async def test_stop_releases_hung_handshakes_and_responses() -> None:
    fake = FakeRealtime(latency=Latency(ttft_s=0.0, token_s=0.05, tts_first_byte_s=0, tts_rtf=0))
    await fake.start()
    fake.connect_faults.append(hang())

    async def hung_client() -> None:
        async with session(fake, open_timeout=5):
            pass

    hung = asyncio.create_task(hung_client())
    await fake.wait_for_event("fault:hang")
    async with session(fake) as speaking, session(fake) as stuck:
        await send(speaking, "response.create")
        fake.response_faults.append(hang())
        await send(stuck, "response.create")
        await fake.wait_for_event("first_transcript")
        await fake.wait_for_event("fault:hang", 2)
        started = time.monotonic()
        await fake.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(ConnectionClosed) as info:
            await until(speaking, "response.done")
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    with pytest.raises(InvalidMessage):  # the TCP closed without an HTTP answer
        await hung
    assert fake.open_connections == 0
    assert {r.status for r in fake.responses} == {"aborted"}
    leftovers = [
        t
        for t in asyncio.all_tasks()
        if "FakeRealtime" in t.get_coro().__qualname__  # type: ignore[union-attr]
    ]
    assert leftovers == []


async def test_other_connect_faults(fake: FakeRealtime) -> None:
    fake.connect_faults.extend(
        [
            reset_after(0),
            malformed(),
            slow_first_byte(0.1),
            error_event(code="x"),
            close_after(0, 4000),
        ]
    )
    with pytest.raises(InvalidMessage):  # reset before any HTTP answer
        async with session(fake):
            pass
    with pytest.raises(InvalidStatus) as info:  # a web page, not an upgrade
        async with session(fake):
            pass
    assert info.value.response.status_code == 200
    assert info.value.response.headers["Content-Type"].startswith("text/html")
    async with session(fake):  # slow, but it upgrades
        pass
    async with session(fake) as ws:  # an error right after session.created
        error = await recv(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "x")
    async with session(fake) as ws:  # closed right after session.created
        with pytest.raises(ConnectionClosedError) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
    slow = fake.sessions[2]
    assert slow.connected_at is not None and slow.connected_at - slow.opened_at >= 0.1
    await fake.wait_for(lambda: fake.open_connections == 0)
    assert [s.status for s in fake.sessions] == [None, 200, 101, 101, 101]


# Response faults


async def test_error_event_instead_of_a_response(fake: FakeRealtime) -> None:
    fake.response_faults.append(error_event(code="server_is_overloaded", message="Try later."))
    fake.response_faults.append(error_event(after=2))
    async with session(fake) as ws:
        await send(ws, "response.create")
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["error"] | {"event_id": None} == {
            "type": "server_error",
            "code": "server_is_overloaded",
            "message": "Try later.",
            "param": None,
            "event_id": None,
        }
        events = await respond(ws)
        assert [e["type"] for e in events[-2:]] == ["error", "response.done"]
        assert transcript_of(events) == "".join(tokenize(DEFAULT_REPLY)[:2])
        response = events[-1]["response"]
        assert response["status"] == "failed"
        assert response["status_details"]["error"]["type"] == "server_error"
        assert transcript_of(await respond(ws)) == DEFAULT_REPLY  # the queue is empty again
    first, second, third = fake.sessions[0].responses
    assert (first.status, second.status, third.status) == (None, "failed", "completed")


async def test_close_after_n_deltas(fake: FakeRealtime) -> None:
    fake.response_faults.append(close_after(2, code=1011, reason="boom"))
    events: list[dict[str, Any]] = []
    async with session(fake) as ws:
        await send(ws, "response.create")
        with pytest.raises(ConnectionClosedError) as info:
            while True:
                events.append(await recv(ws))
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "boom")
    assert len([e for e in events if e["type"] == TRANSCRIPT_DELTA]) == 2
    record = fake.sessions[0]
    await fake.wait_for(lambda: record.closed_at is not None)
    assert record.close_code == 1011  # the client's echo
    assert record.first("fault:close_after") is not None
    assert record.responses[0].status == "aborted"


async def test_reset_after_n_deltas(fake: FakeRealtime) -> None:
    fake.response_faults.append(reset_after(1))
    events: list[dict[str, Any]] = []
    async with session(fake) as ws:
        await send(ws, "response.create")
        with pytest.raises(ConnectionClosedError) as info:
            while True:
                events.append(await recv(ws))
    assert info.value.rcvd is None  # no close frame
    assert len([e for e in events if e["type"] == TRANSCRIPT_DELTA]) == 1
    record = fake.sessions[0]
    await fake.wait_for(lambda: record.closed_at is not None)
    assert record.close_code is None
    assert record.responses[0].status == "aborted"


async def test_malformed_frame_mid_response(fake: FakeRealtime) -> None:
    fake.response_faults.append(malformed())
    frames: list[str] = []
    async with session(fake) as ws:
        await send(ws, "response.create")
        while not frames or '"response.done"' not in frames[-1]:
            frames.append(str(await asyncio.wait_for(ws.recv(), 5)))
    broken = []
    for i, frame in enumerate(frames):
        try:
            json.loads(frame)
        except ValueError:
            broken.append(i)
    assert len(broken) == 1
    assert frames[broken[0]] == '{"type": "response.output_audio.delta", "delta'
    before = [json.loads(f)["type"] for f in frames[: broken[0]]]
    assert before.count(TRANSCRIPT_DELTA) == 2
    events = [json.loads(f) for i, f in enumerate(frames) if i != broken[0]]
    assert transcript_of(events) == DEFAULT_REPLY  # it carried on


async def test_hang_during_a_response_until_cancel(fake: FakeRealtime) -> None:
    fake.response_faults.append(hang())
    async with session(fake) as ws:
        await send(ws, "response.create")
        await fake.wait_for_event("fault:hang")
        await send(ws, "session.update", session={"type": "realtime"})
        assert (await recv(ws))["type"] == "session.updated"  # nothing came for the response
        await send(ws, "response.create")
        assert (await recv(ws))["error"]["code"] == "conversation_already_has_active_response"
        await send(ws, "response.cancel")
        done = await recv(ws)
    assert done["type"] == "response.done"
    assert (done["response"]["status"], done["response"]["output"]) == ("cancelled", [])
    assert fake.sessions[0].responses[0].created_at is None


async def test_slow_first_byte_delays_the_audio(fake: FakeRealtime) -> None:
    fake.response_faults.append(slow_first_byte(0.15))
    async with session(fake) as ws:
        events = await respond(ws)
    assert len(audio_of(events)) == expected_pcm_bytes(DEFAULT_REPLY)
    record = fake.sessions[0].responses[0]
    assert record.first_audio_at is not None and record.first_transcript_at is not None
    assert record.first_audio_at - record.first_transcript_at >= 0.15


async def test_latency_paces_the_response(fake: FakeRealtime) -> None:
    fake.reply = "Two short words."  # 0.96 s of audio in 9 chunks, the last 20 ms
    fake.latency = Latency(ttft_s=0.05, token_s=0.02, tts_first_byte_s=0.05, tts_rtf=0.1)
    async with session(fake) as ws:
        events = await respond(ws)
    assert transcript_of(events) == fake.reply
    r = fake.sessions[0].responses[0]
    assert r.created_at and r.first_transcript_at and r.first_audio_at and r.done_at
    assert r.created_at - r.requested_at >= 0.05
    assert r.first_audio_at - r.first_transcript_at >= 0.05
    assert r.done_at - r.first_audio_at >= 0.94 * 0.1 - 0.01  # first_audio_at is after a send
    assert r.done_at - r.requested_at < 1.0


# The client going away


async def test_disconnect_mid_response_is_recorded(fake: FakeRealtime) -> None:
    fake.latency = Latency(ttft_s=0.0, token_s=0.05, tts_first_byte_s=0.0, tts_rtf=0.0)
    async with session(fake) as ws:
        await send(ws, "response.create")
        await fake.wait_for_event("transcript_delta")
    left_at = time.monotonic()
    record = fake.sessions[0]
    await fake.wait_for(lambda: record.responses[0].status == "aborted", timeout=1.0)
    assert record.closed_at is not None and record.closed_at - left_at < 0.1
    assert record.close_code == 1000
    assert record.first("response_done") is None
    assert fake.responses_active == 0 and fake.open_connections == 0

    async with session(fake) as ws:  # now without a close frame
        await send(ws, "response.create")
        await fake.wait_for_event("transcript_delta", session=1)
        ws.transport.abort()
    record = fake.sessions[1]
    await fake.wait_for(lambda: record.responses[0].status == "aborted", timeout=1.0)
    assert record.closed_at is not None and record.close_code is None
    assert fake.responses_active == 0


# The real SDK


async def test_the_openai_sdk_speaks_to_it(fake: FakeRealtime) -> None:
    client = openai.AsyncOpenAI(api_key="k", base_url=fake.base_url)
    deltas: list[str] = []
    pcm = bytearray()
    try:
        async with client.realtime.connect(model=MODEL) as conn:
            await conn.session.update(session=SPEECH)  # type: ignore[arg-type]
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "How much is a ticket?"}],
                }
            )
            await conn.response.create()
            async for event in conn:
                if event.type == "response.output_audio_transcript.delta":
                    deltas.append(event.delta)
                elif event.type == "response.output_audio.delta":
                    pcm += base64.b64decode(event.delta)
                elif event.type == "response.done":
                    assert event.response.status == "completed"
                    break
    finally:
        await client.close()
    assert "".join(deltas) == DEFAULT_REPLY
    assert len(pcm) == expected_pcm_bytes(DEFAULT_REPLY)
    record = fake.sessions[0]
    assert (record.path, record.model, record.api_key) == ("/v1/realtime", MODEL, "k")
    assert [e["type"] for _, e in record.client_events] == [
        "session.update",
        "conversation.item.create",
        "response.create",
    ]
    assert record.session["audio"]["output"]["voice"] == "marin"


# Bookkeeping


async def test_keep_history_off_records_nothing() -> None:
    async with FakeRealtime(latency=Latency.zero(), keep_history=False) as fake:
        async with session(fake) as ws:
            assert transcript_of(await respond(ws)) == DEFAULT_REPLY
        await fake.wait_for(lambda: fake.open_connections == 0)
        assert (fake.sessions, fake.events, fake.responses) == ([], [], [])
        assert (fake.connections_total, fake.responses_total) == (1, 1)


async def test_wait_for_times_out_with_a_clear_error(fake: FakeRealtime) -> None:
    with pytest.raises(TimeoutError, match=r"0\.05"):
        await fake.wait_for(lambda: False, timeout=0.05)


def test_cli_serves_until_interrupted() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-m", "fakes.openai_realtime", "--port", "0", "--ttft-ms", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().split()[4]
            assert base_url.startswith("http://127.0.0.1:")
            url = base_url.replace("http://", "ws://") + "/realtime?model=m"
            with sync_connect(url, open_timeout=5) as ws:
                assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0
