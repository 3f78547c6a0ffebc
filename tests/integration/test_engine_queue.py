"""The embedded engine's queue, seen through a real WebSocket server.

A request that waits for an espeak worker is not waiting on an upstream: however long
the wait, it is no ``upstream_timeout`` and never opens the speech stage's breaker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tests.conftest import AppFactory
from voxrelay.client import AudioChunk, Client, StreamFinished

BIG = "Every caller waits its turn, and none of them opens the breaker. " * 600
WAIT = 30.0


async def say(client: Client, text: str) -> tuple[StreamFinished, bytes]:
    """Speak *text* over the WebSocket door; return its finished event and its audio."""
    events = [event async for event in client.synthesize(text, mode="speak", format="pcm")]
    finished = events[-1]
    assert isinstance(finished, StreamFinished)
    return finished, b"".join(e.data for e in events if isinstance(e, AudioChunk))


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


async def test_waiting_for_a_worker_never_opens_the_breaker(app_factory: AppFactory) -> None:
    app = await app_factory(
        espeak_workers=1, tts_timeout_s=0.5, breaker_failures=1, upstream_retries=0
    )
    url = f"ws://127.0.0.1:{app.ws_port}/v1/stream"
    speech = app.synthesizer.engines.speech
    breaker = app.synthesizer.engines.tts_stage.breaker
    async with Client(url, timeout=WAIT) as client:
        await say(client, "Warm up.")

        # Another caller takes the one worker, and queues a second job behind it.
        hogs = [
            speech.synthesize(BIG, voice="", speed=0.25, instructions="", timeout=WAIT)
            for _ in range(2)
        ]
        await anext(hogs[0])
        # Read the first hog as it is made, so it keeps its worker for its whole long text
        # (a job nobody reads would be let run to its end and give the worker up sooner).
        reading = asyncio.create_task(_drain(hogs[0]))
        queued_hog = asyncio.create_task(anext(hogs[1]))

        request = asyncio.create_task(say(client, "Hello there, in turn."))
        # Past the stage's whole timeout, the request still waits its turn, unharmed.
        done, _ = await asyncio.wait({request}, timeout=1.5)
        assert not done
        assert not breaker.is_open

        reading.cancel()
        queued_hog.cancel()
        for hog in hogs:
            await hog.aclose()
        finished, audio = await asyncio.wait_for(request, WAIT)
        assert finished.audio_bytes == len(audio) > 22050
        assert not breaker.is_open
        assert (await say(client, "And again."))[1]
