"""``voxrelay say`` and ``voxrelay voices``: the client side of the command line.

``say`` sends one request over either door, writes the audio as it streams in and prints
the timings; ``voices`` lists the engine's voices. Failures become one ``voxrelay: …`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import sys
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from google.rpc import error_details_pb2, status_pb2

from voxrelay.service.model import AudioFormat, Mode
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

__all__ = ["EXIT_INTERRUPTED", "FORMAT_BY_SUFFIX", "CliError", "cmd_say", "cmd_voices", "fail"]

GRPC_FORMATS = {f: getattr(pb, f"AUDIO_FORMAT_{f.name}") for f in AudioFormat}
GRPC_MODES = {Mode.CHAT: pb.MODE_CHAT, Mode.SPEAK: pb.MODE_SPEAK}
DEFAULT_PORTS = {"grpc": 50051, "ws": 8765}

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


class CliError(Exception):
    """A failure to report as one ``voxrelay: …`` line (exit code 1)."""


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


def _target(args: argparse.Namespace, via: str) -> str:
    return str(args.server or f"127.0.0.1:{DEFAULT_PORTS[via]}")


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not args.tls and not args.ca:
        return None
    try:
        root = Path(args.ca).read_bytes() if args.ca else None
    except OSError as exc:
        raise CliError(f"cannot read --ca {args.ca}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(root_certificates=root)


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls and not args.ca:
        return None
    try:
        return (
            ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
        )
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot use --ca {args.ca}: {exc}") from None


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    target = _target(args, "grpc")
    creds = _credentials(args)
    return grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.api_key}")] if args.api_key else []


def _retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The wait the server advised in ``google.rpc.RetryInfo``, if any."""
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def _unreachable(target: str, door: str, reason: str) -> CliError:
    hint = " — is the server running? (make run, or voxrelay serve)"
    if "refused" not in reason:
        hint = ""
    return CliError(f"cannot reach the server at {target} ({door}): {reason}{hint}")


def _grpc_error(exc: grpc.aio.AioRpcError, args: argparse.Namespace, elapsed_s: float) -> CliError:
    code, details = exc.code(), exc.details() or ""
    target = _target(args, "grpc")
    if code is grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details or "errors resolving" in details
    ):
        if "Connection refused" in details:
            return _unreachable(target, "gRPC", "connection refused")
        if "errors resolving" in details or "Domain name not found" in details:
            return _unreachable(target, "gRPC", "the host name does not resolve")
        if "Socket closed" in details:
            details += f" (is {target} voxrelay's gRPC port, 50051 by default?)"
        return _unreachable(target, "gRPC", details)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and elapsed_s >= args.timeout * 0.95:
        return CliError(f"gave up after {args.timeout:g} s (--timeout): DEADLINE_EXCEEDED")
    if code is grpc.StatusCode.CANCELLED:
        return CliError(f"the server ended the stream early (CANCELLED: {details})")
    message = f"{code.name}: {details}"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        message += " (check --api-key)" if args.api_key else " (pass --api-key KEY)"
    retry = _retry_after_s(exc)
    if retry:
        message += f" (retry in {retry:.1f} s)"
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


def _describe_started(
    request_id: str, voice: str, fmt: str, content_type: str, rate: int, llm: str, tts: str
) -> str:
    parts = [f"request {request_id}", f"voice {voice}", f"{fmt} ({content_type}, {rate} Hz)"]
    if llm:
        parts.append(f"LLM {llm}")
    if tts:
        parts.append(f"TTS {tts}")
    return "  ".join(parts)


def _print_segment(index: int, start_ms: int, text: str) -> None:
    print(f"  [{index}] {start_ms / 1000:6.2f} s  {text.strip()}", file=sys.stderr)


async def _say_grpc(args: argparse.Namespace, sink: AudioSink) -> dict[str, Any]:
    request = pb.SynthesizeRequest(
        text=args.text,
        mode=GRPC_MODES[Mode(args.mode)],
        voice=args.voice or "",
        format=(
            GRPC_FORMATS[AudioFormat(args.format)] if args.format else pb.AUDIO_FORMAT_UNSPECIFIED
        ),
        sample_rate_hz=args.sample_rate,
        instructions=args.instructions or "",
        speed=args.speed,
        request_id=args.request_id,
    )
    started = time.perf_counter()
    first_audio: float | None = None
    result: dict[str, Any] = {"request_id": args.request_id}
    try:
        async with _channel(args) as channel:
            stub = pb_grpc.SynthesizerStub(channel)
            call = stub.Synthesize(request, timeout=args.timeout, metadata=_metadata(args))
            async for response in call:
                kind = response.WhichOneof("event")
                if kind == "started":
                    s = response.started
                    name = pb.AudioFormat.Name(s.format).removeprefix("AUDIO_FORMAT_")
                    result.update(
                        request_id=s.request_id or args.request_id,
                        format=name.lower() if s.format else None,
                        voice=s.voice,
                    )
                    if args.verbose:
                        print(
                            _describe_started(
                                result["request_id"],
                                s.voice,
                                str(result["format"]),
                                s.content_type,
                                s.sample_rate_hz,
                                s.llm_model,
                                s.tts_model,
                            ),
                            file=sys.stderr,
                        )
                elif kind == "segment":
                    if args.verbose:
                        seg = response.segment
                        _print_segment(seg.index, seg.start_ms, seg.text)
                elif kind == "audio":
                    if first_audio is None:
                        first_audio = time.perf_counter()
                    sink.write(response.audio.data)
                elif kind == "finished":
                    f = response.finished
                    result.update(
                        reply_text=f.reply_text,
                        segments=f.segments,
                        audio_bytes=f.audio_bytes,
                        audio_ms=f.audio_ms,
                        time_to_first_audio_ms=f.time_to_first_audio_ms,
                        total_ms=f.total_ms,
                        llm_first_token_ms=f.llm_first_token_ms,
                        tts_first_byte_ms=f.tts_first_byte_ms,
                        prompt_tokens=f.prompt_tokens,
                        completion_tokens=f.completion_tokens,
                    )
    except grpc.aio.AioRpcError as exc:
        raise _grpc_error(exc, args, time.perf_counter() - started) from None
    ended = time.perf_counter()
    result["client_ttfa_ms"] = round((first_audio - started) * 1000) if first_audio else None
    result["client_total_ms"] = round((ended - started) * 1000)
    return result


async def _say_ws(args: argparse.Namespace, sink: AudioSink) -> dict[str, Any]:
    from .ws_client import WsSayError, say_ws

    target = _target(args, "ws")
    context = _ssl_context(args)
    url = f"{'wss' if context else 'ws'}://{target}/v1/stream"

    def on_event(frame: dict[str, Any]) -> None:
        if not args.verbose:
            return
        if frame.get("type") == "started":
            print(
                _describe_started(
                    str(frame.get("id")),
                    str(frame.get("voice")),
                    str(frame.get("format")),
                    str(frame.get("content_type")),
                    int(frame.get("sample_rate_hz") or 0),
                    str(frame.get("llm_model") or ""),
                    str(frame.get("tts_model") or ""),
                ),
                file=sys.stderr,
            )
        elif frame.get("type") == "segment":
            _print_segment(
                int(frame.get("index", 0)), int(frame.get("start_ms", 0)), str(frame.get("text"))
            )

    voice, fmt = "", ""

    def remember(frame: dict[str, Any]) -> None:
        nonlocal voice, fmt
        if frame.get("type") == "started":
            voice, fmt = str(frame.get("voice")), str(frame.get("format"))
        on_event(frame)

    try:
        async with asyncio.timeout(args.timeout):
            finished = await say_ws(
                url,
                text=args.text,
                mode=args.mode,
                voice=args.voice or "",
                format=args.format or "",
                sample_rate_hz=args.sample_rate,
                instructions=args.instructions or "",
                speed=args.speed,
                out=sink,
                token=args.api_key,
                ssl=context,
                request_id=args.request_id,
                on_event=remember,
            )
    except TimeoutError:
        raise CliError(f"gave up after {args.timeout:g} s (--timeout)") from None
    except WsSayError as exc:
        # The server's refusals keep their code; this client's own findings need none.
        local = exc.code in ("unreachable", "closed", "cancelled")
        message = exc.message if local else str(exc)
        if exc.code == "unauthorized":
            message += ": check --api-key" if args.api_key else ": pass --api-key KEY"
        if exc.retry_after_ms:
            message += f" (retry in {exc.retry_after_ms / 1000:.1f} s)"
        raise CliError(message) from None
    except ssl.SSLError as exc:
        raise CliError(f"TLS with {target} failed: {exc}") from None
    except ConnectionRefusedError:
        raise _unreachable(target, "WebSocket", "connection refused") from None
    except OSError as exc:
        gai = isinstance(exc, socket.gaierror)
        reason = "the host name does not resolve" if gai else str(exc)
        raise _unreachable(target, "WebSocket", reason) from None
    result = {k: v for k, v in finished.items() if k not in ("type", "id")}
    return {"request_id": finished.get("id"), "format": fmt, "voice": voice, **result}


def _read_text(args: argparse.Namespace) -> None:
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
        say = _say_ws if args.via == "ws" else _say_grpc
        result = asyncio.run(say(args, sink))
        sink.finish()
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
    started = time.perf_counter()
    try:
        async with _channel(args) as channel:
            reply = await pb_grpc.SynthesizerStub(channel).ListVoices(
                pb.ListVoicesRequest(language=args.language or ""),
                timeout=args.timeout,
                metadata=_metadata(args),
            )
    except grpc.aio.AioRpcError as exc:
        raise _grpc_error(exc, args, time.perf_counter() - started) from None
    return [(v.name, v.language) for v in reply.voices]


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
