"""Loading PostgreSQL rows back into Redis, with the TTL they have left.

No single row stops a rehydration: a row that cannot be loaded (a key the API would refuse,
inserted by hand; a value psycopg cannot read, such as an expiry of 'infinity'; an error reply
from Redis for that one entry) is reported with its key and the reason, and the others load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from django.db import InterfaceError, OperationalError
from django.db.models import QuerySet
from redis.exceptions import ResponseError

from persistence import redis_store
from persistence.keys import KEY_RULE, is_valid_key
from persistence.models import CacheEntry
from persistence.redis_store import StoredEntry
from persistence.selectors import live_entries, stored_entry_from_row

logger = logging.getLogger(__name__)

FAILURES_KEPT = 1000  # failures listed in a result; beyond, only counted (each one is logged)


@dataclass(frozen=True)
class RowFailure:
    """A row that could not be loaded into Redis, and why."""

    key: str
    reason: str


@dataclass
class RehydrationResult:
    loaded: int = 0
    skipped_present: int = 0
    missing: int = 0
    failed: int = 0
    # the first FAILURES_KEPT of the ``failed`` rows
    failures: list[RowFailure] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.loaded + self.skipped_present + self.missing + self.failed

    @property
    def done(self) -> int:
        """Rows handled so far: loaded, left alone, or failed."""
        return self.loaded + self.skipped_present + self.failed

    def fail(self, key: str, reason: str) -> None:
        logger.warning("rehydration: %s not loaded: %s", key, reason, extra={"error": reason})
        self.failed += 1
        if len(self.failures) < FAILURES_KEPT:
            self.failures.append(RowFailure(key, reason))


class UnloadableRowError(Exception):
    """A row that must not go into Redis as it is."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


# Losing the database mid-way is not one bad row: it stops the rehydration.
_CONNECTION_ERRORS = (OperationalError, InterfaceError)


def _reason(error: Exception) -> str:
    if isinstance(error, UnloadableRowError):
        return error.reason
    return f"{type(error).__name__}: {str(error).strip()}"


def _selection(keys: list[str] | None, prefix: str | None) -> QuerySet[CacheEntry]:
    """Live rows, narrowed to the given keys and/or a key prefix.

    A prefix is ``key LIKE 'prefix%'`` (Django escapes ``_``), answered from the
    ``varchar_pattern_ops`` index PostgreSQL has on the primary key (Django creates
    ``cache_entries_key_…_like`` with it), under any collation. A ``key >= p AND key < p'`` range
    on the primary key would only equal a prefix match under the "C" collation: natural-language
    collations ignore punctuation such as ``:`` at first.
    """
    queryset = live_entries()
    if keys is not None:
        queryset = queryset.filter(key__in=keys)
    if prefix:
        queryset = queryset.filter(key__startswith=prefix)
    return queryset


def _pages(queryset: QuerySet[CacheEntry], size: int) -> Iterator[tuple[list[CacheEntry], list[RowFailure]]]:
    """The rows in key order, ``size`` at a time (keyset pagination on the primary key), each page
    with the rows of it that could not be read.

    A page that cannot be read as a whole (a row psycopg cannot load) is read again row by row.
    """
    queryset = queryset.order_by("key")
    last: str | None = None
    while True:
        page = queryset if last is None else queryset.filter(key__gt=last)
        unreadable: list[RowFailure] = []
        try:
            rows = list(page[:size])
        except _CONNECTION_ERRORS:
            raise
        except Exception:
            keys = list(page.values_list("key", flat=True)[:size])
            rows = []
            for key in keys:
                try:
                    rows.append(page.get(key=key))
                except _CONNECTION_ERRORS:
                    raise
                except Exception as error:
                    unreadable.append(RowFailure(key, _reason(error)))
            if keys:
                last = keys[-1]
        else:
            if rows:
                last = rows[-1].key
        if not rows and not unreadable:
            return
        yield rows, unreadable


def _entry(row: CacheEntry) -> StoredEntry:
    if not is_valid_key(row.key):
        raise UnloadableRowError(row.key, f"not a valid key (keys are {KEY_RULE}): inserted by hand?")
    return stored_entry_from_row(row)


def cache_entries_rehydrate(
    *,
    keys: Iterable[str] | None = None,
    prefix: str | None = None,
    force: bool = False,
    chunk_size: int = 1000,
    progress: Callable[[int], object] | None = None,  # what it returns is ignored (tqdm's update: a bool)
    report: Callable[[RehydrationResult], None] | None = None,
) -> RehydrationResult:
    """Put live rows (all, the given keys, and/or those whose key starts with ``prefix``) into Redis.

    Without ``force`` an entry Redis already has at the same or a newer version is left alone
    (the store is guarded by version); with ``force`` the Redis copy is replaced by the row.
    Expired and deleted rows are skipped: they are not live.

    Rows go to Redis a chunk at a time (one pipeline per ``chunk_size`` rows). After each chunk
    ``progress`` gets the number of rows just handled (a tqdm bar's ``update``) and ``report``
    the running totals (a background job's progress row). A row that cannot be loaded is counted
    in ``failed`` and listed in ``failures`` with the reason; the others load all the same.
    """
    result = RehydrationResult()
    wanted = list(dict.fromkeys(keys)) if keys is not None else None
    seen: set[str] = set()
    for rows, unreadable in _pages(_selection(wanted, prefix), chunk_size):
        for failure in unreadable:
            result.fail(failure.key, failure.reason)
        entries: list[StoredEntry] = []
        for row in rows:
            try:
                entries.append(_entry(row))
            except Exception as error:
                result.fail(row.key, _reason(error))
        for entry, stored in zip(entries, redis_store.store_many(entries, force=force), strict=True):
            if isinstance(stored, ResponseError):
                result.fail(entry.key, f"Redis refused it: {stored}")
            elif stored:
                result.loaded += 1
            else:
                result.skipped_present += 1
        if wanted is not None:
            seen.update(row.key for row in rows)
            seen.update(failure.key for failure in unreadable)
        if progress:
            progress(len(rows) + len(unreadable))
        if report:
            report(result)
    if wanted is not None:
        result.missing = len([k for k in wanted if k not in seen])
    return result


def count_live(keys: Iterable[str] | None = None, *, prefix: str | None = None) -> int:
    """How many live rows :func:`cache_entries_rehydrate` would visit with the same selection."""
    return _selection(list(keys) if keys is not None else None, prefix).count()
