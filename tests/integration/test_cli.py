"""The ``voxrelay`` command as a user meets it: messages, exit codes, files, pipes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AppFactory
from tests.servers import ROOT
from tests.waiting import eventually
from voxrelay.gateways.app import App

HELLO = "Hello world. This is voxrelay."
LONG = " ".join(f"Sentence number {i} is here and it goes on." for i in range(70))  # < 4096
VIAS = ["grpc", "ws"]


async def voxrelay(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the CLI; return its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxrelay.gateways.cli", *args,
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode()


def server(app: App, via: str) -> list[str]:
    return [
        "--via",
        via,
        "--server",
        f"127.0.0.1:{app.grpc_port if via == 'grpc' else app.ws_port}",
    ]


def one_line_failure(code: int, err: str) -> str:
    """Assert the CLI failed with exactly one ``voxrelay: …`` line; return it."""
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxrelay: "), err
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("via", VIAS)
async def test_say_prints_timings_and_takes_the_format_from_the_name(
    app_factory: AppFactory, tmp_path: Path, via: str
) -> None:
    app = await app_factory()
    out = tmp_path / "hello.wav"
    code, _, err = await voxrelay(
        "say", "--mode", "speak", HELLO, "-o", str(out), *server(app, via)
    )
    assert code == 0, err
    assert out.read_bytes()[:4] == b"RIFF"  # no --format: .wav asked for wav
    match = re.search(r"time to first audio (\d+) ms, total (\d+) ms: ([\d.]+) s of wav", err)
    assert match, err
    ttfa, total, seconds = int(match[1]), int(match[2]), float(match[3])
    assert 0 <= ttfa <= total and 1.0 < seconds < 4.0
    assert "2 segments" in err and str(out) in err


@pytest.mark.parametrize("via", VIAS)
async def test_verbose_and_json_tell_the_same_story_on_both_doors(
    app_factory: AppFactory, tmp_path: Path, via: str
) -> None:
    app = await app_factory()
    out = tmp_path / "hello.mp3"
    code, stdout, err = await voxrelay(
        "say", "--mode", "speak", HELLO, "-o", str(out), "-v", "--json", *server(app, via)
    )
    assert code == 0, err
    assert "request " in err and "voice en-us" in err
    assert re.search(r"\[0\]\s+0\.00 s\s+Hello world\.", err), err
    assert re.search(r"\[1\]\s+[\d.]+ s\s+This is voxrelay\.", err), err
    figures = json.loads(stdout)  # the audio went to a file, so the JSON is on stdout
    assert figures["via"] == via and figures["format"] == "mp3" and figures["segments"] == 2
    assert figures["audio_bytes"] == out.stat().st_size
    assert figures["client_total_ms"] >= figures["client_ttfa_ms"] >= 0
    assert {"request_id", "reply_text", "audio_ms", "time_to_first_audio_ms", "total_ms"} <= set(
        figures
    )
    assert "type" not in figures and "id" not in figures


@pytest.mark.parametrize("via", VIAS)
async def test_a_refused_request_is_one_line_and_leaves_the_file_alone(
    app_factory: AppFactory, tmp_path: Path, via: str
) -> None:
    app = await app_factory()
    kept = tmp_path / "kept.mp3"
    kept.write_bytes(b"yesterday's audio")
    code, _, err = await voxrelay(
        "say", "--voice", "nobody", "Hi", "-o", str(kept), *server(app, via)
    )
    assert "unknown voice 'nobody'" in one_line_failure(code, err)
    assert kept.read_bytes() == b"yesterday's audio"
    fresh = tmp_path / "fresh.mp3"
    code, _, err = await voxrelay("say", "x" * 5000, "-o", str(fresh), *server(app, via))
    assert "limit is 4096" in one_line_failure(code, err)
    assert not fresh.exists()


@pytest.mark.parametrize("via", VIAS)
async def test_no_server_is_one_clear_line(tmp_path: Path, via: str) -> None:
    target = f"127.0.0.1:{free_port()}"
    code, _, err = await voxrelay(
        "say", "Hi", "-o", str(tmp_path / "x.mp3"), "--via", via, "--server", target
    )
    line = one_line_failure(code, err)
    assert f"cannot reach the server at {target}" in line and "refused" in line


async def test_bad_outputs_are_refused_before_any_request(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"  # never contacted
    code, _, err = await voxrelay(
        "say", "Hi", "-o", str(tmp_path / "no" / "x.mp3"), "--server", target
    )
    assert "does not exist" in one_line_failure(code, err)
    code, _, err = await voxrelay("say", "Hi", "-o", str(tmp_path), "--server", target)
    assert "is a directory" in one_line_failure(code, err)
    code, _, err = await voxrelay("say", "Hi", "there", "-o", str(tmp_path / "x.mp3"))
    assert code == 2 and "quotes" in err


async def test_voices_filter_and_a_closed_pipe(app_factory: AppFactory) -> None:
    app = await app_factory()
    target = f"127.0.0.1:{app.grpc_port}"
    code, out, err = await voxrelay("voices", "--language", "en-us", "--server", target)
    assert code == 0 and "en-us" in out.split(), err
    code, _, err = await voxrelay("voices", "--language", "zz", "--server", target)
    assert "no voices for language 'zz'" in one_line_failure(code, err)
    # `voxrelay voices | head -1`: the reader goes away early; no traceback.
    proc = await asyncio.create_subprocess_shell(
        f"{sys.executable} -m gateways.cli voices --server {target} | head -1",
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
    assert len(out_b.decode().splitlines()) == 1
    assert err_b == b"", err_b.decode()


async def test_ctrl_c_keeps_the_partial_audio_and_exits_130(
    app_factory: AppFactory, tmp_path: Path
) -> None:
    app = await app_factory()
    out = tmp_path / "long.mp3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxrelay.gateways.cli", "say", "--mode", "speak", LONG,
        "-o", str(out),
        "--server", f"127.0.0.1:{app.grpc_port}",
        cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    # Until the first audio bytes are on disk (or say ended too soon).
    await eventually(
        lambda: (out.exists() and out.stat().st_size > 0) or proc.returncode is not None
    )
    assert proc.returncode is None, "say ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130, err
    text = err.decode()
    assert "Traceback" not in text and text.startswith("voxrelay: interrupted"), text
    assert str(out) in text and out.stat().st_size > 0


@pytest.mark.parametrize(
    "setting", ["VOXRELAY_GRPC_PORT", "VOXRELAY_WS_PORT", "VOXRELAY_HTTP_PORT"]
)
async def test_serve_on_a_taken_port_names_it(setting: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env.update(VOXRELAY_GRPC_PORT="0", VOXRELAY_WS_PORT="0", VOXRELAY_METRICS_PORT="0")
    env.update(VOXRELAY_HTTP_PORT="0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env[setting] = str(taken.getsockname()[1])
        code, _, err = await voxrelay("serve", env=env)
    assert code == 1, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("voxrelay: cannot start:") and setting in last, err
    assert '"draining"' not in err and '"stopped"' not in err, "nothing was served"


async def test_help_reads_well() -> None:
    code, out, _ = await voxrelay("--help")
    assert code == 0 and "examples:" in out and "voxrelay say" in out
    code, out, _ = await voxrelay("say", "--help")
    assert code == 0
    for option in ("--mode", "--via", "--format", "--voice", "-o FILE", "--api-key KEY"):
        assert option in out
    assert "Exit codes" in out
    code, out, _ = await voxrelay("--version")
    assert code == 0 and out.startswith("voxrelay ")


@pytest.mark.parametrize("via", VIAS)
async def test_say_finds_the_server_and_its_key_in_the_environment(
    app_factory: AppFactory, tmp_path: Path, via: str
) -> None:
    app = await app_factory(api_keys="k-env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env.update(
        VOXRELAY_HOST="0.0.0.0",  # the server's bind address: a client here means loopback
        VOXRELAY_GRPC_PORT=str(app.grpc_port),
        VOXRELAY_WS_PORT=str(app.ws_port),
    )
    out = tmp_path / "hi.wav"
    argv = ("say", "--via", via, "--mode", "speak", "Hi.", "-o", str(out))
    code, _, err = await voxrelay(*argv, env=env)
    expected = "UNAUTHENTICATED" if via == "grpc" else "unauthorized"
    line = one_line_failure(code, err)
    assert expected in line and "VOXRELAY_API_KEY" in line
    code, _, err = await voxrelay(*argv, env=dict(env, VOXRELAY_API_KEY="k-env"))
    assert code == 0 and out.read_bytes()[:4] == b"RIFF", err
    assert "k-env" not in err
    port = "VOXRELAY_GRPC_PORT" if via == "grpc" else "VOXRELAY_WS_PORT"
    code, _, err = await voxrelay(*argv, env=dict(env, **{port: "0"}))
    assert f"{port} is 0" in one_line_failure(code, err)
    code, _, err = await voxrelay(*argv, env=dict(env, **{port: "fifty"}))
    assert one_line_failure(code, err).startswith(f"voxrelay: {port}: ")
