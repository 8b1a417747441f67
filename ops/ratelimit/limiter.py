"""Counting: one Lua script call per request, keyed per client and window (see the package docstring)."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from ops.models import RateLimitSettings
from ops.ratelimit.config import RateLimitConfig, _warnings
from persistence import redis_store
from persistence.keys import redis_key

logger = logging.getLogger(__name__)


# Counter keys outlive their window by this much, for clock differences between API hosts.
EXPIRY_SLACK_MS = 1000


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


def counter_key_base(client: str) -> str:
    """Prefix of a client's counters: ``<base>:<window s>:<window number>``.

    The client is hashed: API keys stay out of Redis key names, their length is bounded, and
    the braces (a Redis Cluster hash tag) keep one client's windows in one slot.
    """
    digest = hashlib.blake2b(client.encode(), digest_size=12).hexdigest()
    return redis_key("ratelimit", "c", f"{{{digest}}}")


def _window_keys(client: str, window: int, now_ms: int) -> tuple[str, str, int]:
    """(current window's key, previous window's key, ms elapsed in the current window)."""
    number, elapsed = divmod(now_ms, window * 1000)
    base = counter_key_base(client)
    return f"{base}:{window}:{number}", f"{base}:{window}:{number - 1}", elapsed


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_HIT_SCRIPT = redis_store.HotScript(_HIT)


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


def ratelimit_check(
    *, client: str, config: RateLimitConfig, read_key: str | None = None, limit: int | None = None
) -> Decision | None:
    """Count one request of the client; None when Redis cannot be asked (fail open).

    With ``read_key``, the entry is read in the same round trip (``HGETALL`` after the script)
    and left in :data:`PREFETCHED` of the current thread for the view: a rate-limited cache
    hit still costs one round trip to Redis. ``limit`` (an API key's own) overrides the config's.
    """
    if limit is None:
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
