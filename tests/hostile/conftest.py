"""Helpers of the hostile-input suite: every case asserts the status and the contract's JSON
error body, that the service is still healthy afterwards, and that a refused write stored nothing.

The cases run against a real ``manage.py runapi`` (granian, WSGI) over real PostgreSQL, Redis and
NATS JetStream: what breaks a process only shows in the process the way it is served.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import wait_for

ERROR_FIELDS = {"error", "code", "details"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The contract's error body with this status and code; returns the body."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = orjson.loads(response.content)
    assert set(body) == ERROR_FIELDS, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"], body
    return body


def assert_healthy(base_url: str, timeout: float = 10.0) -> None:
    """``/health`` answers 200 with every check healthy (within ``timeout``)."""

    def healthy() -> bool:
        try:
            response = httpx.get(f"{base_url}/health", timeout=5)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    wait_for(healthy, timeout=timeout, message=f"{base_url}/health to answer 200")


def assert_not_stored(base_url: str, key: str) -> None:
    """A refused write left nothing behind: the key reads as absent."""
    response = httpx.get(f"{base_url}/v1/cache/{key}", timeout=10)
    assert_error(response, 404, "NOT_FOUND")


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    """Sockets a test opens; every one is closed at the end, whatever happened."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()
