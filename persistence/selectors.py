"""Reads of the system of record."""

from __future__ import annotations

import threading
import weakref
from typing import NamedTuple

import orjson
import psycopg
from django.db import OperationalError, connections
from django.db.models import Q, QuerySet
from django.utils import timezone

from persistence.messages import isoformat
from persistence.models import CacheEntry, JSONText
from persistence.redis_store import StoredEntry


def live_entries() -> QuerySet[CacheEntry]:
    """Rows a client may see: not deleted, not expired."""
    now = timezone.now()
    return CacheEntry.objects.filter(deleted=False).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))


def _json_text(value: JSONText | object | None, default: bytes) -> bytes:
    """The stored JSON text as it is (a NULL, which the worker never writes, as ``default``)."""
    if value is None:
        return default
    if isinstance(value, JSONText):
        return value.text
    return orjson.dumps(value)  # set in Python on an unsaved row (the console's Redis-only copy)


def stored_entry_from_row(row: CacheEntry) -> StoredEntry:
    """The entry of a row, its value and metadata the text PostgreSQL keeps, not re-encoded."""
    return StoredEntry(
        key=row.key,
        version=row.version,
        value_json=_json_text(row.value, b"null"),
        metadata_json=_json_text(row.metadata, b"{}"),
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
# The highest version, and whether the row is live (what live_entries() selects), in one query.
_VERSION_SQL = "SELECT version, NOT deleted AND (expires_at IS NULL OR expires_at > now()) FROM {table} WHERE key = %s"


class VersionInDb(NamedTuple):
    """What PostgreSQL knows of a key: its highest version (0 = no row) and whether that row is
    live (not deleted, not expired)."""

    version: int
    live: bool


def cache_entry_version_in_db(*, key: str) -> VersionInDb:
    """Highest version PostgreSQL knows for the key, deleted or expired rows included (0 = none),
    and whether the row is live.

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
            if conn is None or conn.closed:  # not kept
                params = connections["default"].get_connection_params()
                params.pop("cursor_factory", None)
                conn = _version_connection.connection = psycopg.connect(**params, autocommit=True)
                _version_connections.add(conn)
            row = conn.execute(_VERSION_SQL.format(table=table), (key,), prepare=True).fetchone()
            return VersionInDb(int(row[0]), bool(row[1])) if row else VersionInDb(0, False)
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


def cache_entries_versions_in_db(*, keys: list[str]) -> dict[str, VersionInDb]:
    """:func:`cache_entry_version_in_db` for several keys in one query (a batch write's): the
    keys PostgreSQL has a row for; a key without one is absent from the answer."""
    if not keys:
        return {}
    table = connections["default"].ops.quote_name(CacheEntry._meta.db_table)
    sql = (
        f"SELECT key, version, NOT deleted AND (expires_at IS NULL OR expires_at > now()) FROM {table} "
        "WHERE key = ANY(%s)"
    )
    with connections["default"].cursor() as cursor:
        cursor.execute(sql, [list(keys)])
        return {key: VersionInDb(int(version), bool(live)) for key, version, live in cursor.fetchall()}


# The listing's query: keyset pagination in byte order over the index on (key COLLATE "C")
# (migration 0004), live rows only.
_LIST_SQL = """
SELECT key FROM {table}
WHERE {bounds} AND NOT deleted AND (expires_at IS NULL OR expires_at > now())
ORDER BY key COLLATE "C"
LIMIT %s
"""


def prefix_upper_bound(prefix: str) -> str:
    """The least string above every string that starts with ``prefix`` in byte order ('' = none).
    Keys are ASCII, so the last character below U+007F that can be raised is raised."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x7F:
            return "".join(chars) + chr(last + 1)
    return ""


def cache_entry_keys(*, prefix: str, after: str, limit: int) -> list[str]:
    """Up to ``limit`` keys of live rows that start with ``prefix`` and sort after ``after`` ('' =
    from the start), in byte (C collation) order."""
    table = connections["default"].ops.quote_name(CacheEntry._meta.db_table)
    # Both bounds on the index's expression, so the scan starts at the later of the two and
    # stops at the end of the prefix.
    bounds, params = ['key COLLATE "C" > %s'], [after]
    if prefix:
        bounds.append('key COLLATE "C" >= %s')
        params.append(prefix)
        if high := prefix_upper_bound(prefix):
            bounds.append('key COLLATE "C" < %s')
            params.append(high)
    with connections["default"].cursor() as cursor:
        cursor.execute(_LIST_SQL.format(table=table, bounds=" AND ".join(bounds)), [*params, limit])
        return [row[0] for row in cursor.fetchall()]
