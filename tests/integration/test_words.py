"""Words and text over both doors: speakable text, word timings, and what was heard."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fakes.providers import SpyChat
from tests.conftest import AppFactory
from tests.integration.test_websocket import events, open_ws, receive, send, until_end
from tests.servers import make_settings
from voxrelay.gateways.app import App
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

TEXT = "A ticket costs $3.50 today. Trains leave every 12 minutes until **midnight**."


def ws_url(app: App) -> str:
    return f"ws://127.0.0.1:{app.ws_port}/v1/stream"


def check_words(text: str, segments: list[dict], words: list[dict]) -> None:
    """Every word of every segment, in order, on the audio clock, pointing into *text*."""
    assert [w["segment_index"] for w in words] == [s["index"] for s in segments]
    clock = 0
    for segment, timings in zip(segments, words, strict=True):
        offset = text.index(segment["text"])
        assert [w["text"] for w in timings["words"]] == [
            t.strip(".,*!?") for t in segment["text"].split() if t.strip(".,*!?")
        ]
        for word in timings["words"]:
            assert text[word["text_offset"] :].startswith(word["text"])
            assert word["text_offset"] >= offset
            assert clock <= word["start_ms"] <= word["end_ms"]
            assert word["start_ms"] >= segment["start_ms"]
            clock = word["start_ms"]


async def test_ws_speaks_the_normalized_text_and_sends_the_words(app_factory: AppFactory) -> None:
    app = await app_factory()
    async with open_ws(ws_url(app)) as ws:
        await send(
            ws, type="synthesize", text=TEXT, mode="speak", format="pcm", word_timestamps=True
        )
        frames = await until_end(ws)
    segments = events(frames, "segment")
    assert segments[0]["spoken"] == "A ticket costs three dollars fifty today."
    assert segments[1]["spoken"] == "Trains leave every twelve minutes until midnight."
    words = events(frames, "words")
    check_words(TEXT, segments, words)
    # Each segment's words come after its audio and before the next segment.
    kinds = [f["type"] if isinstance(f, dict) else "audio" for f in frames]
    assert kinds.index("words") > kinds.index("audio") and kinds[-1] == "finished"
    assert all(w["estimated"] is False for w in words)  # espeak says where its words are


async def test_ws_without_timestamps_or_normalization(app_factory: AppFactory) -> None:
    app = await app_factory()
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", text=TEXT, mode="speak", normalization="off")
        frames = await until_end(ws)
    assert events(frames, "words") == []
    assert all("spoken" not in s for s in events(frames, "segment"))
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", text=TEXT, mode="speak", normalization="maybe")
        assert (await receive(ws))["code"] == "invalid_request"


async def test_grpc_words_and_spoken(app_factory: AppFactory) -> None:
    app = await app_factory()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.SynthesizerStub(channel)
        request = pb.SynthesizeRequest(
            text=TEXT, mode=pb.MODE_SPEAK, format=pb.AUDIO_FORMAT_PCM, word_timestamps=True
        )
        responses = [r async for r in stub.Synthesize(request)]
    segments = [r.segment for r in responses if r.HasField("segment")]
    words = [r.words for r in responses if r.HasField("words")]
    assert segments[0].spoken == "A ticket costs three dollars fifty today."
    assert [w.segment_index for w in words] == [s.index for s in segments]
    assert words[0].words[3].text == "$3.50"
    assert TEXT[words[0].words[3].text_offset :].startswith("$3.50")


async def test_a_cancel_with_the_playback_position_says_what_was_heard(
    app_factory: AppFactory,
) -> None:
    app = await app_factory()
    text = "One two three four. " * 30
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", id="h1", text=text, mode="speak", format="pcm")
        assert (await receive(ws))["type"] == "started"
        frames: list[dict | bytes] = []
        while len(events(frames, "segment")) < 2:  # the first segment's audio is whole
            frames.append(await receive(ws))
        await send(ws, type="cancel", id="h1", played_ms=10_000_000)
        last = (await until_end(ws))[-1]
    assert last["type"] == "cancelled"
    heard = last["heard_text"]
    first = events(frames, "segment")[0]["text"]
    assert heard.startswith(first) and text.startswith(heard)


async def test_an_interrupted_reply_is_remembered_as_far_as_it_was_heard(
    app_factory: AppFactory,
) -> None:
    app = await app_factory()
    spy = SpyChat()
    app.synthesizer.engines.chat = spy
    question = "One two three four five six seven. " * 8
    async with open_ws(ws_url(app)) as ws:
        await send(ws, type="synthesize", id="c1", text=question, format="pcm")
        frames: list[dict | bytes] = []
        while len(events(frames, "segment")) < 2:
            frames.append(await receive(ws))
        first = events(frames, "segment")[0]
        await send(ws, type="cancel", id="c1", played_ms=10_000_000)
        cancelled = (await until_end(ws))[-1]
        heard = cancelled["heard_text"]
        assert heard.startswith(first["text"]) and len(heard) < len(question)
        await send(ws, type="synthesize", id="c2", text="And then?", format="pcm")
        assert (await until_end(ws))[-1]["type"] == "finished"
    # The next turn's conversation carries the interrupted reply as far as it was heard.
    assistant = [m.content for m in spy.calls[-1] if m.role == "assistant"]
    assert assistant == [heard]


async def test_the_lexicon_applies_and_a_reload_keeps_it_when_the_file_is_bad(
    app_factory: AppFactory, tmp_path: Path
) -> None:
    lexicon = tmp_path / "lexicon.tsv"
    lexicon.write_text("# names\nvoxrelay\tvox relay\n", encoding="utf-8")
    app = await app_factory(lexicon_file=lexicon)

    async def spoken(text: str) -> str:
        async with open_ws(ws_url(app)) as ws:
            await send(ws, type="synthesize", text=text, mode="speak", format="pcm")
            return str(events(await until_end(ws), "segment")[0].get("spoken", ""))

    assert await spoken("Try Voxrelay today.") == "Try vox relay today."
    lexicon.write_text("voxrelay\n", encoding="utf-8")  # no tab: a bad line
    app.reload()
    assert await spoken("Try Voxrelay today.") == "Try vox relay today."
    lexicon.write_text("voxrelay\tvoice relay\n", encoding="utf-8")
    app.reload()
    assert await spoken("Try Voxrelay today.") == "Try voice relay today."


def test_a_bad_lexicon_stops_start_up_naming_the_line(tmp_path: Path) -> None:
    lexicon = tmp_path / "lexicon.tsv"
    lexicon.write_text("good\tfine\nbroken line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"VOXRELAY_LEXICON_FILE.*:2"):
        make_settings(lexicon_file=lexicon)
