"""Reads of the system of record."""

from __future__ import annotations

import orjson
from django.db.models import Q
from django.utils import timezone

from persistence.messages import isoformat
from persistence.models import CacheEntry
from persistence.redis_store import StoredEntry


def live_entries() -> QuerySet[CacheEntry]:  # noqa: F821 - string annotation for the queryset type
    """Rows a client may see: not deleted, not expired."""
    now = timezone.now()
    return CacheEntry.objects.filter(deleted=False).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))


def stored_entry_from_row(row: CacheEntry) -> StoredEntry:
    return StoredEntry(
        key=row.key,
        version=row.version,
        value_json=orjson.dumps(row.value),
        metadata_json=orjson.dumps(row.metadata or {}),
        created_at=isoformat(row.created_at),
        updated_at=isoformat(row.updated_at),
        expires_at_ms=int(row.expires_at.timestamp() * 1000) if row.expires_at else None,
    )


def cache_entry_get_from_db(*, key: str) -> StoredEntry | None:
    row = live_entries().filter(key=key).first()
    return stored_entry_from_row(row) if row else None


def cache_entry_version_in_db(*, key: str) -> int:
    """Highest version PostgreSQL knows for the key, deleted or expired rows included (0 = none)."""
    version = CacheEntry.objects.filter(key=key).values_list("version", flat=True).first()
    return int(version or 0)
