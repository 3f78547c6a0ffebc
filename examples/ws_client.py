"""Talk to voxrelay over WebSocket: the smallest useful client, the protocol by hand.

Start the server (`make run`), then:  python examples/ws_client.py "Tell me a joke."
Only needs `pip install websockets`: this is the protocol a client in any language speaks.
A Python service would rather use the client library (examples/client.py). The audio is
written to answer.mp3 (only when the stream finished). Set VOXRELAY_WS_URL to talk to
another server, and VOXRELAY_API_KEY if it requires a key.
"""

import asyncio
import json
import os
import sys
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

URL = os.environ.get("VOXRELAY_WS_URL", "ws://127.0.0.1:8765/v1/stream")
KEY = os.environ.get("VOXRELAY_API_KEY")
OUT = Path("answer.mp3")


async def speak(text: str, cancel_after_segments: int | None = None) -> bytes | None:
    """Return the stream's audio, or None when the server refused it or it was cancelled."""
    audio = bytearray()
    # compression=None: audio does not compress, and voxrelay turns permessage-deflate off.
    # A key goes in the Authorization header (browsers send an "auth" frame instead).
    headers = {"Authorization": f"Bearer {KEY}"} if KEY else None
    async with connect(URL, compression=None, additional_headers=headers) as ws:
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
                return None
            elif event["type"] == "finished":
                print(
                    f"{event['audio_ms']} ms of audio; first audio after "
                    f"{event['time_to_first_audio_ms']} ms"
                )
                return bytes(audio)
            elif event["type"] == "error":
                # code is one of invalid_request, busy, too_large, upstream_error, …
                # retryable errors say how long to wait in retry_after_ms.
                print(f"error {event['code']}: {event['message']}", file=sys.stderr)
                return None
        # The connection could serve more requests; leaving the block closes it.
    print("the server closed the connection before the stream finished", file=sys.stderr)
    return None


if __name__ == "__main__":
    text = " ".join(sys.argv[1:]) or "Say hello to a newcomer in two sentences."
    try:
        answer = asyncio.run(speak(text))
    except OSError as exc:
        sys.exit(f"cannot reach voxrelay at {URL}: {exc} (is `make run` running?)")
    except InvalidStatus as exc:  # e.g. 401: a wrong VOXRELAY_API_KEY
        sys.exit(f"voxrelay refused the connection: HTTP {exc.response.status_code}")
    except ConnectionClosedError as exc:  # e.g. 1008: this server requires an API key
        sys.exit(f"voxrelay closed the connection: {exc.rcvd}")
    if answer is None:
        sys.exit(1)
    OUT.write_bytes(answer)
    print(f"wrote {OUT}")
