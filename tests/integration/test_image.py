"""The container image for real: `make image`, then its own `voxrelay serve` speaks.

No image can be pulled here and ``podman run`` fails on setrlimit in this sandbox, so
the test builds with buildah on a debootstrap base (scripts/image.sh), then runs the
image's entrypoint the way a runtime would, by hand: ``buildah mount`` its root fs,
``chroot`` into it as the image's user, with the image's environment and working
directory. One request goes through each door; the image's HEALTHCHECK command is
run; SIGTERM drains and ends it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.test_limits import speak_ws
from tests.integration.test_websocket import open_ws
from tests.servers import ROOT, ServerProcess
from voxrelay.v1 import synthesis_pb2 as pb
from voxrelay.v1 import synthesis_pb2_grpc as pb_grpc

TOOLS = {name: shutil.which(name) for name in ("buildah", "podman", "debootstrap", "chroot")}
STORAGE = ["--storage-driver", "vfs"]

pytestmark = [
    pytest.mark.skipif(
        None in TOOLS.values() or os.geteuid() != 0,
        reason="needs buildah, podman and debootstrap (`make test-deps` installs them) and"
        " root (chroot)",
    ),
    pytest.mark.timeout(1800),
]


def buildah(*args: str) -> str:
    done = subprocess.run(
        ["buildah", *STORAGE, *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


#: The device nodes a Python server needs (no host /dev is bound in: removing the
#: container's root fs must never reach the host's devices).
DEVICES = {"null": (1, 3), "zero": (1, 5), "random": (1, 8), "urandom": (1, 9)}


@contextmanager
def mounted(tag: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The image's root fs, mounted with its own /proc and a small /dev, and its config."""
    config = json.loads(buildah("inspect", "--type", "image", tag))["Docker"]["config"]
    container = buildah("from", "--pull-never", tag)
    root = Path(buildah("mount", container))
    mounts: list[Path] = []
    try:
        for target, how in (
            (root / "proc", ["-t", "proc", "proc"]),
            (root / "dev", ["-t", "tmpfs", "-o", "mode=755", "tmpfs"]),
        ):
            target.mkdir(exist_ok=True)
            subprocess.run(["mount", *how, str(target)], check=True, timeout=30)
            mounts.append(target)
        for name, (major, minor) in DEVICES.items():
            os.mknod(root / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            (root / "dev" / name).chmod(0o666)
        (root / "dev" / "shm").mkdir(mode=0o1777)
        (root / "dev" / "shm").chmod(0o1777)
        yield root, config
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", str(target)], check=False, timeout=30)
        if not any(os.path.ismount(target) for target in mounts):
            buildah("umount", container)
            buildah("rm", container)


def in_image(root: Path, config: dict[str, Any], argv: list[str], **env: str) -> list[str]:
    """An argv that runs *argv* in the image as its user, environment and directory."""
    environment = [*config["Env"], *(f"{k}={v}" for k, v in env.items())]
    workdir = config["WorkingDir"] or "/"
    return ["chroot", f"--userspec={config['User']}", str(root),
            "/usr/bin/env", "-i", "-C", workdir, *environment, *argv]  # fmt: skip


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    tag = f"localhost/voxrelay-test:{os.getpid()}"
    done = subprocess.run(
        ["make", "image", f"IMAGE_TAG={tag}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    try:
        yield tag
    finally:
        buildah("rmi", tag)


@pytest.fixture
async def served(image: str) -> AsyncIterator[tuple[ServerProcess, Path, dict[str, Any]]]:
    with mounted(image) as (root, config):
        argv = in_image(
            root, config, [*config["Entrypoint"], *config["Cmd"]],
            VOXRELAY_GRPC_PORT="0", VOXRELAY_WS_PORT="0", VOXRELAY_METRICS_PORT="0",
            VOXRELAY_HTTP_PORT="0",
        )  # fmt: skip
        async with ServerProcess(argv, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}) as server:
            yield server, root, config


def local(address: str) -> str:
    return address.replace("0.0.0.0", "127.0.0.1")


async def test_the_image_serves_both_doors_as_its_own_user(
    served: tuple[ServerProcess, Path, dict[str, Any]],
) -> None:
    server, root, config = served
    assert config["User"] == "10001:10001" and "VOXRELAY_HOST=0.0.0.0" in config["Env"]
    assert server.startup["grpc"].startswith("0.0.0.0:")
    async with grpc.aio.insecure_channel(local(server.grpc_target)) as channel:
        call = pb_grpc.SynthesizerStub(channel).Synthesize(
            pb.SynthesizeRequest(text="Hello from the image.", mode=pb.MODE_SPEAK), timeout=60
        )
        events = [e async for e in call]
    assert events[-1].HasField("finished") and events[-1].finished.audio_bytes > 0
    async with open_ws(local(server.ws_url)) as ws:
        assert (await speak_ws(ws))["type"] == "finished"
    # The image's own HEALTHCHECK, run as the runtime would (inside, as its user).
    check = config["Healthcheck"]["Test"]
    assert check[0] == "CMD"
    port = local(server.ws_url).rsplit(":", 1)[1].split("/")[0]
    probe = await asyncio.create_subprocess_exec(
        *in_image(root, config, check[1:], VOXRELAY_WS_PORT=port)
    )
    assert await asyncio.wait_for(probe.wait(), 60) == 0
    # The licence texts of what the image carries.
    licences = root / "usr/share/licenses"
    for text in ("voxrelay/NOTICE", "voxrelay/GPL-3", "voxrelay/Apache-2.0", "python/LICENSES.txt"):
        assert (licences / text).stat().st_size > 0, text
    assert "espeakng-loader" in (licences / "python/LICENSES.txt").read_text().lower()
    # SIGTERM drains and ends it.
    server.signal()
    assert await server.wait() == 0
    assert any(line.get("event") == "shutdown" for line in server.lines)
