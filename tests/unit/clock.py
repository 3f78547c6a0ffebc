"""A clock for unit tests of time-based logic: it moves only when the test says so."""

from __future__ import annotations

__all__ = ["Clock"]


class Clock:
    """A clock the test moves by hand: pass it where the code takes a ``clock()``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
