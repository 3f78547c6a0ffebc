"""Debian's ``nginx`` running ``deploy/nginx/voxrelay.conf`` for a test, on free ports.

The shipped file is rendered only in what SPEC lets an operator change: its two
listen ports and the addresses of the upstream replicas. ``make test-deps`` installs
nginx; without it the tests that need it are skipped with a line that says so.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.redis_server import free_port
from tests.servers import ROOT

__all__ = ["CONF", "Nginx", "needs_nginx", "render", "running_nginx"]

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
)
CONF = ROOT / "deploy" / "nginx" / "voxrelay.conf"

needs_nginx = pytest.mark.skipif(NGINX is None, reason="needs nginx: `make test-deps` installs it")

MAIN = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/voxrelay.conf;
}}
"""


def _upstream(text: str, name: str, addresses: Sequence[str]) -> str:
    """Put *addresses* in upstream *name*, each with the parameters of the shipped lines."""
    block = re.search(rf"upstream {name} {{\n(.*?)\n}}", text, re.S)
    assert block is not None, name
    servers = re.findall(r"^    server \S+(.*);$", block.group(1), re.M)
    assert servers, name
    lines = "\n".join(f"    server {address}{servers[0]};" for address in addresses)
    body = re.sub(r"(^    server \S+.*;\n?)+", lines + "\n", block.group(1) + "\n", flags=re.M)
    return text.replace(block.group(1), body.rstrip("\n"))


def render(
    grpc_port: int,
    http_port: int,
    grpc: Sequence[str],
    ws: Sequence[str],
    http: Sequence[str],
) -> str:
    """The shipped config with these listen ports and upstream addresses, nothing else."""
    text = CONF.read_text()
    text, n_grpc = re.subn(r"listen \d+ http2;", f"listen 127.0.0.1:{grpc_port} http2;", text)
    text, n_http = re.subn(r"listen \d+;", f"listen 127.0.0.1:{http_port};", text)
    assert n_grpc == 1 and n_http == 1
    for name, addresses in (("voxrelay_grpc", grpc), ("voxrelay_ws", ws), ("voxrelay_http", http)):
        text = _upstream(text, name, addresses)
    return text


@dataclass
class Nginx:
    grpc_port: int
    http_port: int
    workdir: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/v1/stream"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def errors(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text() if path.exists() else ""


def _prepare(workdir: Path, grpc: Sequence[str], ws: Sequence[str], http: Sequence[str]) -> Nginx:
    """Write the main config and the rendered voxrelay.conf into *workdir*."""
    workdir.chmod(0o755)  # the worker processes run as an unprivileged user
    front = Nginx(free_port(), free_port(), workdir)
    config = render(front.grpc_port, front.http_port, grpc, ws, http)
    (workdir / "voxrelay.conf").write_text(config)
    (workdir / "nginx.conf").write_text(MAIN.format(dir=workdir))
    return front


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@asynccontextmanager
async def running_nginx(
    grpc: Sequence[str], ws: Sequence[str], http: Sequence[str] = ()
) -> AsyncIterator[Nginx]:
    """Run nginx in front of the given upstream addresses; stop it after."""
    if NGINX is None:
        pytest.skip("needs nginx: `make test-deps` installs it")
    with tempfile.TemporaryDirectory(prefix="voxrelay-nginx-") as tmp:
        front = _prepare(Path(tmp), grpc, ws, http or [refused_address()])
        workdir = front.workdir
        argv = [NGINX, "-p", str(workdir), "-e", str(workdir / "error.log"),
                "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"]  # fmt: skip
        check = await asyncio.create_subprocess_exec(
            *argv, "-t", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await check.communicate()
        assert check.returncode == 0, out.decode()
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(20):
                while not (await _listening(front.http_port) and await _listening(front.grpc_port)):
                    assert proc.returncode is None, front.errors()
                    await asyncio.sleep(0.05)
            yield front
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def refused_address() -> str:
    """An address where nothing listens: a replica that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"
