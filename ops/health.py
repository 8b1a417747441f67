"""Real checks of the three servers, each bounded in time."""

from __future__ import annotations

import time
from typing import Any

from django.db import connection
from redis.exceptions import RedisError

from persistence import jetstream, redis_store


def _timed(check: Any) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        ok, detail = check()
    except Exception as error:
        ok, detail = False, f"{type(error).__name__}: {error}".strip()
    result: dict[str, Any] = {
        "status": "healthy" if ok else "unhealthy",
        "latency_ms": round((time.perf_counter() - start) * 1000, 2),
    }
    if detail:
        result["error"] = detail
    return result


def _database() -> tuple[bool, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return True, ""


def _redis() -> tuple[bool, str]:
    try:
        return redis_store.ping(), ""
    except RedisError as error:
        return False, str(error)


def _nats() -> tuple[bool, str]:
    return jetstream.publisher().healthy(timeout=1.0)


def run_checks() -> dict[str, dict[str, Any]]:
    return {"database": _timed(_database), "redis": _timed(_redis), "nats": _timed(_nats)}
