"""One espeak worker process: libespeak-ng loaded once, speaking one job at a time.

Run as ``python -m voxrelay.service.providers.espeak_worker FD``, where FD is one end of
a socket pair whose other end the parent (:mod:`.espeak`) holds. The library keeps
global state and is not thread-safe, so this process is single-threaded: it reads a job,
calls ``espeak_Synth`` in synchronous mode, and from the synth callback sends each
~100 ms chunk of PCM as it is made. A job carries a credit of chunks; the callback
sends no chunk beyond it and blocks until the parent grants more (its consumer took
some) or cancels the job, which the callback answers by returning 1 so that espeak
stops. A crash here (libespeak-ng has had out-of-bounds reads on crafted text) ends
only this process; the parent fails the job it was speaking and starts another.

The wire format is shared with the parent: a header ``<BII`` (kind, job id, payload
size) and the payload. This module imports nothing of voxrelay's but itself, so a
worker starts in a fresh interpreter in well under a second.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import socket
import struct
import sys
from collections import deque
from dataclasses import dataclass

__all__ = [
    "AUDIO",
    "CANCEL",
    "CREDIT",
    "END",
    "HEADER",
    "HELLO",
    "JOB",
    "SAMPLE_RATE",
    "WORD",
    "WORDS",
    "frame",
    "job_payload",
]

# The wire: what the parent sends …
JOB = 1  # payload: <HI (rate, credit), then the voice identifier, NUL, the UTF-8 text
CREDIT = 2  # payload: <I more chunks the job may send
CANCEL = 3  # no payload; the job ends as soon as espeak returns to the callback
# … and what the worker sends.
HELLO = 10  # JSON: {"voices": [[name, language, identifier, title, [[prio, lang], …]], …]}
AUDIO = 11  # s16le PCM
END = 12  # JSON: {"chunks": n, "cancelled": bool, "error": null or a message}
WORDS = 13  # <iii per word begun in the AUDIO that follows: offset, length, ms (see WORD)

HEADER = struct.Struct("<BII")
#: One word event: its offset (from 0) and length in characters of the text, and the
#: audio time it starts at, in ms from the start of the job's audio.
WORD = struct.Struct("<iii")
_JOB_FIELDS = struct.Struct("<HI")
_COUNT = struct.Struct("<I")

# From espeak-ng's speak_lib.h.
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exit() when data is missing
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # a sentence pause at the end, so consecutive segments do not run together
_RATE = 1
_EE_OK = 0

# Without espeakSSML in the flags, markup such as "<b>" is read as text, never parsed.
_SYNTH_FLAGS = _CHARS_UTF8 | _ENDPAUSE
_BUFFER_MS = 100
_POLL_EVERY = 4  # chunks between looks at the socket for a cancel
SAMPLE_RATE = 22050  # espeak-ng's native rate (mbrola voices, which differ, are not offered)


def frame(kind: int, job: int, payload: bytes = b"") -> bytes:
    """Return one message of the wire format."""
    return HEADER.pack(kind, job, len(payload)) + payload


def job_payload(rate: int, credit: int, identifier: str, text: str) -> bytes:
    """Return the payload of a ``JOB`` message."""
    # A NUL would end the C string early.
    spoken = text.replace("\0", " ").encode("utf-8", "replace")  # a lone surrogate: "?"
    return _JOB_FIELDS.pack(rate, credit) + identifier.encode() + b"\0" + spoken


class _VoiceStruct(ctypes.Structure):
    """``espeak_VOICE``."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        # (priority byte, NUL-terminated language) pairs, ended by a zero priority byte
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# int (*)(short *wav, int numsamples, espeak_EVENT *events); returning 1 aborts synthesis.
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)


class _Event(ctypes.Structure):
    """``espeak_EVENT``; an array of them ends with type ``espeakEVENT_LIST_TERMINATED``."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # from 1, in characters of the input
        ("length", ctypes.c_int),  # of the word, in characters
        ("audio_position", ctypes.c_int),  # ms from the start of the synthesis
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # a union: a number, a name pointer, or a string
    ]


def _words(events: int) -> bytes:
    """Pack the word events of one callback's event list (see :data:`WORD`)."""
    packed = bytearray()
    array_of = ctypes.cast(events, ctypes.POINTER(_Event))
    i = 0
    while (event := array_of[i]).type != _EVENT_LIST_TERMINATED:
        if event.type == _EVENT_WORD:
            packed += WORD.pack(event.text_position - 1, event.length, event.audio_position)
        i += 1
    return bytes(packed)


def _load_library() -> ctypes.CDLL:
    """Load and initialise libespeak-ng; declare the functions voxrelay calls."""
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceStruct))
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,  # text
        ctypes.c_size_t,  # size
        ctypes.c_uint,  # position
        ctypes.c_int,  # position_type
        ctypes.c_uint,  # end_position
        ctypes.c_uint,  # flags
        ctypes.c_void_p,  # unique_identifier
        ctypes.c_void_p,  # user_data
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    path = espeakng_loader.get_data_path().encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, path, _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise RuntimeError(f"espeak-ng failed to initialise (status {rate})")
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng runs at {rate} Hz, expected {SAMPLE_RATE}")
    return lib


def _read_languages(address: int | None) -> list[tuple[int, str]]:
    """Decode espeak's packed (priority, language) list."""
    pairs: list[tuple[int, str]] = []
    while address:
        priority = ctypes.c_ubyte.from_address(address).value
        if priority == 0:
            break
        raw = ctypes.string_at(address + 1)
        pairs.append((priority, raw.decode("utf-8", "replace")))
        address += len(raw) + 2
    return pairs


def _list_voices(lib: ctypes.CDLL) -> list[list[object]]:
    """Return [name, language, identifier, title, languages] for each voice offered."""
    table = lib.espeak_ListVoices(None)
    voices: list[list[object]] = []
    seen: set[str] = set()
    index = 0
    while table and table[index]:
        raw = table[index].contents
        index += 1
        identifier = (raw.identifier or b"").decode("utf-8", "replace")
        languages = _read_languages(raw.languages)
        name = identifier.rsplit("/", 1)[-1].lower()
        # mbrola voices need an external synthesiser and change the sample rate.
        if not name or not languages or identifier.startswith("mb/") or name in seen:
            continue
        seen.add(name)
        title = (raw.name or b"").decode("utf-8", "replace").strip()
        voices.append([name, languages[0][1], identifier, title, languages])
    return voices


class _Channel:
    """The worker's end of the socket: whole messages in, frames out."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self.inbox: deque[tuple[int, int, bytes]] = deque()
        self.closed = False

    def send(self, kind: int, job: int, payload: bytes = b"") -> None:
        header = HEADER.pack(kind, job, len(payload))
        sent = self._sock.sendmsg([header, payload])
        if sent < len(header) + len(payload):  # the socket was full: send the rest whole
            self._sock.sendall((header + payload)[sent:])

    def poll(self, *, block: bool) -> None:
        """Read what has arrived into :attr:`inbox`; with *block*, wait for one message."""
        flags = 0 if block else socket.MSG_DONTWAIT
        while not self.closed:
            try:
                data = self._sock.recv(65536, flags)
            except BlockingIOError:
                return
            if not data:
                self.closed = True  # the parent is gone or closed us: time to exit
                return
            self._buffer += data
            self._parse()
            if self.inbox:
                flags = socket.MSG_DONTWAIT  # take what else is there, without waiting

    def _parse(self) -> None:
        while len(self._buffer) >= HEADER.size:
            kind, job, size = HEADER.unpack_from(self._buffer)
            end = HEADER.size + size
            if len(self._buffer) < end:
                return
            self.inbox.append((kind, job, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]


@dataclass
class _Job:
    id: int
    credit: int
    chunks: int = 0
    cancelled: bool = False


class _Worker:
    """The loaded library and the job it is speaking."""

    def __init__(self, channel: _Channel, lib: ctypes.CDLL) -> None:
        self._channel = channel
        self._lib = lib
        self._job: _Job | None = None
        self._voice: str | None = None
        # Referenced for the process's whole life: the library keeps the bare pointer.
        self._callback = _SynthCallback(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def serve(self) -> None:
        """Speak jobs until the parent closes the socket."""
        channel = self._channel
        while True:
            if not channel.inbox:
                channel.poll(block=True)
            if channel.closed and not channel.inbox:
                return
            kind, job, payload = channel.inbox.popleft()
            if kind == JOB:
                self._speak(job, payload)
            # A CREDIT or CANCEL for a job already over is simply late.

    def _speak(self, job_id: int, payload: bytes) -> None:
        rate, credit = _JOB_FIELDS.unpack_from(payload)
        identifier, _, text = payload[_JOB_FIELDS.size :].partition(b"\0")
        job = self._job = _Job(job_id, credit)
        error: str | None = None
        try:
            if identifier != self._voice:
                status = self._lib.espeak_SetVoiceByName(identifier)
                if status != _EE_OK:
                    raise RuntimeError(f"espeak-ng could not load voice {identifier!r} ({status})")
                self._voice = identifier
            self._lib.espeak_SetParameter(_RATE, rate, 0)
            status = self._lib.espeak_Synth(
                text, len(text) + 1, 0, _POS_CHARACTER, 0, _SYNTH_FLAGS, None, None
            )
            if status != _EE_OK and not job.cancelled:
                raise RuntimeError(f"espeak_Synth failed (status {status})")
        except Exception as exc:
            error = str(exc)
        finally:
            self._job = None
        if not self._channel.closed:
            summary = {"chunks": job.chunks, "cancelled": job.cancelled, "error": error}
            self._channel.send(END, job_id, json.dumps(summary).encode())

    def _on_audio(self, wav: int | None, samples: int, events: int | None) -> int:
        """Receive PCM from espeak_Synth; return 1 to make it stop."""
        job = self._job
        if job is None:
            return 0
        try:
            # A cancel is looked for every few chunks (a few ms of work at most).
            if job.chunks % _POLL_EVERY == _POLL_EVERY - 1 or job.credit <= 0:
                self._take_messages(job, block=False)
            if events and not job.cancelled and (words := _words(events)):
                self._channel.send(WORDS, job.id, words)  # before the audio they start in
            if wav and samples > 0 and not job.cancelled:
                while job.credit <= 0 and not job.cancelled:
                    self._take_messages(job, block=True)
                if not job.cancelled:
                    self._channel.send(AUDIO, job.id, _little_endian(wav, samples))
                    job.credit -= 1
                    job.chunks += 1
        except BaseException:  # an exception must not unwind into C
            job.cancelled = True
        return 1 if job.cancelled else 0

    def _take_messages(self, job: _Job, *, block: bool) -> None:
        """Apply the credits and cancels for *job* that have arrived; keep later jobs."""
        channel = self._channel
        channel.poll(block=block)
        if channel.closed:
            job.cancelled = True
            return
        kept: deque[tuple[int, int, bytes]] = deque()
        while channel.inbox:
            kind, target, payload = channel.inbox.popleft()
            if kind == JOB:
                kept.append((kind, target, payload))
            elif target == job.id:
                if kind == CANCEL:
                    job.cancelled = True
                elif kind == CREDIT:
                    job.credit += _COUNT.unpack(payload)[0]
        channel.inbox = kept


def _little_endian(wav: int, samples: int) -> bytes:
    pcm = ctypes.string_at(wav, samples * 2)
    if sys.byteorder == "little":
        return pcm
    swapped = array.array("h", pcm)
    swapped.byteswap()
    return swapped.tobytes()


def main(argv: list[str]) -> int:
    channel = _Channel(socket.socket(fileno=int(argv[0])))
    # The parent going away (a broken pipe) ends this process quietly: nobody listens.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        try:
            lib = _load_library()
        except (OSError, RuntimeError) as exc:
            failure = {"error": f"espeak-ng is not usable: {exc}"}
            channel.send(HELLO, 0, json.dumps(failure).encode())
            return 1
        channel.send(HELLO, 0, json.dumps({"voices": _list_voices(lib)}).encode())
        _Worker(channel, lib).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
