"""Loading PostgreSQL rows back into Redis, with the TTL they have left."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from django.db.models import QuerySet

from persistence import redis_store
from persistence.keys import entry_key
from persistence.models import CacheEntry
from persistence.redis_store import StoredEntry
from persistence.selectors import live_entries, stored_entry_from_row


@dataclass
class RehydrationResult:
    loaded: int = 0
    skipped_present: int = 0
    missing: int = 0

    @property
    def total(self) -> int:
        return self.loaded + self.skipped_present + self.missing


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


def _chunks(rows: Iterator[CacheEntry], size: int) -> Iterator[list[CacheEntry]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _store_chunk(entries: list[StoredEntry], *, force: bool) -> list[bool]:
    """Store a chunk in one round trip; for each entry, whether it was stored.

    The same version-guarded script as :func:`redis_store.store`, all sent in one write: one call per row
    made a million-row rehydration take minutes of round trips.
    """
    commands: list[tuple[object, ...]] = []
    for entry in entries:
        if force:
            commands.append(("DEL", entry_key(entry.key)))
        commands.append(redis_store.STORE_ENTRY.command([entry_key(entry.key)], redis_store.store_args(entry)))
    replies = [redis_store.checked(r) for r in redis_store.round_trip(*commands, scripts=(redis_store.STORE_ENTRY,))]
    if force:
        replies = replies[1::2]
    return [bool(reply[0]) for reply in replies]


def cache_entries_rehydrate(
    *,
    keys: Iterable[str] | None = None,
    prefix: str | None = None,
    force: bool = False,
    chunk_size: int = 1000,
    progress: Callable[[int], None] | None = None,
    report: Callable[[RehydrationResult], None] | None = None,
) -> RehydrationResult:
    """Put live rows (all, the given keys, and/or those whose key starts with ``prefix``) into Redis.

    Without ``force`` an entry Redis already has at the same or a newer version is left alone
    (the store is guarded by version); with ``force`` the Redis copy is replaced by the row.
    Expired and deleted rows are skipped: they are not live.

    Rows go to Redis a chunk at a time (one pipeline per ``chunk_size`` rows). After each chunk
    ``progress`` gets the number of rows just handled (a tqdm bar's ``update``) and ``report``
    the running totals (a background job's progress row).
    """
    result = RehydrationResult()
    wanted = list(dict.fromkeys(keys)) if keys is not None else None
    queryset = _selection(wanted, prefix).order_by("key")
    seen: set[str] = set()
    for rows in _chunks(queryset.iterator(chunk_size=chunk_size), chunk_size):
        stored = _store_chunk([stored_entry_from_row(row) for row in rows], force=force)
        loaded = sum(stored)
        result.loaded += loaded
        result.skipped_present += len(rows) - loaded
        if wanted is not None:
            seen.update(row.key for row in rows)
        if progress:
            progress(len(rows))
        if report:
            report(result)
    if wanted is not None:
        result.missing = len([k for k in wanted if k not in seen])
    return result


def count_live(keys: Iterable[str] | None = None, *, prefix: str | None = None) -> int:
    """How many live rows :func:`cache_entries_rehydrate` would visit with the same selection."""
    return _selection(list(keys) if keys is not None else None, prefix).count()
