"""The ``voxrelay`` command: ``serve``, ``say`` and ``voices``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import socket
from collections.abc import Callable
from typing import Any

from voxrelay.service import __version__
from voxrelay.service.descriptors import raise_descriptor_limit
from voxrelay.service.logs import configure_logging
from voxrelay.service.model import AudioFormat, Mode
from voxrelay.service.settings import ConfigError, load_settings

from .say import EXIT_INTERRUPTED, cmd_say, cmd_voices
from .say import fail as _fail

__all__ = ["main"]

log = logging.getLogger("voxrelay")

# serve


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the server until SIGTERM/SIGINT (a second Ctrl-C cuts the drain short)."""
    try:
        settings = load_settings(cli_args=rest)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    configure_logging(settings.log_level)
    if (count := settings.worker_count()) > 1:
        return _serve_workers(settings, count)
    raise_descriptor_limit(settings)
    from .app import App  # imported late: building providers is start-up work

    async def run() -> None:
        await App(settings).run(on_ready=_freeze_heap)  # built in the loop: grpc.aio binds to it

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run())
    except KeyboardInterrupt:  # Ctrl-C before the app's own handlers were in place
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _fail(_port_in_use(settings, exc))
        return _fail(f"cannot start: {exc}")
    return 0


def _serve_workers(settings: Any, count: int) -> int:
    """Run *count* worker processes behind a supervisor (see :mod:`.workers`)."""
    from .workers import SupervisorError, supervise

    try:
        return supervise(settings, count)
    except SupervisorError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C before the supervisor's own handlers were in place
        return EXIT_INTERRUPTED


#: Young collections once this many more container objects live than at the last one
#: (CPython's default: 700).
GC_YOUNG_THRESHOLD = 3_000


def _freeze_heap(_app: object) -> None:
    """Leave what start-up built out of the collector's scans, and collect young objects less often.

    A full collection walks every tracked object, a pause every stream in flight feels at
    once; frozen, the collector walks only what serving made. Young collections still run
    often enough to free the reference cycles cancelled streams leave (asyncio's
    cancellation, its tracebacks and frames) before they pile up. docs/performance.md has
    the measurements behind the threshold.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's loop factory where it is installed (a faster loop), else None."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _port_in_use(settings: Any, error: OSError) -> str:
    """Name the listener whose port is taken (the OSError itself may not say)."""
    if "gRPC" in str(error):
        return (
            f"cannot start: the gRPC port {settings.host}:{settings.grpc_port} is in use"
            " (another voxrelay?): stop it, or set VOXRELAY_GRPC_PORT (0 picks a free port)"
        )
    taken = []
    for name, setting, port in (
        ("WebSocket", "VOXRELAY_WS_PORT", settings.ws_port),
        ("metrics", "VOXRELAY_METRICS_PORT", settings.metrics_port),
        ("OpenAI-compatible HTTP", "VOXRELAY_HTTP_PORT", settings.http_port),
    ):
        if not port:
            continue
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                settings.host, port, type=socket.SOCK_STREAM
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                taken.append(f"the {name} port {settings.host}:{port} ({setting})")
    if not taken:
        return "cannot start: an address is already in use"
    verb = "is" if len(taken) == 1 else "are"
    return (
        f"cannot start: {' and '.join(taken)} {verb} in use (another voxrelay?): stop it,"
        " or set the variable (0 picks a free port)"
    )


# The parser

EPILOG = """\
examples:
  voxrelay serve                                    # gRPC :50051, WebSocket :8765, metrics :9464
  voxrelay say --mode speak "Hello world." -o hello.mp3
  voxrelay say "Tell me a story" -o story.wav       # chat mode; the format follows the name
  voxrelay say --via ws --format opus "Hi" | ffplay -nodisp -autoexit -
  my-llm-tool | voxrelay say --stream - -o reply.mp3   # speak a token stream as it comes
  voxrelay voices --language en

Demo page: http://127.0.0.1:8765/ while the server runs.
"""

SAY_EPILOG = """\
The format is --format, else the output file's extension (.wav .mp3 .opus/.ogg .flac .aac
.pcm .mulaw .alaw), else the server's default (VOXRELAY_FORMAT, mp3 unless set).
pcm, mulaw and alaw are headerless: play them with `ffplay -f s16le -ar 22050 -ch_layout
mono FILE` (pcm at espeak's rate) or `ffplay -f mulaw -ar 8000 -ch_layout mono FILE`.

It prints the time to the first audio byte and the total time, as this client saw them.
Exit codes: 0 done, 1 refused or failed (one line on stderr), 2 bad usage, 130 interrupted.
"""


def _client_options(p: argparse.ArgumentParser, *, both_doors: bool) -> None:
    ports = "VOXRELAY_GRPC_PORT" + (" or VOXRELAY_WS_PORT" if both_doors else "")
    group = p.add_argument_group(
        "connection",
        "Unset, the server is where its own variables say: VOXRELAY_HOST (0.0.0.0 means\n"
        f"127.0.0.1) and {ports}; the key is VOXRELAY_API_KEY.",
    )
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="where the server listens (default 127.0.0.1:50051"
        + (" for gRPC, 127.0.0.1:8765 with --via ws)" if both_doors else ", its gRPC port)"),
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="sent as 'authorization: Bearer KEY' (if keys are on); other users can read it"
        " in `ps`: prefer VOXRELAY_API_KEY",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    group.add_argument("--ca", metavar="PEM", help="trust this CA certificate (implies --tls)")
    group.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up after this long (default: %(default)g)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxrelay",
        description="voxrelay: a streaming speech gateway over gRPC and WebSocket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"voxrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the server (gRPC, WebSocket + demo page, metrics)",
        add_help=False,
        description="Run the server. Every VOXRELAY_* setting is also a flag, e.g."
        " --grpc-port 0 --log-level debug (see README).",
    )
    serve.set_defaults(func=cmd_serve)
    say = sub.add_parser(
        "say",
        help="speak TEXT through a running server, write the audio to a file",
        description="Send TEXT to a running voxrelay and write the streamed audio to a"
        " file (or stdout).",
        epilog=SAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    say.add_argument(
        "text", metavar="TEXT", help="what to answer (chat) or read aloud (speak); '-' reads stdin"
    )
    say.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the audio here; '-' or none = stdout (when it is not a terminal)",
    )
    say.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        help="chat: the LLM answers TEXT (default); speak: TEXT itself is spoken",
    )
    say.add_argument(
        "--stream",
        action="store_true",
        help="speak stdin (TEXT '-') as it is typed or piped, sentence by sentence"
        " (streamed input; speak mode); a typed line is spoken at Enter",
    )
    say.add_argument(
        "--via", choices=["grpc", "ws"], default="grpc", help="which door (default: grpc)"
    )
    say.add_argument(
        "--format",
        choices=[f.value for f in AudioFormat],
        help="audio format (default: from the file name, else the server's)",
    )
    say.add_argument("--voice", help="a voice name (see `voxrelay voices`; default: the server's)")
    say.add_argument(
        "--sample-rate",
        type=int,
        default=0,
        metavar="HZ",
        help="output sample rate (default 0: the engine's own; opus is always 48000)",
    )
    say.add_argument("--speed", type=float, default=0.0, help="0.25 to 4.0 (default: 1.0)")
    say.add_argument("--instructions", metavar="TEXT", help="how to speak (OpenAI voices)")
    say.add_argument(
        "-v", "--verbose", action="store_true", help="print the stream and its segments"
    )
    say.add_argument(
        "--json",
        action="store_true",
        help="also print the stream's figures as one JSON line (to stdout, or to stderr"
        " when the audio goes to stdout)",
    )
    _client_options(say, both_doors=True)
    say.set_defaults(func=cmd_say)
    voices = sub.add_parser(
        "voices",
        help="list the server's voices",
        description="List the voices of a running server's speech engine (over gRPC).",
    )
    voices.add_argument("--language", metavar="LANG", help="only this language, e.g. en or en-us")
    _client_options(voices, both_doors=False)
    voices.set_defaults(func=cmd_voices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    return func(args, rest)


if __name__ == "__main__":
    raise SystemExit(main())
