"""Small documents every API process applies without asking PostgreSQL on the request path.

PostgreSQL is the source of truth; a change is compiled to one JSON document and written to one
Redis key. Each API process keeps the parsed document in memory and re-reads the key at most every
:data:`REFRESH_SECONDS` (one GET, by whichever request finds its copy stale; requests arriving
meanwhile wait for that GET, up to :data:`REFRESH_WAIT_SECONDS`, instead of applying the old
copy). So a change applies everywhere within about half a second.

If the key is missing (Redis restarted empty), the process that notices compiles the document
from PostgreSQL and stores it (unless another process was faster). If Redis cannot be reached,
the process keeps the copy it has; one that has none yet compiles it from PostgreSQL. If
PostgreSQL is unreachable too, it keeps what it has (the document's default at start).

Used by the rate-limit config (``ops.ratelimit.config``) and the API keys (``ops.access.keyring``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from django.db import connection, transaction
from redis.exceptions import RedisError

from persistence import redis_store
from persistence.keys import redis_key

logger = logging.getLogger(__name__)

T = TypeVar("T")

REFRESH_SECONDS = 0.5


# While one request re-reads a stale document, the others wait for it (one Redis GET) rather than
# apply the old one. The GET itself gives up after the Redis socket timeout (2 s), so this only
# has to outlast that: only a Redis that does not answer makes them go on without it. (A quarter
# of a second was too short on a busy 2-core machine: a request of a burst applied the previous
# limit while the refresher waited for the CPU.)
REFRESH_WAIT_SECONDS = 2.5


# After a failed compile from PostgreSQL, do not try again (on the request path) for this long.
REBUILD_BACKOFF_SECONDS = 5.0


class ThrottledLog:
    """At most one warning per interval; the ones left out are counted in the next."""

    def __init__(self, interval: float, log: logging.Logger = logger) -> None:
        self.interval = interval
        self.log = log
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
        self.log.warning(message, *args, extra=extra)


class PublishedDocument(Generic[T]):
    """One document as this process applies it.

    ``parse`` turns the stored JSON into the value (raising ``ValueError``, ``KeyError``,
    ``TypeError`` or ``AttributeError`` on a bad one, which is then ignored); ``compile`` builds
    the JSON from PostgreSQL.
    """

    def __init__(
        self,
        *,
        name: str,
        key_parts: tuple[str, ...],
        parse: Callable[[bytes | str], T],
        compile: Callable[[], bytes],
        default: T,
    ) -> None:
        self.name = name
        self.key_parts = key_parts
        self.parse = parse
        self.compile = compile
        self.value: T = default
        self.raw: bytes | str | None = None  # redis-py types replies as either
        self.fresh_until = 0.0
        self.rebuild_after = 0.0
        self.lock = threading.Lock()
        self.warnings = ThrottledLog(10.0)

    def key(self) -> str:
        return redis_key(*self.key_parts)

    def get(self) -> T:
        if time.monotonic() < self.fresh_until:
            return self.value
        # One thread refreshes; the others wait for it (one GET, no thundering herd) and then
        # find the document fresh. If Redis hangs, they go on with the copy they have.
        if self.lock.acquire(timeout=REFRESH_WAIT_SECONDS):
            try:
                if time.monotonic() >= self.fresh_until:
                    self._refresh()
            finally:
                self.lock.release()
        return self.value

    def apply(self, raw: bytes | str) -> None:
        if raw == self.raw:
            return
        try:
            value = self.parse(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self.warnings.warning("%s in Redis is not valid; keeping the last one", self.name, error=error)
            return
        self.value, self.raw = value, raw

    def expire(self) -> None:
        """Re-read on the next request (tests, and after this process published)."""
        self.fresh_until = 0.0

    def live(self) -> T | None:
        """The document in Redis, as every API process applies it (None when it is missing)."""
        raw = redis_store.client().get(self.key())
        return None if raw is None else self.parse(raw)

    def publish(self) -> T:
        """Compile the document from PostgreSQL and write it to Redis; every API process applies it
        within REFRESH_SECONDS (this one at once). Raises ``RedisError`` if Redis is down.

        A transaction-scoped advisory lock orders concurrent publishers: each one reads PostgreSQL
        after the previous one wrote Redis, so the last write is always of the newest committed state.
        """
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [self.key()])
            raw = self.compile()
            redis_store.client().set(self.key(), raw)
        self.apply(raw)
        self.fresh_until = time.monotonic() + REFRESH_SECONDS
        return self.value

    def _refresh(self) -> None:
        # Fresh only once the new copy is in place: requests arriving during the GET must wait
        # for it (get() sends them to the lock), not take the copy being replaced as fresh.
        now = time.monotonic()
        try:
            raw = redis_store.client().get(self.key())
        except RedisError as error:
            self.warnings.warning("%s not refreshed, Redis unreachable; keeping the last one", self.name, error=error)
            # A process that has no copy yet compiles one (it cannot store it).
            raw = self._compiled(now) if self.raw is None else None
        else:
            if raw is None:
                raw = self._rebuild(now)
        if raw is not None:
            self.apply(raw)
        self.fresh_until = time.monotonic() + REFRESH_SECONDS

    def _compiled(self, now: float) -> bytes | None:
        if now < self.rebuild_after:
            return None
        try:
            return self.compile()
        except Exception as error:  # PostgreSQL down or worse: never fail a request over this
            self.rebuild_after = now + REBUILD_BACKOFF_SECONDS
            self.warnings.warning("%s could not be read from PostgreSQL; keeping the last one", self.name, error=error)
            return None

    def _rebuild(self, now: float) -> bytes | str | None:
        """Redis lost the document: compile it from PostgreSQL and store it unless someone was faster."""
        raw: bytes | str | None = self._compiled(now)
        if raw is None:
            return None
        try:
            # NX: a publish that happened meanwhile is newer than what we read; keep it.
            if not redis_store.client().set(self.key(), raw, nx=True):
                raw = redis_store.client().get(self.key()) or raw
            else:
                logger.info("%s rebuilt in Redis from PostgreSQL", self.name)
        except RedisError as error:
            self.warnings.warning("%s rebuilt but not stored in Redis", self.name, error=error)
        return raw
