"""The supervisor's port handling and settings, without starting workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import make_settings
from voxrelay.gateways.workers import (
    SupervisorError,
    _remove_stale_metrics,
    check_reuse_port,
    reserve_ports,
)


def test_a_port_of_zero_is_picked_once_and_every_worker_can_bind_it() -> None:
    shared, held = reserve_ports(make_settings(grpc_port=0, ws_port=0))
    try:
        ports = {shared.grpc_port, shared.ws_port}
        assert 0 not in ports and len(ports) == 2
        for port in ports:
            for _ in range(2):  # two workers
                worker = socket.socket()
                worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                worker.bind(("127.0.0.1", port))
                worker.listen()
                held.append(worker)
            with socket.socket() as other, pytest.raises(OSError):  # no one else
                other.bind(("127.0.0.1", port))
    finally:
        for sock in held:
            sock.close()


def test_a_taken_port_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SupervisorError, match=f"the gRPC port 127.0.0.1:{port} is in use"):
            reserve_ports(make_settings(grpc_port=port))


def test_no_so_reuseport_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    with pytest.raises(SupervisorError, match="--workers needs SO_REUSEPORT"):
        check_reuse_port()


def test_serve_without_so_reuseport_stops_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXRELAY_", "OPENAI_"))}
    env.update(VOXRELAY_GRPC_PORT="0", VOXRELAY_WS_PORT="0", VOXRELAY_METRICS_PORT="0")
    env.update(VOXRELAY_HTTP_PORT="0")
    script = (
        "import socket; del socket.SO_REUSEPORT\n"
        "from voxrelay.gateways.cli import main\n"
        "raise SystemExit(main(['serve', '--workers', '2']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("voxrelay: --workers needs SO_REUSEPORT")


def test_zero_workers_is_one_per_core() -> None:
    assert make_settings(workers=0).worker_count() == len(os.sched_getaffinity(0))
    assert make_settings().worker_count() == 1
    assert make_settings(workers=3).worker_count() == 3


def test_metrics_directories_of_dead_supervisors_are_removed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    names = [f"voxrelay-metrics-{gone}-a", f"voxrelay-metrics-{os.getppid()}-b", f"{gone}-c"]
    for name in names:
        (tmp_path / name).mkdir()
    _remove_stale_metrics(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
