"""The system of record: table ``cache_entries``."""

from __future__ import annotations

from django.db import models


class CacheEntry(models.Model):
    """One cache entry as the worker last persisted it.

    ``version`` only grows: the worker's upsert never replaces a row with a lower version.
    A delete is stored as a tombstone (``deleted`` = true, value null) that keeps its version, so
    a late write with a lower version cannot bring the key back; tombstones are purged after
    ``TOMBSTONE_RETENTION``. Expired rows (``expires_at`` in the past) count as missing.
    """

    key = models.CharField(max_length=255, primary_key=True)
    value = models.JSONField(null=True)
    version = models.BigIntegerField()
    metadata = models.JSONField(default=dict)
    expires_at = models.DateTimeField(null=True, blank=True)
    deleted = models.BooleanField(default=False, db_default=False)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        db_table = "cache_entries"
        verbose_name = "cache entry"
        verbose_name_plural = "cache entries"
        permissions = [
            ("rehydrate_cacheentry", "Can rehydrate entries into Redis"),
            ("evict_cacheentry", "Can evict entries from Redis"),
        ]
        indexes = [
            models.Index(
                fields=["expires_at"],
                name="cache_entries_expires_idx",
                condition=models.Q(expires_at__isnull=False),
            ),
            models.Index(fields=["updated_at"], name="cache_entries_updated_idx"),
        ]

    def __str__(self) -> str:
        return self.key
