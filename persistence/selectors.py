"""Reads of the system of record."""

from __future__ import annotations

import threading
import weakref

import orjson
import psycopg
from django.db import OperationalError, connections
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


class _VersionConnection(threading.local):
    connection: psycopg.Connection | None = None


_version_connection = _VersionConnection()
_version_connections: weakref.WeakSet[psycopg.Connection] = weakref.WeakSet()
_VERSION_SQL = "SELECT version FROM {table} WHERE key = %s"


def cache_entry_version_in_db(*, key: str) -> int:
    """Highest version PostgreSQL knows for the key, deleted or expired rows included (0 = none).

    This runs for the first write of every key, so it skips the ORM and the pool: each thread
    keeps one autocommit connection (the settings of ``DATABASES["default"]``) for this one
    indexed query, which is then a single round trip. A kept connection that fails (the server
    restarted) is replaced and the query tried once more; other failures are raised as Django's
    ``OperationalError``, like any other database read.
    """
    table = connections["default"].ops.quote_name(CacheEntry._meta.db_table)
    for attempt in (1, 2):
        conn = _version_connection.connection
        kept = conn is not None and not conn.closed
        try:
            if not kept:
                params = connections["default"].get_connection_params()
                params.pop("cursor_factory", None)
                conn = _version_connection.connection = psycopg.connect(**params, autocommit=True)
                _version_connections.add(conn)
            row = conn.execute(_VERSION_SQL.format(table=table), (key,), prepare=True).fetchone()
            return int(row[0]) if row else 0
        except psycopg.Error as error:
            if conn is not None:
                conn.close()
            _version_connection.connection = None
            if not kept or attempt == 2:
                raise OperationalError(str(error)) from error
    raise AssertionError("unreachable")


def close_version_connections() -> None:
    """Close every thread's version connection (before a database is dropped, e.g. in tests)."""
    for conn in list(_version_connections):
        conn.close()
