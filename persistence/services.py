"""The one write path and the one read path of cache entries.

Write (set or delete):
  1. assign the next version for the key atomically in Redis (seeded from PostgreSQL when Redis
     has no counter; checks ``If-Match`` in the same step);
  2. publish the persist message to ``cache.persist.<op>`` with ``Nats-Msg-Id = <key>:<version>``
     and wait for the PubAck; no PubAck -> :class:`ServiceUnavailableError`, nothing visible;
  3. store the entry (or a tombstone) in Redis unless a newer version is already there;
  then the caller answers. The worker writes PostgreSQL later (write-behind).

Read: Redis; on a miss PostgreSQL (one query per key per process however many readers wait),
and the row is put back in Redis with the TTL it has left.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pybreaker
from django.conf import settings
from django.db import DatabaseError
from redis.exceptions import RedisError

from birbnest.metrics import CACHE_HITS, CACHE_MISSES
from persistence import jetstream, redis_store, selectors
from persistence.errors import (
    BatchTooLargeError,
    KeyNotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    VersionMismatchError,
)
from persistence.messages import (
    OP_DELETE,
    OP_SET,
    PersistWrite,
    encode,
    isoformat,
    max_message_size,
    message_id,
)
from persistence.redis_store import TOMBSTONE, StoredEntry, Tombstone
from persistence.write_behind import cache_entries_upsert_many

logger = logging.getLogger(__name__)


# The longest TTL a write may ask for: 100 years. Far enough for any cache entry; expiry moments
# stay well inside what Python, Redis and PostgreSQL can represent (a TTL landing past the year
# 9999 used to fail on the way to the worker with a 500). 0 means "never expires".
MAX_TTL_SECONDS = 100 * 365 * 24 * 3600


def _retention_ms() -> int:
    return int(settings.BIRB.tombstone_retention * 1000)


@dataclass(frozen=True)
class WriteResult:
    entry: StoredEntry
    created: bool


# A 503's details name the dependency and a stable reason word; what the client library said
# (addresses, internal error names) goes to the log only.
def _redis_unavailable(error: Exception) -> ServiceUnavailableError:
    logger.warning("Redis unavailable: %s: %s", type(error).__name__, error, extra={"error": str(error)})
    return ServiceUnavailableError("Redis is unavailable", dependency="redis", details={"reason": "unavailable"})


def _db_unavailable(error: Exception) -> ServiceUnavailableError:
    logger.warning("PostgreSQL unavailable: %s", str(error).strip(), extra={"error": str(error).strip()})
    return ServiceUnavailableError(
        "PostgreSQL is unavailable", dependency="database", details={"reason": "unavailable"}
    )


class _BreakerLog(pybreaker.CircuitBreakerListener):
    def state_change(self, breaker: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
        if new.name == pybreaker.STATE_OPEN:
            logger.error(
                "PostgreSQL circuit breaker is open: reads that miss Redis answer 503 for %ds",
                breaker.reset_timeout,
                extra={"error": "circuit breaker is open"},
            )
        elif new.name == pybreaker.STATE_CLOSED:
            logger.info("PostgreSQL circuit breaker is closed again")


# After a few consecutive connection failures the API stops asking PostgreSQL for a while and
# answers at once, instead of every request waiting out the pool timeout.
_db_breaker = pybreaker.CircuitBreaker(
    fail_max=3,
    reset_timeout=5,
    exclude=[lambda error: not isinstance(error, DatabaseError)],
    listeners=[_BreakerLog()],
    name="postgresql",
)


def _db_call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """A read of PostgreSQL from the request path: ServiceUnavailableError when it is down."""
    try:
        return _db_breaker.call(fn, **kwargs)
    except pybreaker.CircuitBreakerError as error:
        raise ServiceUnavailableError(
            "PostgreSQL is unavailable: circuit breaker is open",
            dependency="database",
            details={"reason": "circuit_open", "retry_after_seconds": _db_breaker.reset_timeout},
        ) from error
    except DatabaseError as error:
        raise _db_unavailable(error) from error


BACKLOG_DRAIN_WAIT = 5.0


class _BacklogState:
    last_wait_failed = False


_backlog = _BacklogState()


class _Floor(NamedTuple):
    """Where a missing counter starts, and whether PostgreSQL's row at that version is live:
    None when that is not known (the floor is the clock: PostgreSQL may lack writes in flight)."""

    version: int
    live: bool | None


def _version_floor(key: str, *, counters_complete: bool) -> _Floor:
    """The version a missing counter starts from.

    Normally what PostgreSQL knows for the key. But after Redis lost its data (no
    counters-complete marker), writes still in flight in JetStream may carry versions PostgreSQL
    has not seen yet, so first wait (once per process, bounded) for the worker to drain what was
    published before now; then PostgreSQL is complete and the marker is set again. If it does not
    drain in time, or PostgreSQL cannot answer, the current time in milliseconds is the floor:
    it is above any version a key can have reached by counting (one per write), so versions
    still only grow.
    """
    if not counters_complete:
        # Wait once; while the backlog is known not to have drained, only look (no wait), so
        # each new key does not stall for the full wait again.
        wait = 0.0 if _backlog.last_wait_failed else BACKLOG_DRAIN_WAIT
        drained = _drain_wait.do("backlog", lambda: jetstream.publisher().wait_drained(wait))
        _backlog.last_wait_failed = not drained
        if drained:
            redis_store.mark_counters_complete()
        else:
            floor = int(time.time() * 1000)
            logger.warning("version of %s seeded from the clock (%d): the persist backlog has not drained", key, floor)
            return _Floor(max(floor, _db_version_or_zero(key)), None)
    try:
        found = _db_call(selectors.cache_entry_version_in_db, key=key)
    except ServiceUnavailableError as error:
        floor = int(time.time() * 1000)
        logger.warning("version of %s seeded from the clock (%d): %s", key, floor, error.message)
        return _Floor(floor, None)
    return _Floor(found.version, found.live)


def _db_version_or_zero(key: str) -> int:
    try:
        return int(_db_call(selectors.cache_entry_version_in_db, key=key).version)
    except ServiceUnavailableError:
        return 0


class _Assigned(NamedTuple):
    """A write's version, and whether it replaces a live entry Redis did not have (see
    :func:`_replaces_live_row`): True / False when the seed already asked PostgreSQL, None when
    Redis had the counter and PostgreSQL was not asked."""

    version: int
    replaces_live_row: bool | None


def _assign_version(key: str, *, if_match: int | None) -> _Assigned:
    """Step 1 of a write. Seeds the counter the first time Redis lacks it (see _version_floor)."""
    counter_ttl = _retention_ms()
    try:
        try:
            version = redis_store.assign_version(key, floor=None, if_match=if_match, counter_ttl_ms=counter_ttl)
            return _Assigned(version, None)
        except redis_store.SeedNeededError as seed:
            floor = _version_floor(key, counters_complete=seed.counters_complete)
            version = redis_store.assign_version(
                key, floor=floor.version, if_match=if_match, counter_ttl_ms=counter_ttl
            )
            # PostgreSQL's row decides only if it is the version just before this one: another
            # writer may have seeded the counter meanwhile, and its write (a delete?) came between.
            # Without an answer (clock floor), Redis's answer stands.
            return _Assigned(version, bool(floor.live) and version == floor.version + 1)
    except redis_store.VersionConflictError as conflict:
        raise VersionMismatchError(key, expected=if_match or 0, current=conflict.current) from None
    except RedisError as error:
        raise _redis_unavailable(error) from error


def _next_version(key: str, *, if_match: int | None) -> int:
    """Step 1 of a write: its version (see :func:`_assign_version`)."""
    return _assign_version(key, if_match=if_match).version


def _replaces_live_row(key: str, assigned: _Assigned) -> bool:
    """Whether a write Redis took as creating the key replaces an entry PostgreSQL holds live.

    Redis lacks the entry after it lost its data (the seed then asked PostgreSQL already) or
    when its copy was evicted while the counter stayed: then PostgreSQL is asked once, here. Its
    row counts only at the version just before this write; an older row means writes the worker
    has not persisted yet (a delete, say) came between, and Redis's answer stands.
    """
    if assigned.replaces_live_row is not None:
        return assigned.replaces_live_row
    try:
        found = _db_call(selectors.cache_entry_version_in_db, key=key)
    except ServiceUnavailableError:
        return False
    return found.live and found.version == assigned.version - 1


def _make_durable(write: PersistWrite) -> None:
    """Step 2 of a write: in JetStream (PubAck received), or -- with WRITE_FALLBACK=postgres
    while JetStream is down -- committed to PostgreSQL directly; else ServiceUnavailableError."""
    n = jetstream.names()
    try:
        jetstream.publisher().publish(
            n.persist_subject(write.op),
            encode(write),
            headers={"Nats-Msg-Id": message_id(write)},
            timeout=settings.BIRB.publish_timeout,
            new_only=True,
        )
        return
    except jetstream.MessageTooLargeError as error:
        # Caught before sending by the size check (check_message_fits) unless the server's limit
        # changed meanwhile; refused the same way, nothing was published.
        raise PayloadTooLargeError(size=error.size, limit=error.limit) from error
    except jetstream.PublishError as error:
        failure = error
    if settings.BIRB.write_fallback == "postgres":
        try:
            # The same guarded upsert as the worker's: version rules hold across both paths.
            _db_call(cache_entries_upsert_many, writes=[write])
            logger.warning(
                "JetStream unavailable (%s): %s v%d written to PostgreSQL directly", failure, write.key, write.version
            )
            return
        except ServiceUnavailableError as db_error:
            logger.error(
                "write of %s v%d failed: JetStream (%s) and PostgreSQL (%s) both unavailable",
                write.key,
                write.version,
                failure,
                db_error.message,
            )
    logger.error("write of %s v%d not durable: %s", write.key, write.version, failure, extra={"error": str(failure)})
    raise ServiceUnavailableError(
        "the write could not be made durable (JetStream did not acknowledge it)",
        dependency="nats",
        details={"reason": failure.reason},
    ) from failure


def check_message_fits(*, key: str, value_json: bytes, metadata_json: bytes) -> None:
    """Refuse a write whose persist message would not fit the NATS server's ``max_payload``.

    Runs before a version is assigned, so a refused write changes nothing. The bound is the
    message's largest possible size (see :func:`persistence.messages.max_message_size`); the
    publish itself checks the exact size again. Unknown while not connected: the publish
    then fails (503) or checks.
    """
    limit = jetstream.publisher().message_limit()
    if limit is None:
        return
    size = max_message_size(key=key, value_size=len(value_json), metadata_size=len(metadata_json))
    if size > limit:
        raise PayloadTooLargeError(size=size, limit=limit)


def cache_entry_set(
    *,
    key: str,
    value_json: bytes,
    ttl: int | None,
    metadata_json: bytes = b"{}",
    if_match: int | None = None,
) -> WriteResult:
    """Create or replace an entry; returns once it is durable and visible in Redis.

    ``value_json`` and ``metadata_json`` are already-validated JSON text. ``ttl`` None means
    ``REDIS_DEFAULT_TTL`` (0 = no expiry).
    """
    if ttl is None:
        ttl = settings.BIRB.redis_default_ttl
    now = datetime.now(UTC)
    stamp = isoformat(now)
    expires_at_ms = int(now.timestamp() * 1000) + ttl * 1000 if ttl > 0 else None
    check_message_fits(key=key, value_json=value_json, metadata_json=metadata_json)
    assigned = _assign_version(key, if_match=if_match)
    version = assigned.version
    _make_durable(
        PersistWrite(
            op=OP_SET,
            key=key,
            version=version,
            value_json=value_json.decode(),
            metadata_json=metadata_json.decode(),
            expires_at=datetime.fromtimestamp(expires_at_ms / 1000, tz=UTC) if expires_at_ms else None,
            created_at=now,
            updated_at=now,
        )
    )
    entry = StoredEntry(
        key=key,
        version=version,
        value_json=value_json,
        metadata_json=metadata_json,
        created_at=stamp,
        updated_at=stamp,
        expires_at_ms=expires_at_ms,
    )
    try:
        _stored, created, created_at = redis_store.store(entry)
    except RedisError as error:
        # Durable already: answer success; the next read falls through to PostgreSQL once the
        # worker has written it.
        logger.warning("write of %s v%d is durable but not cached: %s", key, version, error)
        return WriteResult(entry=entry, created=True)
    if created_at != stamp:
        entry = StoredEntry(**{**entry.__dict__, "created_at": created_at})
    # Redis took it as new; PostgreSQL may still hold the key live (Redis lost it): 200, not 201.
    return WriteResult(entry=entry, created=created and not _replaces_live_row(key, assigned))


def cache_entry_delete(*, key: str) -> int:
    """Delete a live entry (versioned: a tombstone blocks older writes). Returns the version."""
    if cache_entry_get(key=key) is None:
        raise KeyNotFoundError(key)
    version = _next_version(key, if_match=None)
    now = datetime.now(UTC)
    _make_durable(PersistWrite(OP_DELETE, key, version, None, "{}", None, now, now))
    try:
        redis_store.store_tombstone(key, version=version, ttl_ms=_retention_ms())
    except RedisError as error:
        logger.warning("delete of %s v%d is durable but Redis still holds the key: %s", key, version, error)
        raise _redis_unavailable(error) from error
    return version


class _SingleFlight:
    """Concurrent callers asking for the same key share one call of the loader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, Future[Any]] = {}

    def do(self, key: str, loader: Callable[[], Any]) -> Any:
        with self._lock:
            future = self._calls.get(key)
            leader = future is None
            if leader:
                future = self._calls[key] = Future()
        assert future is not None
        if not leader:
            return future.result()
        try:
            result = loader()
        except BaseException as error:
            future.set_exception(error)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                self._calls.pop(key, None)


_misses = _SingleFlight()
_drain_wait = _SingleFlight()


def _load_from_db(key: str) -> StoredEntry | None:
    entry = _db_call(selectors.cache_entry_get_from_db, key=key)
    if entry is not None:
        try:
            redis_store.store(entry)
        except RedisError as error:
            logger.warning("could not put %s back in Redis: %s", key, error)
    return entry


def cache_entry_get(*, key: str) -> StoredEntry | None:
    """Entry from Redis, else from PostgreSQL (and back into Redis); None when absent."""
    return _get(key)[0]


def _get(key: str) -> tuple[StoredEntry | None, bool]:
    """(entry, was a Redis hit)."""
    try:
        cached = redis_store.read(key)
    except RedisError as error:
        logger.warning("Redis read of %s failed, reading PostgreSQL: %s", key, error)
        cached = None
    if isinstance(cached, StoredEntry):
        return cached, True
    if isinstance(cached, Tombstone):
        return None, True
    return _misses.do(key, lambda: _load_from_db(key)), False


def cache_entry_read(*, key: str) -> StoredEntry | None:
    """A client's read (``GET /v1/cache/{key}``): :func:`cache_entry_get`, counted as a cache hit
    when Redis answered (an entry or a tombstone) and as a miss when PostgreSQL was asked."""
    entry, hit = _get(key)
    (CACHE_HITS if hit else CACHE_MISSES).inc()
    return entry


def cache_entries_get_many(
    *, keys: list[str], max_bytes: int | None = None
) -> tuple[dict[str, StoredEntry], list[str], int]:
    """(found entries, missing keys, Redis hits) for a batch; misses read through one by one.
    Each key is counted once, as a cache hit or a miss.

    With ``max_bytes``, :class:`BatchTooLargeError` is raised as soon as the entries found hold
    more value and metadata text than that: the answer is refused, not truncated, and never
    more than about ``max_bytes`` is held to find out.
    """
    unique = list(dict.fromkeys(keys))
    try:
        cached = redis_store.read_many(unique, max_bytes=max_bytes)
    except redis_store.ReadTooLargeError as error:
        raise BatchTooLargeError(size=error.size, limit=error.limit) from None
    except RedisError as error:
        logger.warning("Redis batch read failed, reading PostgreSQL: %s", error)
        cached = [None] * len(unique)
    found: dict[str, StoredEntry] = {}
    missing: list[str] = []
    hits = 0
    size = 0
    for key, item in zip(unique, cached, strict=True):
        if isinstance(item, StoredEntry):
            found[key] = item
            hits += 1
        elif item is not TOMBSTONE and (entry := _misses.do(key, functools.partial(_load_from_db, key))) is not None:
            found[key] = entry
        else:
            missing.append(key)
            continue
        size += len(found[key].value_json) + len(found[key].metadata_json)
        if max_bytes is not None and size > max_bytes:
            raise BatchTooLargeError(size=size, limit=max_bytes)
    if hits:
        CACHE_HITS.inc(hits)
    if len(unique) > hits:
        CACHE_MISSES.inc(len(unique) - hits)
    return found, missing, hits
