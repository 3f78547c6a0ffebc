"""Talk to voxrelay from a Python service with the client library.

Start the server (`make run`), then:  python examples/client.py "Tell me a joke."
Set VOXRELAY_TARGET to another server (HOST:PORT for gRPC, ws://HOST:PORT for the WebSocket
door; same events either way) and VOXRELAY_API_KEY if it requires a key. The audio is
written to answer.mp3 once the stream finished. (examples/ws_client.py speaks the WebSocket
protocol by hand, for clients in other languages.)
"""

import asyncio
import os
import sys
from pathlib import Path

from voxrelay.client import AudioChunk, Client, SegmentStarted, StreamFinished, StreamStarted
from voxrelay.service.errors import VoxrelayError

TARGET = os.environ.get("VOXRELAY_TARGET", "127.0.0.1:50051")
KEY = os.environ.get("VOXRELAY_API_KEY")
OUT = Path("answer.mp3")


async def speak(text: str) -> bytes:
    audio = bytearray()
    async with Client(TARGET, api_key=KEY, timeout=60) as client:
        async for event in client.synthesize(text, format="mp3"):
            if isinstance(event, AudioChunk):  # in order: together they make one file
                audio += event.data
            elif isinstance(event, StreamStarted):
                print(f"voice {event.voice}, {event.content_type}")
            elif isinstance(event, SegmentStarted):
                print(f"[{event.start_ms:>6} ms] {event.text}")
                # To stop early, just leave the loop: the client cancels the stream.
            elif isinstance(event, StreamFinished):
                ttfa = event.time_to_first_audio_ms
                print(f"{event.audio_ms} ms of audio; first audio after {ttfa} ms")
    return bytes(audio)


if __name__ == "__main__":
    text = " ".join(sys.argv[1:]) or "Say hello to a newcomer in two sentences."
    try:
        answer = asyncio.run(speak(text))
    except VoxrelayError as exc:  # typed: RateLimited, TooLarge, ConnectionFailed, …
        wait = f" (retry in {exc.retry_after_s:.1f} s)" if exc.retry_after_s else ""
        sys.exit(f"voxrelay said {exc.code}: {exc.message}{wait}")
    except TimeoutError:
        sys.exit("voxrelay did not finish within 60 s")
    OUT.write_bytes(answer)
    print(f"wrote {OUT}")
