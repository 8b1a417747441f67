"""The one write path and the one read path of cache entries.

Write (set or delete):
  1. assign the next version for the key atomically in Redis (seeded from PostgreSQL when Redis
     has no counter; checks ``If-Match``, or ``If-None-Match: *``, in the same step);
  2. publish the persist message to ``cache.persist.<op>`` with ``Nats-Msg-Id = <key>:<version>``
     and wait for the PubAck; no PubAck -> :class:`ServiceUnavailableError`, nothing visible;
  3. store the entry (or a tombstone) in Redis unless a newer version is already there;
  then the caller answers. The worker writes PostgreSQL later (write-behind).
A batch (``cache_entries_set_many``, ``cache_entries_delete_many``; a single write is a batch of
one) takes each step for all its writes at once: the version scripts pipelined in one round trip
(a key that needs a seed goes on alone), every message published concurrently and each PubAck
awaited, the Redis stores pipelined. One message per write: de-duplication and the worker are
the same as for single writes.

Read: Redis; on a miss PostgreSQL (one query per key per process however many readers wait),
and the row is put back in Redis with the TTL it has left. A key PostgreSQL does not have leaves
a negative entry in Redis for ``NEGATIVE_CACHE_TTL`` (stored only if no write of the key came
between; every write replaces it), so reads of absent keys stay in Redis too.
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
    PreconditionFailedError,
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


def _reservation_ttl_ms() -> int:
    """How long a create-only write holds the key: its publish and its store, with room."""
    return int(settings.BIRB.publish_timeout * 1000) + 5_000


def _assign_command(key: str, *, if_match: int | None, create_only: bool, **known: Any) -> tuple[Any, ...]:
    return redis_store.assign_command(
        key,
        if_match=if_match,
        counter_ttl_ms=_retention_ms(),
        create_only=create_only,
        reservation_ttl_ms=_reservation_ttl_ms() if create_only else 0,
        floor=known.get("floor"),
        absent_at=known.get("absent_at"),
    )


_UNSENT: Any = object()


def _assign_version(
    key: str,
    *,
    if_match: int | None,
    create_only: bool = False,
    first_reply: Any = _UNSENT,
    seeded: _Floor | None = None,
) -> _Assigned:
    """Step 1 of a write: its version, ``If-Match`` or ``If-None-Match: *`` checked in the same
    atomic step. ``first_reply``: Redis's answer to the first try, sent pipelined with a batch's.

    Seeds the counter the first time Redis lacks it (see :func:`_version_floor`). A create-only
    write that finds no entry in Redis asks PostgreSQL whether the key is live at the counter's
    version (the rule of :func:`_replaces_live_row`) and tries once more saying so; while the
    backlog is not known to be drained (the floor is the clock), a live row in PostgreSQL counts
    as the key existing. Refusals consume no version. ``seeded``: the floor ``first_reply`` was
    asked with (a batch's seeds, see :func:`_batch_floors`).
    """
    floor: _Floor | None = seeded
    absent_at: int | None = None
    reply = first_reply
    try:
        for _attempt in range(4):
            if reply is _UNSENT:
                command = _assign_command(
                    key,
                    if_match=if_match,
                    create_only=create_only,
                    floor=floor.version if floor else None,
                    absent_at=absent_at,
                )
                reply = redis_store.round_trip(command, scripts=redis_store.ASSIGN_SCRIPTS)[0]
            try:
                version = redis_store.assigned_version(key, reply)
            except redis_store.SeedNeededError as seed:
                floor = _version_floor(key, counters_complete=seed.counters_complete)
                reply = _UNSENT
                continue
            except redis_store.ExistenceUnknownError as unknown:
                if floor is not None and floor.live is not None and floor.version == unknown.counter:
                    found = selectors.VersionInDb(floor.version, floor.live)  # the seed just asked
                else:
                    found = _db_call(selectors.cache_entry_version_in_db, key=key)
                if found.live and (found.version == unknown.counter or (floor is not None and floor.live is None)):
                    raise PreconditionFailedError(key, current=found.version) from None
                absent_at = unknown.counter
                reply = _UNSENT
                continue
            if create_only:
                return _Assigned(version, False)  # the key was found absent
            if floor is None:
                return _Assigned(version, None)
            # PostgreSQL's row decides only if it is the version just before this one: another
            # writer may have seeded the counter meanwhile, and its write (a delete?) came between.
            # Without an answer (clock floor), Redis's answer stands.
            return _Assigned(version, bool(floor.live) and version == floor.version + 1)
        # The counter kept moving under a create-only write: other writes of the key are in flight.
        raise PreconditionFailedError(key, current=absent_at or 0)
    except redis_store.VersionConflictError as conflict:
        raise VersionMismatchError(key, expected=if_match or 0, current=conflict.current) from None
    except redis_store.KeyExistsError as exists:
        raise PreconditionFailedError(key, current=exists.current) from None
    except RedisError as error:
        raise _redis_unavailable(error) from error


def _assign_versions(items: list[_WriteRequest]) -> list[_Assigned | Exception]:
    """Step 1 for a batch: every key's first try pipelined in one round trip; the keys that need
    more (a seed, PostgreSQL's word on a create-only write) go on one by one."""
    if len(items) == 1:
        one = items[0]
        try:
            return [_assign_version(one.key, if_match=one.if_match, create_only=one.create_only)]
        except (VersionMismatchError, PreconditionFailedError, ServiceUnavailableError) as error:
            return [error]
    commands = [_assign_command(i.key, if_match=i.if_match, create_only=i.create_only) for i in items]
    try:
        replies = redis_store.round_trip(*commands, scripts=redis_store.ASSIGN_SCRIPTS)
    except RedisError as error:
        raise _redis_unavailable(error) from error  # nothing attempted: the whole request is a 503
    floors = _batch_floors(items, replies)
    if floors:
        # The keys Redis had no counter for, tried again together with their floors.
        again = [index for index, item in enumerate(items) if item.key in floors]
        retry = [
            _assign_command(
                items[i].key,
                if_match=items[i].if_match,
                create_only=items[i].create_only,
                floor=floors[items[i].key].version,
            )
            for i in again
        ]
        try:
            for index, reply in zip(
                again, redis_store.round_trip(*retry, scripts=redis_store.ASSIGN_SCRIPTS), strict=True
            ):
                replies[index] = reply
        except RedisError:
            floors = {}  # each key is seeded on its own below (and answers for Redis itself)
    results: list[_Assigned | Exception] = []
    for item, reply in zip(items, replies, strict=True):
        try:
            results.append(
                _assign_version(
                    item.key,
                    if_match=item.if_match,
                    create_only=item.create_only,
                    first_reply=reply,
                    seeded=floors.get(item.key),
                )
            )
        except (VersionMismatchError, PreconditionFailedError, ServiceUnavailableError) as error:
            results.append(error)
    return results


def _batch_floors(items: list[_WriteRequest], replies: list[Any]) -> dict[str, _Floor]:
    """The floors of a batch's keys that Redis has no counter for, from one PostgreSQL query
    (one query and one more Redis round trip per key before: a batch of new keys took ~550 ms).

    Only while Redis still has every counter it assigned (the marker, see :func:`_version_floor`):
    otherwise, or if PostgreSQL does not answer, {} and each key is seeded on its own.
    """
    needed: list[str] = []
    for item, reply in zip(items, replies, strict=True):
        try:
            redis_store.assigned_version(item.key, reply)
        except redis_store.SeedNeededError as seed:
            if not seed.counters_complete:
                return {}
            needed.append(item.key)
        except Exception:  # refusals and errors are _assign_version's to answer
            pass
    if len(needed) < 2:
        return {}
    try:
        found = _db_call(selectors.cache_entries_versions_in_db, keys=needed)
    except ServiceUnavailableError:
        return {}
    absent = selectors.VersionInDb(0, False)
    return {key: _Floor(found.get(key, absent).version, found.get(key, absent).live) for key in needed}


def _replaces_live_row(key: str, assigned: _Assigned) -> bool:
    """Whether a write Redis took as creating the key replaces an entry PostgreSQL holds live.

    Redis lacks the entry after it lost its data (the seed then asked PostgreSQL already) or
    when its copy was evicted while the counter stayed: then PostgreSQL is asked once, here. Its
    row counts only at the version just before this write; an older row means writes the worker
    has not persisted yet (a delete, say) came between, and Redis's answer stands.
    """
    return _replace_live_rows({key: assigned})[key]


def _replace_live_rows(assigned: dict[str, _Assigned]) -> dict[str, bool]:
    """:func:`_replaces_live_row` for several keys: PostgreSQL asked once for all that need it."""
    answers = {key: a.replaces_live_row for key, a in assigned.items() if a.replaces_live_row is not None}
    ask = [key for key in assigned if key not in answers]
    if not ask:
        return {key: bool(answer) for key, answer in answers.items()}
    try:
        if len(ask) == 1:
            found = {ask[0]: _db_call(selectors.cache_entry_version_in_db, key=ask[0])}
        else:
            found = _db_call(selectors.cache_entries_versions_in_db, keys=ask)
    except ServiceUnavailableError:
        found = {}
    for key in ask:
        row = found.get(key)
        answers[key] = row is not None and row.live and row.version == assigned[key].version - 1
    return {key: bool(answer) for key, answer in answers.items()}


def _publish_failed(failure: jetstream.PublishError) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "the write could not be made durable (JetStream did not acknowledge it)",
        dependency="nats",
        details={"reason": failure.reason},
    )


def _make_durable(write: PersistWrite) -> None:
    """Step 2 of a write (see :func:`_make_durable_many`); raises why it is not durable."""
    error = _make_durable_many([write])[0]
    if error is not None:
        raise error


def _make_durable_many(writes: list[PersistWrite]) -> list[Exception | None]:
    """Step 2 of writes: each in JetStream (PubAck received; a batch's published concurrently),
    or -- with WRITE_FALLBACK=postgres while JetStream is down -- committed to PostgreSQL
    directly (a batch's failed ones in one statement). For each, None when durable, else why
    not: :class:`ServiceUnavailableError` or :class:`PayloadTooLargeError`."""
    n = jetstream.names()
    timeout = settings.BIRB.publish_timeout
    outcomes: list[Any]
    if len(writes) == 1:
        write = writes[0]
        try:
            jetstream.publisher().publish(
                n.persist_subject(write.op),
                encode(write),
                headers={"Nats-Msg-Id": message_id(write)},
                timeout=timeout,
                new_only=True,
            )
            return [None]
        except (jetstream.PublishError, jetstream.MessageTooLargeError) as error:
            outcomes = [error]
    else:
        outcomes = jetstream.publisher().publish_many(
            [(n.persist_subject(w.op), encode(w), {"Nats-Msg-Id": message_id(w)}) for w in writes],
            timeout=timeout,
            new_only=True,
        )
    results: list[Exception | None] = [None] * len(writes)
    failed: list[int] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, jetstream.MessageTooLargeError):
            # Caught before sending by the size check (check_message_fits) unless the server's
            # limit changed meanwhile; refused the same way, nothing was published.
            results[index] = PayloadTooLargeError(size=outcome.size, limit=outcome.limit)
        elif isinstance(outcome, jetstream.PublishError):
            failed.append(index)
    if not failed:
        return results
    if settings.BIRB.write_fallback == "postgres":
        try:
            # The same guarded upsert as the worker's: version rules hold across both paths.
            _db_call(cache_entries_upsert_many, writes=[writes[i] for i in failed])
            for index in failed:
                logger.warning(
                    "JetStream unavailable (%s): %s v%d written to PostgreSQL directly",
                    outcomes[index],
                    writes[index].key,
                    writes[index].version,
                )
            return results
        except ServiceUnavailableError as db_error:
            for index in failed:
                logger.error(
                    "write of %s v%d failed: JetStream (%s) and PostgreSQL (%s) both unavailable",
                    writes[index].key,
                    writes[index].version,
                    outcomes[index],
                    db_error.message,
                )
    for index in failed:
        failure = outcomes[index]
        assert isinstance(failure, jetstream.PublishError)
        write = writes[index]
        logger.error(
            "write of %s v%d not durable: %s", write.key, write.version, failure, extra={"error": str(failure)}
        )
        unavailable = _publish_failed(failure)
        unavailable.__cause__ = failure
        results[index] = unavailable
    return results


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


@dataclass(frozen=True)
class SetRequest:
    """One entry of :func:`cache_entries_set_many`: already-validated JSON text; ``ttl`` None
    means ``REDIS_DEFAULT_TTL`` (0 = no expiry); ``if_none_match``: create-only."""

    key: str
    value_json: bytes
    ttl: int | None = None
    metadata_json: bytes = b"{}"
    if_match: int | None = None
    if_none_match: bool = False
    # The entry's created_at when the write keeps it (a touch); else the moment of the write.
    created_at: str | None = None


@dataclass(frozen=True)
class _WriteRequest:
    key: str
    if_match: int | None = None
    create_only: bool = False


def _parse_stamp(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def cache_entry_set(
    *,
    key: str,
    value_json: bytes,
    ttl: int | None,
    metadata_json: bytes = b"{}",
    if_match: int | None = None,
    if_none_match: bool = False,
) -> WriteResult:
    """Create or replace an entry; returns once it is durable and visible in Redis.

    ``value_json`` and ``metadata_json`` are already-validated JSON text. ``ttl`` None means
    ``REDIS_DEFAULT_TTL`` (0 = no expiry). ``if_none_match``: only if the key does not exist
    (else :class:`PreconditionFailedError`, nothing changed).
    """
    check_message_fits(key=key, value_json=value_json, metadata_json=metadata_json)
    request = SetRequest(key, value_json, ttl, metadata_json, if_match, if_none_match)
    result = cache_entries_set_many(requests=[request])[0]
    if isinstance(result, Exception):
        raise result
    return result


def cache_entries_set_many(*, requests: list[SetRequest]) -> list[WriteResult | Exception]:
    """Write several entries (distinct keys), each with its own version: the one write path,
    each step done for all of them at once (versions pipelined, publishes concurrent, Redis
    stores pipelined). For each, in order, its result or why it was not made:
    :class:`VersionMismatchError`, :class:`PreconditionFailedError`,
    :class:`ServiceUnavailableError` (not durable, nothing visible), :class:`PayloadTooLargeError`.
    Redis down before anything was attempted raises :class:`ServiceUnavailableError`.
    """
    now = datetime.now(UTC)
    stamp = isoformat(now)
    now_ms = int(now.timestamp() * 1000)
    assigned = _assign_versions([_WriteRequest(r.key, r.if_match, r.if_none_match) for r in requests])
    results: list[WriteResult | Exception | None] = [a if isinstance(a, Exception) else None for a in assigned]
    pending: list[tuple[int, SetRequest, _Assigned, StoredEntry]] = []
    for index, (request, given) in enumerate(zip(requests, assigned, strict=True)):
        if isinstance(given, Exception):
            continue
        ttl = settings.BIRB.redis_default_ttl if request.ttl is None else request.ttl
        entry = StoredEntry(
            key=request.key,
            version=given.version,
            value_json=request.value_json,
            metadata_json=request.metadata_json,
            created_at=request.created_at or stamp,
            updated_at=stamp,
            expires_at_ms=now_ms + ttl * 1000 if ttl > 0 else None,
        )
        pending.append((index, request, given, entry))
    durable = _make_durable_many(
        [
            PersistWrite(
                op=OP_SET,
                key=entry.key,
                version=entry.version,
                value_json=entry.value_json.decode(),
                metadata_json=entry.metadata_json.decode(),
                expires_at=datetime.fromtimestamp(entry.expires_at_ms / 1000, tz=UTC) if entry.expires_at_ms else None,
                created_at=_parse_stamp(request.created_at) if request.created_at else now,
                updated_at=now,
            )
            for _, request, _, entry in pending
        ]
    )
    stored: list[tuple[int, SetRequest, _Assigned, StoredEntry]] = []
    for (index, request, given, entry), error in zip(pending, durable, strict=True):
        if error is None:
            stored.append((index, request, given, entry))
            continue
        results[index] = error
        if request.if_none_match:
            try:  # give the key back to the next create-only write (else it waits for expiry)
                redis_store.release_reservation(request.key, entry.version)
            except RedisError as redis_error:
                logger.warning("create reservation of %s v%d kept: %s", request.key, entry.version, redis_error)
    if not stored:
        return results  # type: ignore[return-value]
    reserved = frozenset(request.key for _, request, _, _ in stored if request.if_none_match)
    try:
        replies: list[Any] = redis_store.store_written([entry for *_, entry in stored], reserved=reserved)
    except RedisError as error:
        replies = [error] * len(stored)
    maybe_replacing: dict[str, _Assigned] = {}
    for (index, request, given, entry), reply in zip(stored, replies, strict=True):
        if isinstance(reply, Exception):
            # Durable already: answer success; the next read falls through to PostgreSQL once
            # the worker has written it.
            logger.warning("write of %s v%d is durable but not cached: %s", entry.key, entry.version, reply)
            results[index] = WriteResult(entry=entry, created=True)
            continue
        _stored, created, created_at = reply
        if created_at != entry.created_at:
            entry = StoredEntry(**{**entry.__dict__, "created_at": created_at})
        results[index] = WriteResult(entry=entry, created=created or request.if_none_match)
        if created and not request.if_none_match:
            maybe_replacing[entry.key] = given
    if maybe_replacing:
        # Redis took them as new; PostgreSQL may still hold a key live (Redis lost it): 200, not 201.
        replacing = _replace_live_rows(maybe_replacing)
        for index, result in enumerate(results):
            if isinstance(result, WriteResult) and replacing.get(result.entry.key):
                results[index] = WriteResult(entry=result.entry, created=False)
    return results  # type: ignore[return-value]


def cache_entry_delete(*, key: str) -> int:
    """Delete a live entry (versioned: a tombstone blocks older writes). Returns the version."""
    result = cache_entries_delete_many(keys=[key])[0]
    if isinstance(result, Exception):
        raise result
    return result


def _live_keys(keys: list[str]) -> set[str]:
    """Which of the keys are live: Redis's word where it holds an entry or a tombstone,
    PostgreSQL's (one query) for the rest."""
    try:
        held = redis_store.held_many(keys)
    except RedisError as error:
        raise _redis_unavailable(error) from error
    live = {key for key, h in held.items() if h.live}
    ask = [key for key, h in held.items() if h.version is None]
    if len(ask) == 1:
        if _db_call(selectors.cache_entry_version_in_db, key=ask[0]).live:
            live.add(ask[0])
    elif ask:
        found = _db_call(selectors.cache_entries_versions_in_db, keys=ask)
        live.update(key for key, row in found.items() if row.live)
    return live


def cache_entries_delete_many(*, keys: list[str]) -> list[int | Exception]:
    """Delete several live entries (distinct keys), each a versioned write with its own version,
    step by step for all at once as :func:`cache_entries_set_many` does. For each, in order,
    its version or why not: :class:`KeyNotFoundError`, :class:`ServiceUnavailableError`."""
    live = _live_keys(keys)
    results: list[int | Exception | None] = [None if key in live else KeyNotFoundError(key) for key in keys]
    targets = [index for index, key in enumerate(keys) if key in live]
    if not targets:
        return results  # type: ignore[return-value]
    assigned = _assign_versions([_WriteRequest(keys[index]) for index in targets])
    now = datetime.now(UTC)
    pending: list[tuple[int, int]] = []  # (index, version)
    for index, given in zip(targets, assigned, strict=True):
        if isinstance(given, Exception):
            results[index] = given
        else:
            pending.append((index, given.version))
    durable = _make_durable_many(
        [PersistWrite(OP_DELETE, keys[index], version, None, "{}", None, now, now) for index, version in pending]
    )
    done: list[tuple[int, int]] = []
    for (index, version), error in zip(pending, durable, strict=True):
        if error is None:
            done.append((index, version))
        else:
            results[index] = error
    if done:
        try:
            replies: list[Any] = redis_store.store_tombstones(
                [(keys[index], version) for index, version in done], ttl_ms=_retention_ms()
            )
        except RedisError as error:
            replies = [error] * len(done)
        for (index, version), reply in zip(done, replies, strict=True):
            if isinstance(reply, Exception):
                logger.warning(
                    "delete of %s v%d is durable but Redis still holds the key: %s", keys[index], version, reply
                )
                results[index] = _redis_unavailable(reply)
            else:
                results[index] = version
    return results  # type: ignore[return-value]


# A touch retries this often when another write of the key comes between its read and its write.
TOUCH_ATTEMPTS = 3


def cache_entry_touch(*, key: str, ttl: int, if_match: int | None = None) -> StoredEntry:
    """A new TTL for a live entry: a versioned write of its value and metadata (persisted like
    any set). :class:`KeyNotFoundError` when absent; with ``if_match``,
    :class:`VersionMismatchError` unless the key is at that version.

    Without ``if_match`` the write is conditional on the version just read, so a write that
    comes between is never overwritten with the older value: the touch reads again and retries.
    When the counter is ahead of the entry read but the entry stays the same (a write that
    failed after taking its version), the last try is conditional on the counter instead.
    """
    expected = if_match
    last: VersionMismatchError | None = None
    for attempt in range(TOUCH_ATTEMPTS):
        entry = cache_entry_get(key=key)
        if entry is None:
            raise KeyNotFoundError(key)
        condition = if_match if if_match is not None else entry.version
        if last is not None and if_match is None and last.expected == entry.version and attempt == TOUCH_ATTEMPTS - 1:
            condition = last.current
        request = SetRequest(
            key, entry.value_json, ttl, entry.metadata_json, if_match=condition, created_at=entry.created_at
        )
        result = cache_entries_set_many(requests=[request])[0]
        if isinstance(result, WriteResult):
            return result.entry
        if not isinstance(result, VersionMismatchError) or expected is not None:
            raise result
        last = result
        time.sleep(0.02 * (attempt + 1))  # a write in flight reaches Redis meanwhile
    assert last is not None
    raise last


# The key listing waits at most this long for the worker to persist every write acknowledged
# before it (read-your-writes from PostgreSQL).
LISTING_DRAIN_WAIT = 5.0


def cache_entries_list_keys(*, prefix: str, after: str, limit: int) -> tuple[list[str], str | None]:
    """A page of live keys from PostgreSQL: up to ``limit`` that start with ``prefix`` and sort
    after ``after`` in byte order, and the last of them when more follow (else None).

    PostgreSQL lags the acknowledged writes by the persist backlog; so first the worker is given
    up to :data:`LISTING_DRAIN_WAIT` to persist everything published so far (a key written
    before the request is in the answer). :class:`ServiceUnavailableError` (``persist_backlog``)
    when it does not.
    """
    if not jetstream.publisher().wait_drained(LISTING_DRAIN_WAIT):
        raise ServiceUnavailableError(
            f"the key listing waits for the worker to persist every acknowledged write; it did not within "
            f"{LISTING_DRAIN_WAIT:g}s",
            dependency="nats",
            details={"reason": "persist_backlog"},
        )
    keys = _db_call(selectors.cache_entry_keys, prefix=prefix, after=after, limit=limit + 1)
    if len(keys) > limit:
        return keys[:limit], keys[limit - 1]
    return keys, None


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


def _negative_ttl_ms() -> int:
    """How long a negative entry lives (``NEGATIVE_CACHE_TTL``); 0 = absence is not remembered."""
    return int(settings.BIRB.negative_cache_ttl * 1000)


class _Absent:
    """PostgreSQL's word that a key is absent, with the key's version counter as Redis held it
    before PostgreSQL was asked: what :func:`redis_store.remember_absent` needs to leave a negative
    entry. Readers that shared the query all get it; the first to :meth:`claim` it stores it."""

    def __init__(self, counter: bytes | None) -> None:
        self.counter = counter
        self._unclaimed = [True]

    def claim(self) -> bool:
        try:
            return self._unclaimed.pop()  # atomic: exactly one caller gets True
        except IndexError:
            return False


_UNREAD: Any = object()  # the key's version counter is to be read by _load_from_db
_FORGET: Any = object()  # Redis is failing: absence is not remembered (nor the counter read)


def _load_from_db(key: str, counter: Any = _UNREAD) -> StoredEntry | _Absent | None:
    """A Redis miss read through: PostgreSQL's entry (put back in Redis), or, when it has none,
    :class:`_Absent` if absence may be remembered (``NEGATIVE_CACHE_TTL`` is on, and the key's
    counter is read first, unless the caller read it already: ``counter``), else None."""
    remember = _negative_ttl_ms() > 0 and counter is not _FORGET
    if remember and counter is _UNREAD:
        try:
            counter = redis_store.version_counters([key])[0]
        except RedisError as error:
            logger.debug("version counter of %s not read, absence not remembered: %s", key, error)
            remember = False
    entry = _db_call(selectors.cache_entry_get_from_db, key=key)
    if entry is not None:
        try:
            redis_store.store(entry)
        except RedisError as error:
            logger.warning("could not put %s back in Redis: %s", key, error)
        return entry
    return _Absent(counter) if remember else None


def _remember_absent(absent: list[tuple[str, _Absent]]) -> None:
    """Negative entries for the keys PostgreSQL found absent (one round trip), each stored by
    one of the readers that shared its query. Best effort: without them reads ask PostgreSQL."""
    claimed = [(key, found.counter) for key, found in absent if found.claim()]
    if not claimed:
        return
    try:
        replies = redis_store.remember_absent(claimed, ttl_ms=_negative_ttl_ms())
    except RedisError as error:
        logger.warning("absence of %d keys not remembered in Redis: %s", len(claimed), error)
        return
    for (key, _), reply in zip(claimed, replies, strict=True):
        if isinstance(reply, Exception):
            logger.warning("absence of %s not remembered in Redis: %s", key, reply)


def cache_entry_get(*, key: str) -> StoredEntry | None:
    """Entry from Redis, else from PostgreSQL (and back into Redis); None when absent."""
    return _get(key)[0]


def _get(key: str) -> tuple[StoredEntry | None, bool]:
    """(entry, was a Redis hit). A tombstone or a negative entry is a hit that says "absent"; a
    miss that PostgreSQL answers "absent" leaves a negative entry (see :class:`_Absent`)."""
    counter = _UNREAD
    try:
        cached = redis_store.read(key)
    except RedisError as error:
        logger.warning("Redis read of %s failed, reading PostgreSQL: %s", key, error)
        cached, counter = None, _FORGET
    if isinstance(cached, StoredEntry):
        return cached, True
    if isinstance(cached, Tombstone):
        return None, True
    loaded = _misses.do(key, lambda: _load_from_db(key, counter))
    if isinstance(loaded, _Absent):
        _remember_absent([(key, loaded)])
        return None, False
    return loaded, False


def cache_entry_read(*, key: str) -> StoredEntry | None:
    """A client's read (``GET /v1/cache/{key}``): :func:`cache_entry_get`, counted as a cache hit
    when Redis answered (an entry, a tombstone or a negative entry) and as a miss when PostgreSQL
    was asked."""
    entry, hit = _get(key)
    (CACHE_HITS if hit else CACHE_MISSES).inc()
    return entry


def cache_entries_get_many(
    *, keys: list[str], max_bytes: int | None = None
) -> tuple[dict[str, StoredEntry], list[str], int]:
    """(found entries, missing keys, Redis hits) for a batch; misses read through one by one.
    Each key is counted once, as a cache hit (Redis answered: an entry, a tombstone or a negative
    entry) or a miss. The misses' counters are read in one round trip before PostgreSQL is asked,
    and the negative entries of those it finds absent are stored in one more.

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
        counters: dict[str, Any] = dict.fromkeys(unique, _FORGET)
    else:
        counters = _counters_of_misses([key for key, item in zip(unique, cached, strict=True) if item is None])
    found: dict[str, StoredEntry] = {}
    missing: list[str] = []
    absent: list[tuple[str, _Absent]] = []
    hits = 0
    size = 0
    try:
        for key, item in zip(unique, cached, strict=True):
            if isinstance(item, StoredEntry):
                found[key] = item
                hits += 1
            elif item is TOMBSTONE:
                missing.append(key)
                hits += 1
                continue
            else:
                loaded = _misses.do(key, functools.partial(_load_from_db, key, counters[key]))
                if not isinstance(loaded, StoredEntry):
                    if isinstance(loaded, _Absent):
                        absent.append((key, loaded))
                    missing.append(key)
                    continue
                found[key] = loaded
            size += len(found[key].value_json) + len(found[key].metadata_json)
            if max_bytes is not None and size > max_bytes:
                raise BatchTooLargeError(size=size, limit=max_bytes)
    finally:
        _remember_absent(absent)
    if hits:
        CACHE_HITS.inc(hits)
    if len(unique) > hits:
        CACHE_MISSES.inc(len(unique) - hits)
    return found, missing, hits


def _counters_of_misses(keys: list[str]) -> dict[str, Any]:
    """The version counters of a batch's misses, read in one round trip before PostgreSQL is
    asked (see :func:`_load_from_db`): ``_FORGET`` for each when absence is not remembered."""
    if not keys or _negative_ttl_ms() <= 0:
        return dict.fromkeys(keys, _FORGET)
    try:
        return dict(zip(keys, redis_store.version_counters(keys), strict=True))
    except RedisError as error:
        logger.warning("version counters not read, absence of %d keys not remembered: %s", len(keys), error)
        return dict.fromkeys(keys, _FORGET)
