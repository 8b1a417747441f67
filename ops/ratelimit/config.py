"""The rate-limit config every API process applies: compiled from PostgreSQL, published to
Redis as one small JSON document, cached in each process and re-read at most every
:data:`REFRESH_SECONDS` (see the package docstring)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.db.models import Q

from ops.models import RateLimitClient, RateLimitSettings
from ops.published import REFRESH_SECONDS as REFRESH_SECONDS
from ops.published import PublishedDocument, ThrottledLog
from persistence.keys import redis_key

logger = logging.getLogger(__name__)


SETTINGS_PK = 1


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


CONFIG_KEY_PARTS = ("ratelimit", "config")


def config_key() -> str:
    return redis_key(*CONFIG_KEY_PARTS)


def _parse(raw: bytes | str) -> RateLimitConfig:
    return RateLimitConfig.from_json(raw)


def _compile_current() -> bytes:
    return ratelimit_settings_get().to_json()


def new_cache() -> PublishedDocument[RateLimitConfig]:
    """A process's copy of the config (one per process: :data:`_cache`; tests make their own)."""
    return PublishedDocument(
        name="rate-limit config",
        key_parts=CONFIG_KEY_PARTS,
        parse=_parse,
        compile=_compile_current,
        default=DEFAULT_CONFIG,
    )


_cache = new_cache()
_warnings = ThrottledLog(10.0, logger)


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
    return _cache.live()


def ratelimit_config_publish() -> RateLimitConfig:
    """Compile the settings from PostgreSQL and write them to Redis; every API process applies
    them within REFRESH_SECONDS (this one at once). Raises ``RedisError`` if Redis is down."""
    RateLimitSettings.objects.bulk_create([RateLimitSettings(pk=SETTINGS_PK)], ignore_conflicts=True)
    return _cache.publish()


def ratelimit_settings_get() -> RateLimitConfig:
    """The settings as PostgreSQL holds them (the source of truth), compiled."""
    row = RateLimitSettings.objects.filter(pk=SETTINGS_PK).first() or RateLimitSettings(pk=SETTINGS_PK)
    return _compile(row)
