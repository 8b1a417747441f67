"""The rate-limit config every API process applies: compiled from PostgreSQL, published to
Redis as one small JSON document, cached in each process and re-read at most every
:data:`REFRESH_SECONDS` (see the package docstring)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.db import transaction
from django.db.models import Q
from redis.exceptions import RedisError

from ops.models import RateLimitClient, RateLimitSettings
from persistence import redis_store
from persistence.keys import redis_key

logger = logging.getLogger(__name__)


SETTINGS_PK = 1


REFRESH_SECONDS = 0.5


# While one request re-reads a stale config, the others wait for it (one Redis GET) rather than
# apply the old one. The GET itself gives up after the Redis socket timeout (2 s), so this only
# has to outlast that: only a Redis that does not answer makes them go on without it. (A quarter
# of a second was too short on a busy 2-core machine: a request of a burst applied the previous
# limit while the refresher waited for the CPU.)
REFRESH_WAIT_SECONDS = 2.5


# After a failed rebuild from PostgreSQL, do not try again (on the request path) for this long.
REBUILD_BACKOFF_SECONDS = 5.0


ALGORITHMS = (RateLimitSettings.FIXED, RateLimitSettings.SLIDING)


@dataclass(frozen=True)
class RateLimitConfig:
    """What every API process applies: the settings row plus the per-client rules."""

    enabled: bool = False
    limit: int = 100
    window: int = 60
    algorithm: str = RateLimitSettings.FIXED
    overrides: dict[str, int] = field(default_factory=dict)
    blocked: frozenset[str] = frozenset()
    updated_at: str | None = None
    updated_by: str = ""

    @property
    def active(self) -> bool:
        """Whether the middleware has anything to do at all."""
        return self.enabled or bool(self.blocked)

    def limit_for(self, client: str) -> int:
        return self.overrides.get(client, self.limit)

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "limit": self.limit,
            "window": self.window,
            "algorithm": self.algorithm,
            "overrides": dict(sorted(self.overrides.items())),
            "blocked": sorted(self.blocked),
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.as_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> RateLimitConfig:
        data = orjson.loads(raw)
        algorithm = data["algorithm"]
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        return cls(
            enabled=bool(data["enabled"]),
            limit=int(data["limit"]),
            window=max(1, int(data["window"])),
            algorithm=algorithm,
            overrides={str(client): int(limit) for client, limit in data.get("overrides", {}).items()},
            blocked=frozenset(str(client) for client in data.get("blocked", [])),
            updated_at=data.get("updated_at"),
            updated_by=data.get("updated_by", ""),
        )


DEFAULT_CONFIG = RateLimitConfig()


def config_key() -> str:
    return redis_key("ratelimit", "config")


class _ThrottledLog:
    """At most one warning per interval; the ones left out are counted in the next."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0
        self.lock = threading.Lock()

    def warning(self, message: str, *args: Any, error: BaseException | None = None) -> None:
        now = time.monotonic()
        with self.lock:
            if now < self.next_at:
                self.suppressed += 1
                return
            suppressed, self.suppressed, self.next_at = self.suppressed, 0, now + self.interval
        extra: dict[str, Any] = {"suppressed": suppressed}
        if error is not None:
            extra["error"] = f"{type(error).__name__}: {error}"
        logger.warning(message, *args, extra=extra)


_warnings = _ThrottledLog(10.0)


class _ConfigCache:
    """The config as this process applies it, refreshed from Redis at most every REFRESH_SECONDS."""

    def __init__(self) -> None:
        self.config = DEFAULT_CONFIG
        self.raw: bytes | str | None = None  # redis-py types replies as either
        self.fresh_until = 0.0
        self.rebuild_after = 0.0
        self.lock = threading.Lock()

    def get(self) -> RateLimitConfig:
        if time.monotonic() < self.fresh_until:
            return self.config
        # One thread refreshes; the others wait for it (one GET, no thundering herd) and then
        # find the config fresh. If Redis hangs, they go on with the copy they have.
        if self.lock.acquire(timeout=REFRESH_WAIT_SECONDS):
            try:
                if time.monotonic() >= self.fresh_until:
                    self._refresh()
            finally:
                self.lock.release()
        return self.config

    def apply(self, raw: bytes | str) -> None:
        if raw == self.raw:
            return
        try:
            config = RateLimitConfig.from_json(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            _warnings.warning("rate-limit config in Redis is not valid; keeping the last one", error=error)
            return
        self.config, self.raw = config, raw

    def expire(self) -> None:
        """Re-read on the next request (tests, and after this process published)."""
        self.fresh_until = 0.0

    def _refresh(self) -> None:
        # Fresh only once the new copy is in place: requests arriving during the GET must wait
        # for it (get() sends them to the lock), not take the copy being replaced as fresh.
        now = time.monotonic()
        try:
            raw = redis_store.client().get(config_key())
        except RedisError as error:
            _warnings.warning("rate-limit config not refreshed, Redis unreachable; keeping the last one", error=error)
            raw = None
        else:
            if raw is None:
                raw = self._rebuild(now)
        if raw is not None:
            self.apply(raw)
        self.fresh_until = time.monotonic() + REFRESH_SECONDS

    def _rebuild(self, now: float) -> bytes | str | None:
        """Redis lost the config: compile it from PostgreSQL and store it unless someone was faster."""
        if now < self.rebuild_after:
            return None
        try:
            raw: bytes | str = ratelimit_settings_get().to_json()
        except Exception as error:  # PostgreSQL down or worse: never fail a request over this
            self.rebuild_after = now + REBUILD_BACKOFF_SECONDS
            _warnings.warning(
                "rate-limit config missing in Redis and PostgreSQL unreachable; keeping the last one", error=error
            )
            return None
        try:
            # NX: a publish that happened meanwhile is newer than what we read; keep it.
            if not redis_store.client().set(config_key(), raw, nx=True):
                raw = redis_store.client().get(config_key()) or raw
            else:
                logger.info("rate-limit config rebuilt in Redis from PostgreSQL")
        except RedisError as error:
            _warnings.warning("rate-limit config rebuilt but not stored in Redis", error=error)
        return raw


_cache = _ConfigCache()


def current_config() -> RateLimitConfig:
    """The config this process applies now (refreshed from Redis when stale)."""
    return _cache.get()


def _client_rules() -> tuple[dict[str, int], list[str]]:
    overrides: dict[str, int] = {}
    blocked: list[str] = []
    rules = RateLimitClient.objects.filter(Q(blocked=True) | Q(limit__isnull=False))
    for client, limit, is_blocked in rules.values_list("client", "limit", "blocked"):
        if is_blocked:
            blocked.append(client)
        if limit is not None:
            overrides[client] = limit
    return overrides, blocked


def _compile(row: RateLimitSettings) -> RateLimitConfig:
    overrides, blocked = _client_rules()
    return RateLimitConfig(
        enabled=row.enabled,
        limit=row.limit,
        window=row.window,
        algorithm=row.algorithm,
        overrides=overrides,
        blocked=frozenset(blocked),
        updated_at=row.updated_at.isoformat() if row.updated_at else None,
        updated_by=row.updated_by,
    )


def ratelimit_settings_row() -> RateLimitSettings:
    """The one settings row, created with the defaults if it is missing."""
    row, _ = RateLimitSettings.objects.get_or_create(pk=SETTINGS_PK)
    return row


def ratelimit_config_live() -> RateLimitConfig | None:
    """The config in Redis, which every API process applies (None when it is missing)."""
    raw = redis_store.client().get(config_key())
    return None if raw is None else RateLimitConfig.from_json(raw)


def ratelimit_config_publish() -> RateLimitConfig:
    """Compile the settings from PostgreSQL and write them to Redis; every API process applies
    them within REFRESH_SECONDS (this one at once). Raises ``RedisError`` if Redis is down.

    The row lock orders concurrent publishers: each one reads PostgreSQL after the previous one
    wrote Redis, so the last write is always of the newest committed state.
    """
    with transaction.atomic():
        RateLimitSettings.objects.bulk_create([RateLimitSettings(pk=SETTINGS_PK)], ignore_conflicts=True)
        config = _compile(RateLimitSettings.objects.select_for_update().get(pk=SETTINGS_PK))
        raw = config.to_json()
        redis_store.client().set(config_key(), raw)
    _cache.apply(raw)
    return config


def ratelimit_settings_get() -> RateLimitConfig:
    """The settings as PostgreSQL holds them (the source of truth), compiled."""
    row = RateLimitSettings.objects.filter(pk=SETTINGS_PK).first() or RateLimitSettings(pk=SETTINGS_PK)
    return _compile(row)
