"""Speak text with libespeak-ng, the embedded speech engine.

libespeak-ng keeps global state and is not thread-safe. So a process has one runtime:
the loaded library, the one worker thread that makes every call into it, and the synth
callback. Engines share that runtime (reference-counted), and jobs from concurrent
streams queue on its thread — fine, as espeak-ng is hundreds of times faster than real
time. The library runs in synchronous mode: ``espeak_Synth`` calls our callback with
~100 ms of PCM at a time, and each chunk is handed to the waiting event loop at once.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import math
import sys
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import espeakng_loader

from ..errors import Internal, InvalidRequest, Unavailable, UpstreamTimeout
from ..model import Voice

__all__ = ["EspeakEngine"]

_T = TypeVar("_T")

# From espeak-ng's speak_lib.h.
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
_SAMPLE_RATE = 22050  # espeak-ng's native rate (mbrola voices, which differ, are not offered)
_BASE_RATE = 175  # words per minute at speed 1.0
_MIN_RATE, _MAX_RATE = 80, 450


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


def _load_library() -> ctypes.CDLL:
    """Load libespeak-ng and declare the functions voxrelay calls."""
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
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = ctypes.c_int
    return lib


@dataclass(frozen=True, slots=True)
class _VoiceEntry:
    """One voice as espeak lists it, with the name voxrelay offers for it."""

    name: str  # the identifier's last part, lower case: "en-us", "fr", "de"
    language: str  # its main language: "en-us", "fr-fr", "de"
    identifier: str  # the voice file: "gmw/en-US"
    title: str  # espeak's display name: "English (America)"
    languages: tuple[tuple[int, str], ...]  # (priority, language); lower priority wins


def _read_languages(address: int | None) -> tuple[tuple[int, str], ...]:
    """Decode espeak's packed (priority, language) list."""
    pairs: list[tuple[int, str]] = []
    while address:
        priority = ctypes.c_ubyte.from_address(address).value
        if priority == 0:
            break
        raw = ctypes.string_at(address + 1)
        pairs.append((priority, raw.decode("utf-8", "replace")))
        address += len(raw) + 2
    return tuple(pairs)


class _Job:
    """One synthesis: the bridge between the espeak thread and the stream's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        # Read by the C callback on the espeak thread; a plain bool is enough under the GIL.
        self.cancelled = False
        self._loop = loop

    def put(self, item: bytes | Exception | None) -> None:
        """Hand *item* to the event loop (from the espeak thread)."""
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            self.cancelled = True


class _Runtime:
    """The loaded library and the one thread that calls into it."""

    def __init__(self, previous: Future[None] | None) -> None:
        self.users = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak")
        # The shutdown of an earlier runtime must end before this one initialises.
        self._previous = previous
        self._lib: ctypes.CDLL | None = None
        # Referenced for the runtime's whole life: the library keeps the bare pointer,
        # and a collected callback crashes the process.
        self._callback = _SynthCallback(self._on_audio)
        self._job: _Job | None = None
        self._voices: list[_VoiceEntry] | None = None
        self._loaded_voice: str | None = None

    def submit(self, fn: Callable[[], _T]) -> Future[_T]:
        """Run *fn* on the espeak thread."""
        return self._executor.submit(fn)

    async def aclose(self, terminated: Future[None]) -> None:
        """Wait for *terminated* (the final job), then stop the thread."""
        try:
            await _wait_done(terminated)
        finally:
            # The thread is idle now, so this join is immediate.
            self._executor.shutdown(wait=True)

    # Everything below runs on the espeak thread.

    def _start(self) -> ctypes.CDLL:
        """Load and initialise the library once."""
        if self._lib is not None:
            return self._lib
        if self._previous is not None:
            previous, self._previous = self._previous, None
            wait([previous])  # its outcome is not this runtime's concern
        try:
            lib = _load_library()
            path = espeakng_loader.get_data_path().encode()
        except (OSError, RuntimeError) as exc:
            raise Unavailable(f"espeak-ng is not usable: {exc}") from exc
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, path, _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise Unavailable(f"espeak-ng failed to initialise (status {rate})")
        if rate != _SAMPLE_RATE:
            lib.espeak_Terminate()
            raise Internal(f"espeak-ng runs at {rate} Hz, expected {_SAMPLE_RATE}")
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        return lib

    def terminate(self) -> None:
        """Release the library's state."""
        if self._lib is not None:
            self._lib.espeak_Terminate()
            self._lib = None

    def voice_entries(self) -> list[_VoiceEntry]:
        """List the voices, once."""
        if self._voices is not None:
            return self._voices
        lib = self._start()
        table = lib.espeak_ListVoices(None)
        entries: list[_VoiceEntry] = []
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
            entries.append(_VoiceEntry(name, languages[0][1], identifier, title, languages))
        self._voices = entries
        return entries

    def _resolve(self, voice: str) -> str:
        """Return the identifier of the voice named *voice*: a name, title or language."""
        key = voice.strip().lower().replace("_", "-")
        entries = self.voice_entries()
        for entry in entries:
            if key in (entry.name, entry.identifier.lower(), entry.title.lower()):
                return entry.identifier
        # espeak's own match by language is too loose ("no-such-voice" finds Norwegian),
        # so match exact language codes here, best priority first.
        by_language = [
            (priority, entry.identifier)
            for entry in entries
            for priority, language in entry.languages
            if language.lower() == key
        ]
        if by_language:
            return min(by_language, key=lambda pair: pair[0])[1]
        raise InvalidRequest(
            f"unknown espeak voice {voice!r}; see `voxrelay voices` (or the ListVoices RPC) "
            "for the voices espeak offers"
        )

    def synthesize(self, job: _Job, text: str, voice: str, rate: int) -> None:
        """Speak *text* into *job*, then end it with ``None`` or the error."""
        try:
            if not job.cancelled:
                self._synthesize(job, text, voice, rate)
        except Exception as exc:
            job.put(exc)
        else:
            job.put(None)

    def _synthesize(self, job: _Job, text: str, voice: str, rate: int) -> None:
        lib = self._start()
        identifier = self._resolve(voice)
        if identifier != self._loaded_voice:
            status = lib.espeak_SetVoiceByName(identifier.encode())
            if status != _EE_OK:
                raise Internal(f"espeak-ng could not load voice {identifier!r} (status {status})")
            self._loaded_voice = identifier
        lib.espeak_SetParameter(_RATE, rate, 0)
        # A NUL would end the C string early.
        data = text.replace("\0", " ").encode("utf-8")
        self._job = job
        try:
            status = lib.espeak_Synth(
                data, len(data) + 1, 0, _POS_CHARACTER, 0, _SYNTH_FLAGS, None, None
            )
        finally:
            self._job = None
        if status != _EE_OK and not job.cancelled:
            raise Internal(f"espeak_Synth failed (status {status})")

    def _on_audio(self, wav: int | None, samples: int, events: int | None) -> int:
        """Receive PCM from espeak_Synth; return 1 to make it stop."""
        job = self._job
        if job is None:
            return 0
        if job.cancelled:
            return 1
        try:
            if wav and samples > 0:
                job.put(_to_little_endian(ctypes.string_at(wav, samples * 2)))
        except BaseException:  # an exception must not unwind into C
            job.cancelled = True
        return 1 if job.cancelled else 0


def _to_little_endian(pcm: bytes) -> bytes:
    if sys.byteorder == "little":
        return pcm
    samples = array.array("h", pcm)
    samples.byteswap()
    return samples.tobytes()


# The process's one runtime, shared by every open engine.
_registry_lock = threading.Lock()
_shared: _Runtime | None = None
_last_shutdown: Future[None] | None = None


def _acquire_runtime() -> _Runtime:
    global _shared
    with _registry_lock:
        if _shared is None:
            _shared = _Runtime(previous=_last_shutdown)
        _shared.users += 1
        return _shared


def _release_runtime(runtime: _Runtime) -> Future[None] | None:
    """Drop one user; for the last, queue the library's shutdown and return it."""
    global _shared, _last_shutdown
    with _registry_lock:
        runtime.users -= 1
        if runtime.users > 0:
            return None
        if _shared is runtime:
            _shared = None
        # Queued under the lock, so a runtime created after this waits for it.
        _last_shutdown = runtime.submit(runtime.terminate)
        return _last_shutdown


async def _wait_done(future: Future[None]) -> None:
    """Wait until a job on the espeak thread has ended, even if cancelled meanwhile.

    Returning earlier would let the next job start while this one still runs. A
    cancellation that arrives while waiting is re-raised once the job is over.
    """
    waiter = asyncio.wrap_future(future)
    cancelled = False
    while not waiter.done():
        try:
            await asyncio.wait([waiter])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _rate(speed: float) -> int:
    """Turn a speed factor (0 meaning 1.0) into espeak's words per minute."""
    if speed == 0:
        speed = 1.0
    if not math.isfinite(speed) or speed < 0:
        raise InvalidRequest(f"speed must be a positive number, got {speed}")
    return min(_MAX_RATE, max(_MIN_RATE, round(_BASE_RATE * speed)))


class EspeakEngine:
    """Speak with libespeak-ng in this process, off the event loop.

    Engines share one library instance and one thread; each must be closed with
    :meth:`aclose`, and the last close releases the library.
    """

    name: str = "espeak"
    model: str = "espeak-ng"
    sample_rate: int = _SAMPLE_RATE
    max_speed: float = 4.0
    validates_voices: bool = True

    def __init__(self, default_voice: str = "en-us") -> None:
        self.default_voice = default_voice
        self._runtime: _Runtime | None = _acquire_runtime()
        self._voices: list[Voice] | None = None

    def _require_runtime(self) -> _Runtime:
        if self._runtime is None:
            raise Unavailable("the espeak engine is closed")
        return self._runtime

    async def voices(self) -> list[Voice]:
        """List espeak's voices; a voice's ``name`` is what ``voice`` accepts."""
        if self._voices is None:
            runtime = self._require_runtime()
            entries = await asyncio.wrap_future(runtime.submit(runtime.voice_entries))
            self._voices = [Voice(entry.name, entry.language) for entry in entries]
        return list(self._voices)

    def synthesize(
        self, text: str, *, voice: str, speed: float, instructions: str, timeout: float
    ) -> AsyncGenerator[bytes, None]:
        """Yield PCM for *text* as espeak produces it, about 100 ms per chunk.

        *voice* is a name from :meth:`voices`, an espeak voice title or a language code
        ("" means the default voice). *instructions* has no meaning for espeak. *timeout*
        caps the wait for each chunk. Closing the iterator early stops espeak and
        returns once its thread is free.
        """
        del instructions
        return self._speak(text, voice or self.default_voice, speed, chunk_timeout=timeout)

    async def _speak(
        self, text: str, voice: str, speed: float, *, chunk_timeout: float
    ) -> AsyncGenerator[bytes, None]:
        runtime = self._require_runtime()
        rate = _rate(speed)
        job = _Job(asyncio.get_running_loop())
        future = runtime.submit(lambda: runtime.synthesize(job, text, voice, rate))
        try:
            while True:
                try:
                    async with asyncio.timeout(chunk_timeout if chunk_timeout > 0 else None):
                        item = await job.queue.get()
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"espeak produced no audio for {chunk_timeout:g} s"
                    ) from None
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled = True  # makes the callback abort if espeak is still speaking
            if not future.cancel():  # a job still queued is simply dropped
                await _wait_done(future)

    async def aclose(self) -> None:
        """Release this engine; the last one open shuts the library and its thread down."""
        runtime, self._runtime = self._runtime, None
        if runtime is None:
            return
        terminated = _release_runtime(runtime)
        if terminated is not None:
            await runtime.aclose(terminated)
