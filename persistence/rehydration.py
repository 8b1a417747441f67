"""Loading PostgreSQL rows back into Redis, with the TTL they have left."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from persistence import redis_store
from persistence.keys import entry_key
from persistence.selectors import live_entries, stored_entry_from_row


@dataclass
class RehydrationResult:
    loaded: int = 0
    skipped_present: int = 0
    missing: int = 0

    @property
    def total(self) -> int:
        return self.loaded + self.skipped_present + self.missing


def cache_entries_rehydrate(
    *,
    keys: Iterable[str] | None = None,
    force: bool = False,
    chunk_size: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> RehydrationResult:
    """Put live rows (all, or the given keys) into Redis.

    Without ``force`` an entry Redis already has at the same or a newer version is left alone
    (the store is guarded by version); with ``force`` the Redis copy is replaced by the row.
    Expired and deleted rows are skipped: they are not live.
    """
    result = RehydrationResult()
    wanted = list(dict.fromkeys(keys)) if keys is not None else None
    queryset = live_entries().order_by("key")
    if wanted is not None:
        queryset = queryset.filter(key__in=wanted)
    seen: set[str] = set()
    client = redis_store.client()
    for row in queryset.iterator(chunk_size=chunk_size):
        entry = stored_entry_from_row(row)
        seen.add(row.key)
        if force:
            client.delete(entry_key(row.key))
        stored, _, _ = redis_store.store(entry)
        if stored:
            result.loaded += 1
        else:
            result.skipped_present += 1
        if progress:
            progress(1)
    if wanted is not None:
        result.missing = len([k for k in wanted if k not in seen])
    return result


def count_live(keys: Iterable[str] | None = None) -> int:
    queryset = live_entries()
    if keys is not None:
        queryset = queryset.filter(key__in=list(keys))
    return queryset.count()
