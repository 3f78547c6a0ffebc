"""An open gRPC door's callers take turns at shared resources by their address."""

from __future__ import annotations

import pytest

from voxrelay.gateways.grpc_server import _host, _peer


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:203.0.113.7:50123", "203.0.113.7"),
        ("ipv6:[2001:db8::1]:443", "2001:db8::1"),
        ("unix:/run/voxrelay.sock", "unix:/run/voxrelay.sock"),
    ],
)
def test_the_address_of_a_peer(peer: str, host: str) -> None:
    assert _host(_peer(peer)) == host
