"""Real checks of the three servers, each bounded in time."""

from __future__ import annotations

import time
from typing import Any

from django.db import connection
from redis.exceptions import RedisError

from persistence import jetstream, redis_store


def timed(check: Any) -> dict[str, Any]:
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


def check_database() -> tuple[bool, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return True, ""


def check_redis() -> tuple[bool, str]:
    try:
        return redis_store.ping(), ""
    except RedisError as error:
        return False, str(error)


def check_nats() -> tuple[bool, str]:
    return jetstream.publisher().healthy(timeout=1.0)


CHECKS = {"database": check_database, "redis": check_redis, "nats": check_nats}


def run_checks() -> dict[str, dict[str, Any]]:
    return {name: timed(check) for name, check in CHECKS.items()}
