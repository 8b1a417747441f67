"""Write-behind: applying persist messages to PostgreSQL.

The worker calls this for each batch; the API calls it for one write when JetStream is down
and ``WRITE_FALLBACK=postgres``. Both go through the same guarded upsert, so the version rules
hold across both paths.
"""

from __future__ import annotations

from typing import Any

from persistence.messages import OP_DELETE

_UPSERT_SQL = """
INSERT INTO {table} AS t (key, value, version, metadata, expires_at, deleted, created_at, updated_at)
SELECT * FROM unnest(
    %s::text[], %s::jsonb[], %s::bigint[], %s::jsonb[], %s::timestamptz[], %s::boolean[],
    %s::timestamptz[], %s::timestamptz[]
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


def cache_entries_upsert_many(*, writes: list[Any]) -> int:
    """Apply a batch of sets and deletes in one statement, in one transaction.

    ``writes`` are :class:`persistence.messages.PersistWrite` with at most one per key.
    The ``WHERE`` guard makes the statement idempotent and order-free: a row is only replaced
    by a higher version, so redeliveries, replays and several workers are harmless. A delete
    is stored as a tombstone row (``deleted`` = true) that keeps its version.
    Returns the number of rows inserted or changed.
    """
    from django.db import connection, transaction

    from persistence.models import CacheEntry

    if not writes:
        return 0
    sql = _UPSERT_SQL.format(table=connection.ops.quote_name(CacheEntry._meta.db_table))
    params = [
        [w.key for w in writes],
        [w.value_json if w.value_json is not None else "null" for w in writes],
        [w.version for w in writes],
        [w.metadata_json for w in writes],
        [w.expires_at for w in writes],
        [w.op == OP_DELETE for w in writes],
        [w.created_at for w in writes],
        [w.updated_at for w in writes],
    ]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount
