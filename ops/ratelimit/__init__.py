"""Rate limiting of the data plane (`/v1/`): per client, counted in Redis, applied by every API process.

Modules: ``config`` (the compiled config and each process's copy), ``limiter`` (the counting
script), ``services`` (changing settings and rules), ``middleware`` (the data plane's hook),
``api`` (`/admin/ratelimit`), ``admin`` (the console pages).

- **Who is a client**: the API key ``ops.access`` verified (its public id; its own rate limit, if
  it has one, wins), else ``REMOTE_ADDR``. ``X-Forwarded-For`` is not trusted, and an unverified
  key never reaches the limiter (401). ``/health``, ``/metrics`` and ``/admin/`` are never limited.
- **Settings**: the ``RateLimitSettings`` row and the ``RateLimitClient`` rules in PostgreSQL are
  the source of truth. Every change (services below, the admin, any ``save()``/``delete()``
  through the model signals) is compiled to one small JSON document in Redis,
  ``<prefix>ratelimit:config``, which each API process keeps in memory and re-reads at most every
  :data:`REFRESH_SECONDS` (:mod:`ops.published`: a change applies everywhere within about half a
  second; a lost document is rebuilt from PostgreSQL; with both down a process keeps the last
  config it knew, disabled at start).
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

from ops.ratelimit.config import (
    REFRESH_SECONDS,
    RateLimitConfig,
    config_key,
    current_config,
    ratelimit_config_live,
    ratelimit_config_publish,
    ratelimit_settings_get,
    ratelimit_settings_row,
)
from ops.ratelimit.limiter import Decision, ratelimit_check
from ops.ratelimit.services import (
    RateLimitSettingsError,
    ratelimit_client_block,
    ratelimit_client_clear,
    ratelimit_client_counts,
    ratelimit_client_unblock,
    ratelimit_settings_update,
)

__all__ = [
    "REFRESH_SECONDS",
    "Decision",
    "RateLimitConfig",
    "RateLimitSettingsError",
    "config_key",
    "current_config",
    "ratelimit_check",
    "ratelimit_client_block",
    "ratelimit_client_clear",
    "ratelimit_client_counts",
    "ratelimit_client_unblock",
    "ratelimit_config_live",
    "ratelimit_config_publish",
    "ratelimit_settings_get",
    "ratelimit_settings_row",
    "ratelimit_settings_update",
]
