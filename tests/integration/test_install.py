"""The wheel as a user installs it: ``voxrelay serve`` and ``voxrelay say`` from a fresh venv.

The wheel is built from a copy of the sources pyproject.toml names (``pip wheel --no-deps``,
with build isolation, as a user's pip builds it) and installed with ``--no-deps --no-index``
into a new venv made without pip. Its dependencies are not installed again: a ``.pth`` line
puts this test's own site-packages at the end of the new venv's path. Installing them from
the registry would take minutes and test pip, not us; ``--system-site-packages`` would not
do either, as the base interpreter lacks them. The ``.pth`` line adds a directory and
nothing more (Python reads ``.pth`` files only in site directories), so the editable
install of the repository there stays inert: the test proves that every ``voxrelay``
module the new venv imports comes from the wheel.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from tests.servers import ROOT, ServerProcess

KEY = "k-from-the-wheel"
SOURCES = ("pyproject.toml", "README.md")


def run(*argv: str | Path, env: dict[str, str] | None = None, cwd: Path) -> str:
    """Run *argv*; return its output (stdout and stderr), failing on a non-zero exit."""
    done = subprocess.run(
        list(map(str, argv)), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=90, check=False,
    )  # fmt: skip
    text = done.stdout.decode(errors="replace")
    assert done.returncode == 0, f"{argv}: {text}"
    return text


def copy_sources(into: Path) -> None:
    """Copy what the build reads: pyproject.toml, the README and every package folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in config["tool"]["setuptools"]["package-dir"].values()}
    for name in SOURCES:
        shutil.copy2(ROOT / name, into / name)
    for folder in folders:
        shutil.copytree(ROOT / folder, into / folder, ignore=shutil.ignore_patterns("__pycache__"))


def install_the_wheel(tmp_path: Path) -> Path:
    """Build the wheel, install it into a fresh venv, check what went where; return its bin/."""
    source, dist, venv = tmp_path / "source", tmp_path / "dist", tmp_path / "venv"
    source.mkdir()
    copy_sources(source)
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "wheel", "--no-deps", "--quiet", "-w", dist, source, cwd=tmp_path)
    (wheel,) = dist.glob("voxrelay-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", purelib, cwd=tmp_path).strip())
    ours = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    run(*pip, "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel,
        cwd=tmp_path)  # fmt: skip

    # One top-level package of ours: voxrelay (no service/, gateways/ or client/ beside it).
    installed = {p.name for p in site.iterdir()} - {"dependencies.pth", "__pycache__"}
    assert installed == {"voxrelay", wheel.name.split("-py3")[0] + ".dist-info"}, installed
    parts = {p.name for p in (site / "voxrelay").iterdir()}
    assert {"v1", "service", "gateways", "client"} <= parts, parts
    where = run(
        python, "-c",
        "import voxrelay.gateways.cli, voxrelay.client, importlib.util as u;"
        "print(voxrelay.gateways.cli.__file__, voxrelay.client.__file__);"
        "print([n for n in ('service', 'gateways', 'client') if u.find_spec(n)])",
        cwd=tmp_path,
    )  # fmt: skip
    paths, stray = where.splitlines()
    assert all(path.startswith(str(site)) for path in paths.split()), where
    assert stray == "[]", where
    return venv / "bin"


async def test_the_wheel_serves_and_says(tmp_path: Path) -> None:
    voxrelay = await asyncio.to_thread(install_the_wheel, tmp_path) / "voxrelay"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    served = dict(env, VOXRELAY_GRPC_PORT="0", VOXRELAY_WS_PORT="0", VOXRELAY_METRICS_PORT="0",
                  VOXRELAY_HTTP_PORT="0",
                  VOXRELAY_API_KEYS=KEY)  # fmt: skip
    async with ServerProcess([str(voxrelay), "serve"], served, cwd=tmp_path) as server:
        grpc_port = server.grpc_target.rsplit(":", 1)[1]
        ws_port = server.ws_url.rsplit(":", 1)[1].split("/")[0]
        # What a user of the same shell has: the server's variables, and a key of its own.
        client = dict(env, VOXRELAY_HOST="0.0.0.0", VOXRELAY_GRPC_PORT=grpc_port,
                      VOXRELAY_WS_PORT=ws_port, VOXRELAY_API_KEY=KEY)  # fmt: skip
        for via in ("grpc", "ws"):
            out = tmp_path / f"{via}.wav"
            argv = ("say", "--via", via, "--mode", "speak", "Hello from the wheel.", "-o", out)
            said = await asyncio.to_thread(run, voxrelay, *argv, env=client, cwd=tmp_path)
            assert "time to first audio" in said and out.read_bytes()[:4] == b"RIFF", said
            assert KEY not in said
        voices = await asyncio.to_thread(run, voxrelay, "voices", env=client, cwd=tmp_path)
        assert "en-us" in voices.split()
