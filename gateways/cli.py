"""The ``voxrelay`` command: ``serve``, ``say`` and ``voices``."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

from service.logs import configure_logging
from service.model import AudioFormat, Mode
from service.settings import ConfigError, load_settings

__all__ = ["main"]

GRPC_FORMATS = {f: getattr(pb, f"AUDIO_FORMAT_{f.name}") for f in AudioFormat}
GRPC_MODES = {Mode.CHAT: pb.MODE_CHAT, Mode.SPEAK: pb.MODE_SPEAK}


def _fail(message: str, code: int = 1) -> int:
    print(f"voxrelay: {message}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the server until SIGTERM/SIGINT."""
    try:
        settings = load_settings(cli_args=rest)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    configure_logging(settings.log_level)
    from .app import serve  # imported late: building providers is start-up work

    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        return _fail(f"cannot start: {exc}")
    return 0


def _target(args: argparse.Namespace, default_port: int) -> str:
    return args.server or f"127.0.0.1:{default_port}"


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not args.tls and not args.ca:
        return None
    root = Path(args.ca).read_bytes() if args.ca else None
    return grpc.ssl_channel_credentials(root_certificates=root)


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.api_key}")] if args.api_key else []


async def _say_grpc(args: argparse.Namespace, out: BinaryIO) -> dict[str, Any]:
    target = _target(args, 50051)
    creds = _credentials(args)
    channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
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
    )
    started = time.perf_counter()
    first_audio: float | None = None
    result: dict[str, Any] = {}
    async with channel:
        stub = pb_grpc.SynthesizerStub(channel)
        call = stub.Synthesize(request, timeout=args.timeout, metadata=_metadata(args))
        async for response in call:
            kind = response.WhichOneof("event")
            if kind == "started":
                result["started"] = response.started
            elif kind == "segment" and args.verbose:
                print(f"  [{response.segment.index}] {response.segment.text}", file=sys.stderr)
            elif kind == "audio":
                if first_audio is None:
                    first_audio = time.perf_counter()
                out.write(response.audio.data)
                out.flush()
            elif kind == "finished":
                f = response.finished
                result.update(
                    reply_text=f.reply_text,
                    segments=f.segments,
                    audio_bytes=f.audio_bytes,
                    audio_ms=f.audio_ms,
                    time_to_first_audio_ms=f.time_to_first_audio_ms,
                    total_ms=f.total_ms,
                )
    ended = time.perf_counter()
    result["client_ttfa_ms"] = round(((first_audio or ended) - started) * 1000)
    result["client_total_ms"] = round((ended - started) * 1000)
    return result


def cmd_say(args: argparse.Namespace, rest: list[str]) -> int:
    """Speak TEXT through a running server and write the audio to a file or stdout."""
    if rest:
        return _fail(f"unknown arguments: {' '.join(rest)}", 2)
    if args.output in (None, "-") and sys.stdout.isatty():
        return _fail("refusing to write audio to a terminal: use -o FILE (or pipe it)", 2)
    out: BinaryIO = sys.stdout.buffer if args.output in (None, "-") else open(args.output, "wb")  # noqa: SIM115 - closed below
    try:
        if args.via == "ws":
            from .ws_client import say_ws

            scheme = "wss" if (args.tls or args.ca) else "ws"
            url = f"{scheme}://{_target(args, 8765)}/v1/stream"
            ctx = None
            if scheme == "wss":
                ctx = (
                    ssl.create_default_context(cafile=args.ca)
                    if args.ca
                    else ssl.create_default_context()
                )
            result = asyncio.run(
                say_ws(
                    url,
                    text=args.text,
                    mode=args.mode,
                    voice=args.voice or "",
                    format=args.format or "",
                    sample_rate_hz=args.sample_rate,
                    instructions=args.instructions or "",
                    speed=args.speed,
                    out=out,
                    token=args.api_key,
                    ssl=ctx,
                )
            )
        else:
            result = asyncio.run(_say_grpc(args, out))
    except grpc.aio.AioRpcError as exc:
        return _fail(f"{exc.code().name}: {exc.details()}")
    except (OSError, ConnectionError) as exc:
        return _fail(f"cannot reach the server: {exc}")
    except Exception as exc:  # the WebSocket client's typed errors
        return _fail(str(exc))
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    summary = {k: v for k, v in result.items() if k != "started"}
    where = args.output if args.output not in (None, "-") else "stdout"
    print(
        f"time to first audio {result.get('client_ttfa_ms')} ms, total "
        f"{result.get('client_total_ms')} ms, {result.get('audio_ms', 0) / 1000:.2f} s of audio"
        f" in {result.get('segments', 0)} segments, {result.get('audio_bytes', 0)} bytes"
        f" → {where}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(summary), file=sys.stderr)
    return 0


async def _voices(args: argparse.Namespace) -> list[tuple[str, str]]:
    target = _target(args, 50051)
    creds = _credentials(args)
    channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
    async with channel:
        reply = await pb_grpc.SynthesizerStub(channel).ListVoices(
            pb.ListVoicesRequest(language=args.language or ""),
            timeout=args.timeout,
            metadata=_metadata(args),
        )
    return [(v.name, v.language) for v in reply.voices]


def cmd_voices(args: argparse.Namespace, rest: list[str]) -> int:
    """List the voices of a running server's speech engine."""
    if rest:
        return _fail(f"unknown arguments: {' '.join(rest)}", 2)
    try:
        voices = asyncio.run(_voices(args))
    except grpc.aio.AioRpcError as exc:
        return _fail(f"{exc.code().name}: {exc.details()}")
    width = max((len(n) for n, _ in voices), default=4)
    for name, language in voices:
        print(f"{name:<{width}}  {language}")
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server", help="HOST:PORT of the server (default 127.0.0.1 and the door's default port)"
    )
    p.add_argument("--api-key", help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca", help="CA certificate file to trust (implies --tls)")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after SECONDS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxrelay", description="A streaming speech gateway over gRPC and WebSocket."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the server",
        add_help=False,
        description="Run the server. Every VOXRELAY_* setting is also a flag, e.g."
        " --grpc-port 0 --log-level debug (see README).",
    )
    serve.set_defaults(func=cmd_serve)
    say = sub.add_parser("say", help="speak TEXT through a running server")
    say.add_argument("text")
    say.add_argument("--via", choices=["grpc", "ws"], default="grpc")
    say.add_argument("--mode", choices=[m.value for m in Mode], default="chat")
    say.add_argument("--voice")
    say.add_argument("--format", choices=[f.value for f in AudioFormat])
    say.add_argument("--sample-rate", type=int, default=0)
    say.add_argument("--instructions")
    say.add_argument("--speed", type=float, default=0.0)
    say.add_argument("-o", "--output", help="write audio here ('-' = stdout)")
    say.add_argument("-v", "--verbose", action="store_true", help="print segments")
    say.add_argument("--json", action="store_true", help="also print the figures as JSON")
    _client_options(say)
    say.set_defaults(func=cmd_say)
    voices = sub.add_parser("voices", help="list the server's voices")
    voices.add_argument("--language", help="only voices of this language, e.g. en")
    _client_options(voices)
    voices.set_defaults(func=cmd_voices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    code: int = args.func(args, rest)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
