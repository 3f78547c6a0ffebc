"""Speak your own LLM's reply while it is written: an OpenAI-compatible chat stream, piped
from the caller's side into voxrelay's streamed input (gRPC ``SynthesizeStream``).

This is the shape of a voice agent that runs its own LLM (Pipecat, LiveKit, your service):
voxrelay needs no LLM key, cuts the tokens into sentences as they come and streams the
audio back; the first sentence is heard while the model is still writing the rest.

Start the server (`make run`), then, with any OpenAI-compatible server:

    OPENAI_API_KEY=sk-… python examples/llm_to_speech.py "Tell me a short story."
    OPENAI_BASE_URL=http://127.0.0.1:11434/v1 LLM_MODEL=llama3.2 python examples/llm_to_speech.py

VOXRELAY_TARGET (HOST:PORT for gRPC, ws://HOST:PORT for the WebSocket door) and
VOXRELAY_API_KEY name the voxrelay server. The audio is written to reply.mp3 (OUT).
"""

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from openai import AsyncOpenAI

from voxrelay.client import FLUSH, AudioChunk, Client, Flush, SegmentStarted, StreamFinished
from voxrelay.service.errors import VoxrelayError

TARGET = os.environ.get("VOXRELAY_TARGET", "127.0.0.1:50051")
KEY = os.environ.get("VOXRELAY_API_KEY")
MODEL = os.environ.get("LLM_MODEL", "gpt-4o-mini")
OUT = Path(os.environ.get("OUT", "reply.mp3"))


async def tokens(llm: AsyncOpenAI, prompt: str) -> AsyncIterator[str | Flush]:
    """Yield the LLM's reply as it is written, then a flush for whatever is left."""
    stream = await llm.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer in a few plain spoken sentences."},
            {"role": "user", "content": prompt},
        ],
        stream=True,
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    yield FLUSH  # not needed at the end (the end speaks the rest), shown for tool calls etc.


async def main(prompt: str) -> bytes:
    began = time.perf_counter()
    llm = AsyncOpenAI()  # OPENAI_API_KEY / OPENAI_BASE_URL, as the SDK reads them
    audio = bytearray()
    async with Client(TARGET, api_key=KEY, timeout=120) as client:
        async for event in client.synthesize_stream(tokens(llm, prompt), format="mp3"):
            if isinstance(event, AudioChunk):
                audio += event.data  # in order: together they make one file (play it now)
            elif isinstance(event, SegmentStarted):
                at = (time.perf_counter() - began) * 1000
                print(f"[{at:7.0f} ms] {event.text}")
            elif isinstance(event, StreamFinished):
                print(f"{event.audio_ms} ms of audio in {event.segments} segments → {OUT}")
    await llm.close()
    return bytes(audio)


if __name__ == "__main__":
    prompt = " ".join(sys.argv[1:]) or "Describe a sunrise in three sentences."
    try:
        reply = asyncio.run(main(prompt))
    except VoxrelayError as exc:  # typed: RateLimited, TooLarge, ConnectionFailed, …
        sys.exit(f"voxrelay said {exc.code}: {exc.message}")
    OUT.write_bytes(reply)
