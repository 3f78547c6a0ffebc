"""Talk to voxrelay over WebSocket: the smallest useful client.

Start the server (`make run`), then:  python examples/ws_client.py "Tell me a joke."
Only needs `pip install websockets`. The audio is written to answer.mp3.
"""

import asyncio
import json
import sys
from pathlib import Path

from websockets.asyncio.client import connect

URL = "ws://127.0.0.1:8765/v1/stream"


async def speak(text: str, cancel_after_segments: int | None = None) -> bytes:
    audio = bytearray()
    # compression=None: audio does not compress, and voxrelay turns permessage-deflate off.
    async with connect(URL, compression=None) as ws:
        # Only "type" and "text" are required; "id" lets you match events to requests.
        request = {
            "type": "synthesize",
            "id": "q1",
            "text": text,
            "mode": "chat",  # "speak" reads the text itself aloud, no LLM
            "format": "mp3",  # or pcm, wav, opus, flac, aac, mulaw, alaw
        }
        await ws.send(json.dumps(request))
        async for message in ws:
            # Binary frames are the audio, in order: together they make one file.
            if isinstance(message, bytes):
                audio += message
                continue
            # Text frames are JSON events about the stream.
            event = json.loads(message)
            if event["type"] == "started":
                print(f"voice {event['voice']}, {event['content_type']}")
            elif event["type"] == "segment":
                print(f"[{event['start_ms']:>6} ms] {event['text']}")
                # To stop early, send a cancel: the server answers "cancelled", and
                # not one more byte of this stream follows it.
                if (
                    cancel_after_segments is not None
                    and event["index"] + 1 >= cancel_after_segments
                ):
                    await ws.send(json.dumps({"type": "cancel", "id": "q1"}))
            elif event["type"] == "cancelled":
                print(f"cancelled after {event['audio_ms']} ms of audio")
                break
            elif event["type"] == "finished":
                print(
                    f"{event['audio_ms']} ms of audio; first audio after "
                    f"{event['time_to_first_audio_ms']} ms"
                )
                break
            elif event["type"] == "error":
                # code is one of invalid_request, busy, too_large, upstream_error, …
                print(f"error {event['code']}: {event['message']}", file=sys.stderr)
                break
        # The connection could serve more requests; leaving the block closes it.
    return bytes(audio)


if __name__ == "__main__":
    text = " ".join(sys.argv[1:]) or "Say hello to a newcomer in two sentences."
    Path("answer.mp3").write_bytes(asyncio.run(speak(text)))
