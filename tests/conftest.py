"""Fixtures shared by every test module: real servers on free ports."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.servers import make_settings
from voxrelay.gateways.app import App

#: Fixtures of real system servers (skipped, with the target to install them, when absent).
pytest_plugins = ["tests.redis_server"]

AppFactory = Callable[..., Awaitable[App]]


@pytest.fixture
async def app_factory() -> AsyncIterator[AppFactory]:
    """Start the whole app (gRPC, WebSocket, metrics) with setting overrides; stop it after.

    ``app = await app_factory(max_input_chars=50)``. An app the test already drained
    and stopped is not stopped again.
    """
    apps: list[App] = []

    async def start(**overrides: Any) -> App:
        app = App(make_settings(**overrides))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in reversed(apps):
        if not app.runtime.draining:
            await app.drain_and_stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """End the run with what it skipped and why: a skipped test is not a passing one."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.section(f"skipped {sum(reasons.values())} tests: not run, not passed")
    for reason, count in sorted(reasons.items()):
        terminalreporter.write_line(f"{count:4d} x {reason}")
