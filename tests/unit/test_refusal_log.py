"""Refusals are logged a few times a second per peer, and every one is counted."""

from __future__ import annotations

from voxrelay.service.relay import RefusalLog


def test_a_peer_gets_a_few_lines_a_second_and_the_next_says_how_many_it_stands_for() -> None:
    log = RefusalLog(per_second=3)
    verdicts = [log.admit("a:1", 100.2) for _ in range(10)]
    assert verdicts == [(True, 0)] * 3 + [(False, 0)] * 7
    assert log.admit("b:2", 100.3) == (True, 0)  # another peer is not held back
    assert log.admit("a:1", 101.0) == (True, 7)
    assert log.admit("a:1", 101.5) == (True, 0)


def test_the_peers_remembered_are_bounded() -> None:
    log = RefusalLog(per_second=1, max_peers=2)
    for peer in ("a", "b", "c"):
        log.admit(peer, 5.0)
    assert log.admit("a", 5.0) == (True, 0)  # forgotten, so counted afresh
    assert log.admit("c", 5.0) == (False, 0)
