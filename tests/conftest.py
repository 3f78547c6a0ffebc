"""Fixtures shared by every test module: real servers on free ports."""

from __future__ import annotations

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
