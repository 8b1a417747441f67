"""Rate limiting of the data plane (`/v1/`): per client, counted in Redis, applied by every API process.

- **Who is a client**: ``REMOTE_ADDR``, whatever the request's headers say: ``X-API-Key``,
  ``Authorization`` and ``X-Forwarded-For`` are not trusted (a key becomes an identity once the
  service verifies keys). ``/health``, ``/metrics`` and ``/admin/``
  are never limited.
- **Settings**: the ``RateLimitSettings`` row and the ``RateLimitClient`` rules in PostgreSQL are
  the source of truth. Every change (services below, the admin, any ``save()``/``delete()``
  through the model signals) is compiled to one small JSON document in Redis,
  ``<prefix>ratelimit:config``. Each API process keeps that document in memory and re-reads it
  at most every :data:`REFRESH_SECONDS` (one GET, by whichever request finds it stale; requests
  arriving meanwhile wait for that GET, up to :data:`REFRESH_WAIT_SECONDS`, instead of applying
  the old copy). So a change applies everywhere within about half a second. If
  the key is missing (Redis restarted empty), the process that notices rebuilds it from
  PostgreSQL; if PostgreSQL is down too, it keeps the last config it knew (disabled at start).
- **Counting**: one Lua script call per request (one round trip, atomic): ``fixed`` counts the
  requests a client was allowed in the current window (``INCR`` + ``PEXPIRE`` on a key per
  window); ``sliding`` weighs the previous window's count by the part of it still inside the
  sliding window (Cloudflare's approximation). Rejected requests are not counted, so a client
  that keeps hammering gets back in as soon as its allowance comes back. Windows are aligned on
  the epoch (the API hosts' clocks; keys outlive their window by a second for small skews), so
  every process agrees on them.
- **Answers**: over the limit → 429 ``RATE_LIMITED`` with ``X-RateLimit-Limit``,
  ``X-RateLimit-Remaining``, ``X-RateLimit-Reset`` (seconds until the window resets) and
  ``Retry-After``; allowed requests carry the three ``X-RateLimit-*`` headers. A blocked client
  → 403 ``FORBIDDEN`` ("blocked"), not 429: it is an operator's decision, and waiting does not
  lift it, so telling the client to retry would be wrong. A block applies even while rate
  limiting is disabled (it names one client; "enabled" is about the limits).
- **Redis down**: fail open (the request goes through), with a warning at most every 10 s.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.http import HttpRequest, HttpResponse
from redis.exceptions import RedisError

from birbnest.errors import error_response
from ops.models import RateLimitClient, RateLimitSettings
from persistence import redis_store

logger = logging.getLogger(__name__)

DATA_PLANE_PREFIX = "/v1/"
SETTINGS_PK = 1
REFRESH_SECONDS = 0.5
# While one request re-reads a stale config, the others wait this long for it (one Redis GET)
# rather than apply the old one; only a Redis that does not answer makes them go on without it.
REFRESH_WAIT_SECONDS = 0.25
# After a failed rebuild from PostgreSQL, do not try again (on the request path) for this long.
REBUILD_BACKOFF_SECONDS = 5.0
# Counter keys outlive their window by this much, for clock differences between API hosts.
EXPIRY_SLACK_MS = 1000
MAX_INT = 2_147_483_647  # PositiveIntegerField
ALGORITHMS = (RateLimitSettings.FIXED, RateLimitSettings.SLIDING)

# KEYS: the client's counter for the current window [, for the previous window (sliding)].
# ARGV: limit, window ms, ms elapsed in the current window, expiry slack ms.
# -> {allowed 1|0, remaining, retry after ms (0 when allowed)}
_HIT = """
local limit = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
local elapsed = tonumber(ARGV[3])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if #KEYS == 1 then
  if cur >= limit then return {0, 0, w - elapsed} end
  cur = redis.call('INCR', KEYS[1])
  if cur == 1 then redis.call('PEXPIRE', KEYS[1], w - elapsed + tonumber(ARGV[4])) end
  return {1, limit - cur, 0}
end
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local weighted = prev * (w - elapsed) / w
if weighted + cur + 1 > limit then
  local retry
  local room = limit - cur - 1
  if room >= 0 then
    -- still in this window, once enough of the previous one has slid out
    retry = math.ceil(w - room * w / prev - elapsed)
  elseif limit >= 1 then
    -- in the next window, once enough of this one has slid out
    retry = (w - elapsed) + math.ceil(w - (limit - 1) * w / cur)
  else
    retry = 2 * w - elapsed
  end
  return {0, 0, math.max(retry, 1)}
end
cur = redis.call('INCR', KEYS[1])
if cur == 1 then redis.call('PEXPIRE', KEYS[1], 2 * w - elapsed + tonumber(ARGV[4])) end
return {1, math.max(0, math.floor(limit - weighted - cur)), 0}
"""


# --- the compiled config ---------------------------------------------------------------------


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
    return f"{settings.BIRB.redis_key_prefix}ratelimit:config"


def counter_key_base(client: str) -> str:
    """Prefix of a client's counters: ``<base>:<window s>:<window number>``.

    The client is hashed: API keys stay out of Redis key names, their length is bounded, and
    the braces (a Redis Cluster hash tag) keep one client's windows in one slot.
    """
    digest = hashlib.blake2b(client.encode(), digest_size=12).hexdigest()
    return f"{settings.BIRB.redis_key_prefix}ratelimit:c:{{{digest}}}"


def _window_keys(client: str, window: int, now_ms: int) -> tuple[str, str, int]:
    """(current window's key, previous window's key, ms elapsed in the current window)."""
    number, elapsed = divmod(now_ms, window * 1000)
    base = counter_key_base(client)
    return f"{base}:{window}:{number}", f"{base}:{window}:{number - 1}", elapsed


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- logging that cannot flood ------------------------------------------------------------------


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


# --- this process's copy of the config -----------------------------------------------------------


class _ConfigCache:
    """The config as this process applies it, refreshed from Redis at most every REFRESH_SECONDS."""

    def __init__(self) -> None:
        self.config = DEFAULT_CONFIG
        self.raw: bytes | None = None
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

    def apply(self, raw: bytes) -> None:
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
        now = time.monotonic()
        self.fresh_until = now + REFRESH_SECONDS
        try:
            raw = redis_store.client().get(config_key())
        except RedisError as error:
            _warnings.warning("rate-limit config not refreshed, Redis unreachable; keeping the last one", error=error)
            return
        if raw is None:
            raw = self._rebuild(now)
            if raw is None:
                return
        self.apply(raw)

    def _rebuild(self, now: float) -> bytes | None:
        """Redis lost the config: compile it from PostgreSQL and store it unless someone was faster."""
        if now < self.rebuild_after:
            return None
        try:
            raw = ratelimit_settings_get().to_json()
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


# --- services ---------------------------------------------------------------------------------------


class RateLimitSettingsError(ValueError):
    """A rate-limit setting with a value it cannot take."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"invalid value for {name}: {value!r} (expected {expected})")


def _check_int(name: str, value: Any) -> int:
    if type(value) is not int or not 1 <= value <= MAX_INT:
        raise RateLimitSettingsError(name, value, f"an integer from 1 to {MAX_INT}")
    return value


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


def ratelimit_settings_get() -> RateLimitConfig:
    """The settings as PostgreSQL holds them (the source of truth), compiled."""
    row = RateLimitSettings.objects.filter(pk=SETTINGS_PK).first() or RateLimitSettings(pk=SETTINGS_PK)
    return _compile(row)


def ratelimit_settings_update(
    *,
    enabled: bool | None = None,
    limit: int | None = None,
    window: int | None = None,
    algorithm: str | None = None,
    by: str = "",
) -> RateLimitConfig:
    """Change the given settings (None = leave as is), store them and publish them.

    Raises :class:`RateLimitSettingsError` for a bad value, and ``RedisError`` when the change
    is committed in PostgreSQL but could not be published (apply it by saving again).
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise RateLimitSettingsError("enabled", enabled, "true or false")
    if limit is not None:
        _check_int("limit", limit)
    if window is not None:
        _check_int("window", window)
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise RateLimitSettingsError("algorithm", algorithm, " or ".join(ALGORITHMS))
    with transaction.atomic():
        RateLimitSettings.objects.bulk_create([RateLimitSettings(pk=SETTINGS_PK)], ignore_conflicts=True)
        row = RateLimitSettings.objects.select_for_update().get(pk=SETTINGS_PK)
        for name, value in (("enabled", enabled), ("limit", limit), ("window", window), ("algorithm", algorithm)):
            if value is not None:
                setattr(row, name, value)
        row.updated_by = by[:150]
        row.save()  # the post_save signal publishes once the transaction commits
    return ratelimit_settings_get()


def _clean_client(client: str) -> str:
    cleaned = (client or "").strip()
    if not cleaned or len(cleaned) > 255:
        raise RateLimitSettingsError("client", client, "an API key or IP address of 1 to 255 characters")
    return cleaned


def ratelimit_client_block(*, client: str) -> bool:
    """Block a client (creating its rule). Returns False if it was blocked already."""
    client = _clean_client(client)
    with transaction.atomic():
        rule, created = RateLimitClient.objects.select_for_update().get_or_create(
            client=client, defaults={"blocked": True}
        )
        changed = created or not rule.blocked
        if not created:
            # Saved even when already blocked: the save publishes, which repairs a config that
            # an earlier publish failed to store.
            rule.blocked = True
            rule.save(update_fields=["blocked", "updated_at"])
    return changed


def ratelimit_client_unblock(*, client: str) -> bool:
    """Lift a block. Returns False if the client was not blocked."""
    client = _clean_client(client)
    with transaction.atomic():
        rule = RateLimitClient.objects.select_for_update().filter(client=client, blocked=True).first()
        if rule is not None:
            rule.blocked = False
            rule.save(update_fields=["blocked", "updated_at"])
    if rule is None:
        ratelimit_config_publish()  # nothing changed; make sure Redis agrees
        return False
    return True


def ratelimit_client_clear(*, client: str) -> int:
    """Reset a client's counters (it starts the window afresh). Returns the keys deleted.

    Counters are named by client and window number, so the keys that can matter are known:
    the previous, current and next windows of the window length in force (the next one in
    case another host's clock is ahead). No SCAN over the keyspace.
    """
    client = _clean_client(client)
    window = current_config().window
    current, previous, _ = _window_keys(client, window, _now_ms())
    following = f"{counter_key_base(client)}:{window}:{int(current.rsplit(':', 1)[1]) + 1}"
    return int(redis_store.client().delete(previous, current, following))


def ratelimit_client_counts(*, clients: list[str]) -> dict[str, int | None]:
    """Requests each client made in the current window (weighted as the limiter weighs them for
    ``sliding``), in one pipelined read; None for all when Redis is unreachable."""
    if not clients:
        return {}
    config = current_config()
    now_ms = _now_ms()
    window_ms = config.window * 1000
    sliding = config.algorithm == RateLimitSettings.SLIDING
    pipe = redis_store.client().pipeline(transaction=False)
    for client in clients:
        current, previous, _ = _window_keys(client, config.window, now_ms)
        pipe.get(current)
        if sliding:
            pipe.get(previous)
    try:
        values = [int(value or 0) for value in pipe.execute()]
    except RedisError as error:
        _warnings.warning("rate-limit counters not read, Redis unreachable", error=error)
        return dict.fromkeys(clients)
    if not sliding:
        return dict(zip(clients, values, strict=True))
    weight = (window_ms - now_ms % window_ms) / window_ms
    return {client: values[2 * i] + math.floor(values[2 * i + 1] * weight) for i, client in enumerate(clients)}


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


def _publish_on_commit(sender: Any, **kwargs: Any) -> None:
    # Not robust on purpose: a caller whose change could not be published must hear about it.
    transaction.on_commit(ratelimit_config_publish)


for _model in (RateLimitSettings, RateLimitClient):
    post_save.connect(_publish_on_commit, sender=_model, dispatch_uid=f"ratelimit-publish-save-{_model.__name__}")
    post_delete.connect(_publish_on_commit, sender=_model, dispatch_uid=f"ratelimit-publish-delete-{_model.__name__}")


# --- the middleware -------------------------------------------------------------------------------


_HIT_SCRIPT = redis_store.HotScript(_HIT)
ENTRY_PREFIX = "/v1/cache/"
NOT_AN_ENTRY = ("batch/get",)


def _entry_read_by(request: HttpRequest) -> str | None:
    """The key a ``GET /v1/cache/<key>`` will read (the view validates it), else None."""
    if request.method != "GET":
        return None
    path = request.path_info
    if not path.startswith(ENTRY_PREFIX):
        return None
    key = path[len(ENTRY_PREFIX) :]
    return key if key and key not in NOT_AN_ENTRY else None


def client_identity(request: HttpRequest) -> str:
    """Who is counted: the peer's address.

    A key the client sends (``X-API-Key``, ``Authorization``) is not an identity until the
    service has verified it: counted by whatever the header said, a client escaped its limit
    and an operator's block by sending a new made-up key with every request.
    """
    return request.META.get("REMOTE_ADDR") or "unknown"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the window resets
    retry_after: int  # seconds; 0 when allowed

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


def ratelimit_check(*, client: str, config: RateLimitConfig, read_key: str | None = None) -> Decision | None:
    """Count one request of the client; None when Redis cannot be asked (fail open).

    With ``read_key``, the entry is read in the same round trip (``HGETALL`` after the script)
    and left in :data:`PREFETCHED` of the current thread for the view: a rate-limited cache
    hit still costs one round trip to Redis.
    """
    limit = config.limit_for(client)
    now_ms = _now_ms()
    current, previous, elapsed = _window_keys(client, config.window, now_ms)
    keys = [current, previous] if config.algorithm == RateLimitSettings.SLIDING else [current]
    window_ms = config.window * 1000
    commands = [_HIT_SCRIPT.command(keys, [limit, window_ms, elapsed, EXPIRY_SLACK_MS])]
    if read_key is not None:
        commands.append(redis_store.read_command(read_key))
    try:
        replies = redis_store.round_trip(*commands, scripts=(_HIT_SCRIPT,))
        allowed, remaining, retry_ms = redis_store.checked(replies[0])
    except RedisError as error:
        _warnings.warning("rate limit not applied, Redis unreachable (failing open)", error=error)
        return None
    if read_key is not None:
        redis_store.prefetched_set(read_key, replies[1])
    return Decision(
        allowed=bool(allowed),
        limit=limit,
        remaining=int(remaining),
        reset=-(-(window_ms - elapsed) // 1000),
        retry_after=max(1, -(-int(retry_ms) // 1000)) if not allowed else 0,
    )


def _blocked_response() -> HttpResponse:
    return error_response(
        403,
        "FORBIDDEN",
        "this client is blocked by an operator; ask them to unblock it",
        {"blocked": True},
    )


def _limited_response(decision: Decision, config: RateLimitConfig) -> HttpResponse:
    return error_response(
        429,
        "RATE_LIMITED",
        f"rate limit of {decision.limit} requests per {config.window}s exceeded; retry in {decision.retry_after}s",
        {
            "limit": decision.limit,
            "window": config.window,
            "algorithm": config.algorithm,
            "remaining": 0,
            "reset": decision.reset,
            "retry_after": decision.retry_after,
        },
        headers=decision.headers(),
    )


def ratelimit_middleware(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    def middleware(request: HttpRequest) -> HttpResponse:
        if not request.path_info.startswith(DATA_PLANE_PREFIX):
            return get_response(request)
        config = _cache.get()
        if not config.active:  # the default: a prefix test and a clock read
            return get_response(request)
        client = client_identity(request)
        if client in config.blocked:
            return _blocked_response()
        if not config.enabled:
            return get_response(request)
        decision = ratelimit_check(client=client, config=config, read_key=_entry_read_by(request))
        if decision is None:
            return get_response(request)
        if not decision.allowed:
            redis_store.prefetched_clear()
            return _limited_response(decision, config)
        try:
            response = get_response(request)
        finally:
            redis_store.prefetched_clear()
        for name, value in decision.headers().items():
            response[name] = value
        return response

    return middleware
