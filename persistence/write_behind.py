"""Write-behind: applying persist messages to PostgreSQL.

The worker calls this for each batch; the API calls it for one write when JetStream is down
and ``WRITE_FALLBACK=postgres``. Both go through the same guarded upsert, so the version rules
hold across both paths.
"""

from __future__ import annotations

from typing import Any

import orjson

from birbnest import tracing
from persistence.messages import OP_DELETE

# The batch travels as one JSON document (an array of objects) that PostgreSQL turns into rows.
# One string parameter costs the client next to nothing to send; eight arrays made psycopg quote
# every element in Python (a fifth of the worker's time), and PostgreSQL parses this faster too.
# json, not jsonb, all the way: json_to_recordset hands each value and metadata over as the exact
# text it has in the document (1e20, -0.0 and key order included) and the json columns keep it.
_UPSERT_SQL = """
INSERT INTO {table} AS t (key, value, version, metadata, expires_at, deleted, created_at, updated_at)
-- json_to_recordset reads a JSON null as SQL NULL; the column has always held JSON null.
SELECT r.key, COALESCE(r.value, 'null'), r.version, COALESCE(r.metadata, 'null'), r.expires_at, r.deleted,
    r.created_at, r.updated_at
FROM json_to_recordset(%s::json) AS r(
    key text, value json, version bigint, metadata json, expires_at timestamptz, deleted boolean,
    created_at timestamptz, updated_at timestamptz
)
ON CONFLICT (key) DO UPDATE SET
    value = EXCLUDED.value,
    version = EXCLUDED.version,
    metadata = EXCLUDED.metadata,
    expires_at = EXCLUDED.expires_at,
    deleted = EXCLUDED.deleted,
    -- A key written again after a delete starts a new life.
    created_at = CASE WHEN t.deleted THEN EXCLUDED.created_at ELSE t.created_at END,
    updated_at = EXCLUDED.updated_at
WHERE t.version < EXCLUDED.version
"""


def _rows_json(writes: list[Any]) -> str:
    """The batch as the JSON array ``json_to_recordset`` reads. Values and metadata are already
    JSON text and go in as they are (``orjson.Fragment``: not decoded, not re-encoded); orjson
    writes the datetimes (naive ones as UTC, as Django's connections do)."""
    fragment = orjson.Fragment
    null = fragment(b"null")
    return orjson.dumps(
        [
            {
                "key": w.key,
                "value": null if w.value_json is None else fragment(w.value_json),
                "version": w.version,
                "metadata": fragment(w.metadata_json),
                "expires_at": w.expires_at,
                "deleted": w.op == OP_DELETE,
                "created_at": w.created_at,
                "updated_at": w.updated_at,
            }
            for w in writes
        ],
        option=orjson.OPT_NAIVE_UTC,
    ).decode()


def cache_entries_upsert_many(*, writes: list[Any]) -> int:
    """Apply a batch of sets and deletes in one statement, in one transaction.

    ``writes`` are :class:`persistence.messages.PersistWrite` with at most one per key.
    The ``WHERE`` guard makes the statement idempotent and order-free: a row is only replaced
    by a higher version, so redeliveries, replays and several workers are harmless. A delete
    is stored as a tombstone row (``deleted`` = true) that keeps its version.
    Returns the number of rows inserted or changed.

    Outside a transaction the one statement is its own transaction: committed when this
    returns, with no BEGIN/COMMIT round trips. Inside the caller's ``atomic`` block it is part
    of the caller's transaction.
    """
    from django.db import connection

    from persistence.models import CacheEntry

    if not writes:
        return 0
    table = CacheEntry._meta.db_table
    sql = _UPSERT_SQL.format(table=connection.ops.quote_name(table))
    if tracing.enabled:
        # By hand rather than the psycopg instrumentation, which would wrap every query of the
        # process (the API's read-through too) whether a trace is being recorded or not.
        with (
            tracing.span(
                f"INSERT {table}",
                kind=tracing.SpanKind.CLIENT,
                attributes={
                    "db.system.name": "postgresql",
                    "db.operation.name": "INSERT",
                    "db.collection.name": table,
                    "db.operation.batch.size": len(writes),
                },
            ) as span,
            connection.cursor() as cursor,
        ):
            cursor.execute(sql, [_rows_json(writes)])
            span.set_attribute("db.response.returned_rows", cursor.rowcount)
            return cursor.rowcount
    with connection.cursor() as cursor:
        cursor.execute(sql, [_rows_json(writes)])
        return cursor.rowcount


# Expired rows and tombstones, a batch per transaction: the partial index on expires_at (the one
# on updated_at for tombstones) finds them, SKIP LOCKED passes a row a worker is writing, and the
# condition is checked again on the row deleted, so one that a write changed meanwhile (a new
# version, a new expiry) stays.
_PURGE_SQL = {
    "expired": """
DELETE FROM {table} WHERE key IN (
    SELECT key FROM {table} WHERE expires_at < %s ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED
) AND expires_at < %s
""",
    "deleted": """
DELETE FROM {table} WHERE key IN (
    SELECT key FROM {table} WHERE deleted AND updated_at < %s ORDER BY updated_at LIMIT %s FOR UPDATE SKIP LOCKED
) AND deleted AND updated_at < %s
""",
}
# One purger at a time across workers (a transaction-level advisory lock, per batch).
_PURGE_LOCK = 0x62697262_70726700  # "birbprg\0"
PURGE_BATCH = 5_000


def cache_entries_purge(*, before: Any, batch: int = PURGE_BATCH, max_seconds: float | None = None) -> int:
    """Delete the rows that expired before ``before`` and the tombstones last written before it,
    ``batch`` rows per transaction, until none is left or ``max_seconds`` have passed (the rest
    goes next time). Returns the number of rows deleted.

    The caller passes ``now - TOMBSTONE_RETENTION``: until then a row keeps its version, so a
    late, older write of the key cannot bring it back (the same rule as tombstones). A batch
    another process is purging at the same moment is left to it.
    """
    import time

    from django.db import connection, transaction

    from persistence.models import CacheEntry

    table = connection.ops.quote_name(CacheEntry._meta.db_table)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    purged = 0
    for sql in _PURGE_SQL.values():
        statement = sql.format(table=table)
        while deadline is None or time.monotonic() < deadline:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_PURGE_LOCK])
                if not cursor.fetchone()[0]:
                    return purged
                cursor.execute(statement, [before, batch, before])
                deleted = cursor.rowcount
            purged += deleted
            if deleted < batch:
                break
    return purged
