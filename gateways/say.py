"""``voxrelay say`` and ``voxrelay voices``: the command line on :mod:`voxrelay.client`.

``say`` sends one request over either door, writes the audio as it streams in and prints
the timings; ``voices`` lists the engine's voices. Where the server is, and the key, come
from the flags, else from the variables the server reads (``VOXRELAY_HOST``,
``VOXRELAY_GRPC_PORT``, ``VOXRELAY_WS_PORT``) and ``VOXRELAY_API_KEY``. Failures become one
``voxrelay: …`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import dataclasses
import json
import os
import ssl
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from voxrelay.client import (
    FLUSH,
    AudioChunk,
    AudioFormat,
    Client,
    ConnectionFailed,
    Event,
    Flush,
    SegmentStarted,
    StreamFinished,
    StreamStarted,
    Via,
)
from voxrelay.service.errors import VoxrelayError

from .errors import GRPC_STATUS

__all__ = [
    "EXIT_INTERRUPTED",
    "FORMAT_BY_SUFFIX",
    "CliError",
    "ClientEnvironment",
    "UsageError",
    "cmd_say",
    "cmd_voices",
    "fail",
    "stdin_pieces",
]

#: The format a file name asks for, when ``--format`` is not given.
FORMAT_BY_SUFFIX = {
    ".pcm": AudioFormat.PCM,
    ".raw": AudioFormat.PCM,
    ".s16": AudioFormat.PCM,
    ".wav": AudioFormat.WAV,
    ".mp3": AudioFormat.MP3,
    ".opus": AudioFormat.OPUS,
    ".ogg": AudioFormat.OPUS,
    ".flac": AudioFormat.FLAC,
    ".aac": AudioFormat.AAC,
    ".ulaw": AudioFormat.MULAW,
    ".mulaw": AudioFormat.MULAW,
    ".mu": AudioFormat.MULAW,
    ".alaw": AudioFormat.ALAW,
    ".al": AudioFormat.ALAW,
}

EXIT_INTERRUPTED = 130

#: Bind addresses that mean "every interface": a client on this host uses loopback.
_ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}


class CliError(Exception):
    """A failure to report as one ``voxrelay: …`` line (exit code 1)."""


class UsageError(CliError):
    """Flags that do not go together (exit code 2)."""


def fail(message: str, code: int = 1) -> int:
    print(f"voxrelay: {message}", file=sys.stderr)
    return code


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _silence_stdout() -> None:
    """After a closed pipe, make Python's final flush of stdout a no-op."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


class ClientEnvironment(BaseSettings):
    """Where the client commands find the server: the variables (and .env) it reads."""

    model_config = SettingsConfigDict(
        env_prefix="VOXRELAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    ws_port: int = Field(8765, ge=0, le=65535)
    #: this client's key (the server's own are ``VOXRELAY_API_KEYS``).
    api_key: SecretStr | None = None

    def target(self, via: Via) -> str:
        """Return ``HOST:PORT`` of the server's *via* door, as a client on this host reaches it."""
        host = "127.0.0.1" if self.host.strip() in _ANY_ADDRESS else self.host.strip()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 literal
        port, name = (self.grpc_port, "GRPC") if via == "grpc" else (self.ws_port, "WS")
        if port == 0:
            raise CliError(
                f"VOXRELAY_{name}_PORT is 0 (the server picks a port and logs it):"
                " pass --server HOST:PORT"
            )
        return f"{host}:{port}"


def _environment() -> ClientEnvironment:
    try:
        return ClientEnvironment()
    except ValidationError as exc:
        problem = exc.errors()[0]
        name = "VOXRELAY_" + "_".join(str(part) for part in problem["loc"]).upper()
        raise CliError(f"{name}: {problem['msg']}") from None


def _client(args: argparse.Namespace, via: Via) -> Client:
    """Build the client the flags ask for, the environment filling in what they leave out."""
    env = _environment()
    target = args.server or env.target(via)
    key = args.api_key or (env.api_key.get_secret_value() if env.api_key else None)
    args.key_sent = bool(key)
    tls = args.ca or bool(args.tls)
    try:
        return Client(target, via=via, api_key=key or None, tls=tls, timeout=args.timeout)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot use --ca {args.ca}: {exc}") from None
    except ValueError as exc:
        raise CliError(f"--server {target}: {exc}") from None


def _failure(exc: VoxrelayError | TimeoutError, args: argparse.Namespace, via: Via) -> CliError:
    """Say in one line why a call failed, in the words of the door that carried it."""
    if isinstance(exc, TimeoutError):
        return CliError(f"gave up after {args.timeout:g} s (--timeout)")
    if isinstance(exc, ConnectionFailed):
        message = exc.message
        if message.endswith("connection refused"):
            message += " — is the server running? (make run, or voxrelay serve)"
        return CliError(message)
    wire = GRPC_STATUS.get(exc.code, grpc.StatusCode.INTERNAL).name if via == "grpc" else exc.code
    message = f"{wire}: {exc.message}"
    if exc.code == "unauthorized":
        message += (
            " (check the key: VOXRELAY_API_KEY or --api-key)"
            if args.key_sent
            else " (set VOXRELAY_API_KEY, or pass --api-key KEY)"
        )
    if exc.retry_after_s:
        message += f" (retry in {exc.retry_after_s:.1f} s)"
    return CliError(message)


class AudioSink:
    """Where ``say`` writes audio: stdout, or a file opened at the first byte.

    Opening late means a refused request never creates, nor empties, the file.
    """

    def __init__(self, target: str | None) -> None:
        self.path = None if target is None or target == "-" else Path(target)
        self.bytes = 0
        self._file: BinaryIO | None = None

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "stdout"

    def check(self) -> None:
        """Refuse, before any request, an output that cannot work."""
        if self.path is None:
            if sys.stdout.isatty():
                raise CliError("refusing to write audio to a terminal: use -o FILE (or pipe it)")
            return
        if self.path.is_dir():
            raise CliError(f"-o {self.path} is a directory: give a file name")
        parent = self.path.parent
        if not parent.is_dir():
            raise CliError(f"cannot write {self.path}: the directory {parent} does not exist")
        writable = (
            os.access(self.path, os.W_OK) if self.path.exists() else os.access(parent, os.W_OK)
        )
        if not writable:
            raise CliError(f"cannot write {self.path}: permission denied")

    def write(self, data: bytes) -> None:
        try:
            if self._file is None:
                self._file = sys.stdout.buffer if self.path is None else self.path.open("wb")
            self._file.write(data)
            self._file.flush()
        except BrokenPipeError:
            _silence_stdout()
            raise CliError("the program reading the audio closed the pipe") from None
        except OSError as exc:
            raise CliError(f"cannot write {self.where}: {exc.strerror or exc}") from None
        self.bytes += len(data)

    def finish(self) -> None:
        """The stream is complete: make sure the file exists, even if empty."""
        if self._file is None and self.path is not None:
            self.write(b"")
        self.close()

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stdout.buffer:
            self._file.close()

    def partial_note(self) -> str:
        if not self.bytes or self.path is None:
            return ""
        return f"; the {self.bytes} bytes received are in {self.path}"


def _describe_started(event: StreamStarted) -> str:
    parts = [
        f"request {event.request_id}",
        f"voice {event.voice}",
        f"{event.format} ({event.content_type}, {event.sample_rate_hz} Hz)",
    ]
    if event.llm_model:
        parts.append(f"LLM {event.llm_model}")
    if event.tts_model:
        parts.append(f"TTS {event.tts_model}")
    return "  ".join(parts)


def _print_segment(event: SegmentStarted) -> None:
    print(
        f"  [{event.index}] {event.start_ms / 1000:6.2f} s  {event.text.strip()}", file=sys.stderr
    )


def _figures(event: StreamFinished) -> dict[str, Any]:
    figures = dataclasses.asdict(event)
    figures.pop("extra", None)
    return figures


#: Bytes read from stdin at once at most (a read returns what is there, not this much).
STDIN_READ_BYTES = 4096


async def stdin_pieces(*, flush_lines: bool) -> AsyncIterator[str | Flush]:
    """Yield stdin's text as it arrives: typed (each line flushed) or piped (as written).

    The reads run in a daemon thread: a read blocked on a terminal cannot be cancelled,
    and must not keep the process alive once the stream is over.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    fd = sys.stdin.fileno()

    def read() -> None:
        while True:
            try:
                data = os.read(fd, STDIN_READ_BYTES)
            except OSError:
                data = b""
            loop.call_soon_threadsafe(queue.put_nowait, data)
            if not data:
                return

    threading.Thread(target=read, name="stdin", daemon=True).start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while data := await queue.get():
        text = decoder.decode(data)
        if text:
            yield text
            if flush_lines and text.endswith("\n"):
                yield FLUSH  # a line typed is spoken when Enter is pressed
    if rest := decoder.decode(b"", final=True):
        yield rest


def _events(args: argparse.Namespace, client: Client) -> AsyncIterator[Event]:
    options: dict[str, Any] = dict(
        voice=args.voice or "",
        format=args.format,
        sample_rate_hz=args.sample_rate,
        speed=args.speed,
        instructions=args.instructions or "",
        request_id=args.request_id,
    )
    if args.stream:
        return client.synthesize_stream(stdin_pieces(flush_lines=sys.stdin.isatty()), **options)
    return client.synthesize(args.text, mode=args.mode or "chat", **options)


async def _say(args: argparse.Namespace, sink: AudioSink) -> dict[str, Any]:
    """Run the request; return what to report: the stream's figures and this client's times."""
    result: dict[str, Any] = {"request_id": args.request_id}
    started = time.perf_counter()
    first_audio: float | None = None
    async with _client(args, args.via) as client:
        events = _events(args, client)
        try:
            async for event in events:
                if isinstance(event, AudioChunk):
                    if first_audio is None:
                        first_audio = time.perf_counter()
                    sink.write(event.data)
                elif isinstance(event, SegmentStarted):
                    if args.verbose:
                        _print_segment(event)
                elif isinstance(event, StreamStarted):
                    result.update(
                        request_id=event.request_id or args.request_id,
                        format=event.format.value,
                        voice=event.voice,
                    )
                    if args.verbose:
                        print(_describe_started(event), file=sys.stderr)
                elif isinstance(event, StreamFinished):
                    result.update(_figures(event))
        except (VoxrelayError, TimeoutError) as exc:
            raise _failure(exc, args, args.via) from None
    ended = time.perf_counter()
    result["client_ttfa_ms"] = round((first_audio - started) * 1000) if first_audio else None
    result["client_total_ms"] = round((ended - started) * 1000)
    return result


def _read_text(args: argparse.Namespace) -> None:
    if args.stream:
        if args.text != "-":
            raise UsageError("--stream speaks stdin as it comes: give TEXT as '-'")
        if args.mode == "chat":
            raise UsageError("--stream speaks the text as written: it takes no --mode chat")
        return
    if args.text == "-":
        args.text = sys.stdin.read()


def _choose_format(args: argparse.Namespace, sink: AudioSink) -> None:
    """Take the format from the file name when not given; warn when they disagree."""
    if sink.path is None:
        return
    wanted = FORMAT_BY_SUFFIX.get(sink.path.suffix.lower())
    if args.format is None:
        if wanted is not None:
            args.format = wanted.value
        return
    if wanted is not None and wanted.value != args.format:
        print(
            f"voxrelay: note: writing {args.format} audio to a file named {sink.path.name}",
            file=sys.stderr,
        )


def cmd_say(args: argparse.Namespace, rest: list[str]) -> int:
    """Speak TEXT through a running server and write the audio to a file or stdout."""
    if rest:
        extra = " ".join(rest)
        return fail(f"unexpected argument(s): {extra} (put TEXT in quotes if it has spaces)", 2)
    sink = AudioSink(args.output)
    try:
        sink.check()
        _read_text(args)
        _choose_format(args, sink)
        args.request_id = uuid.uuid4().hex
        result = asyncio.run(_say(args, sink))
        sink.finish()
    except UsageError as exc:
        sink.close()
        return fail(str(exc), 2)
    except CliError as exc:
        sink.close()
        return fail(f"{exc}{sink.partial_note()}")
    except KeyboardInterrupt:
        sink.close()
        return fail(f"interrupted{sink.partial_note()}", EXIT_INTERRUPTED)
    ttfa = result.get("client_ttfa_ms")
    segments = int(result.get("segments") or 0)
    print(
        f"time to first audio {'–' if ttfa is None else ttfa} ms, total "
        f"{result.get('client_total_ms')} ms: {(result.get('audio_ms') or 0) / 1000:.2f} s of"
        f" {result.get('format') or args.format or 'audio'} in {_plural(segments, 'segment')},"
        f" {int(result.get('audio_bytes') or 0):,} bytes → {sink.where}",
        file=sys.stderr,
    )
    if args.json:
        summary = {"via": args.via, "output": sink.where, **result}
        # With the audio on stdout, the figures go to stderr; otherwise to stdout.
        print(json.dumps(summary), file=sys.stderr if sink.path is None else sys.stdout)
    return 0


async def _voices(args: argparse.Namespace) -> list[tuple[str, str]]:
    async with _client(args, "grpc") as client:
        try:
            voices = await client.voices(args.language or "")
        except (VoxrelayError, TimeoutError) as exc:
            raise _failure(exc, args, "grpc") from None
    return [(v.name, v.language) for v in voices]


def cmd_voices(args: argparse.Namespace, rest: list[str]) -> int:
    """List the voices of a running server's speech engine."""
    if rest:
        return fail(f"unexpected argument(s): {' '.join(rest)}", 2)
    try:
        voices = asyncio.run(_voices(args))
    except CliError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    if not voices:
        which = f" for language {args.language!r}" if args.language else ""
        return fail(f"the server has no voices{which} (try `voxrelay voices` for all)")
    width = max(len(n) for n, _ in voices)
    try:
        for name, language in voices:
            print(f"{name:<{width}}  {language}")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `voxrelay voices | head`
        _silence_stdout()
    return 0
