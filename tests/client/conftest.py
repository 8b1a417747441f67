"""Fixtures of the client library's tests: clients on the session's real API, the rate limiter."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from birbnest_client import AsyncClient, Client


@pytest.fixture
def nest(api: Any) -> Iterator[Client]:
    """A sync client on the session's API (no key: loopback is served while no API key exists)."""
    with Client(api.url, api_key="", timeout=10) as client:
        yield client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def anest(api: Any) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(api.url, api_key="", timeout=10) as client:
        yield client


@pytest.fixture
def rate_limiter(transactional_db: Any) -> Iterator[Any]:
    """``enable(limit=…, window=…)`` turns the limiter on for every API process; off again after."""
    from ops.ratelimit import REFRESH_SECONDS, ratelimit_client_clear, ratelimit_settings_update

    def enable(*, limit: int, window: int) -> None:
        from tests.conftest import clear_of_window_edge

        ratelimit_settings_update(enabled=True, limit=limit, window=window, algorithm="fixed", by="tests")
        time.sleep(REFRESH_SECONDS + 0.1)  # every API process has re-read it
        clear_of_window_edge(window, margin=min(5.0, window * 0.6))

    yield enable
    ratelimit_settings_update(enabled=False, limit=100, window=60, algorithm="fixed", by="tests")
    ratelimit_client_clear(client="127.0.0.1")
    time.sleep(REFRESH_SECONDS + 0.1)
