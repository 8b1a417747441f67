"""`manage.py purge_expired [--retention DURATION]`: delete the rows that expired, and the
tombstones written, longer than TOMBSTONE_RETENTION ago.

The workers do this every WORKER_EXPIRED_PURGE_INTERVAL, a little at a time; this runs the same
purge to the end, now (after a retention change, or to measure it).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from birbnest.env import ConfigError, parse_duration
from persistence.write_behind import cache_entries_purge


class Command(BaseCommand):
    help = "Delete rows expired or deleted longer than TOMBSTONE_RETENTION ago."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--retention",
            help="keep rows expired or deleted less than this long ago (default: TOMBSTONE_RETENTION), e.g. 7d, 0s",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        retention = settings.BIRB.tombstone_retention
        if options["retention"] is not None:
            try:
                retention = parse_duration("--retention", options["retention"])
            except ConfigError as error:
                raise CommandError(str(error)) from None
        before = datetime.now(UTC) - timedelta(seconds=retention)
        started = time.monotonic()
        try:
            purged = cache_entries_purge(before=before)
        except DatabaseError as error:
            raise CommandError(f"PostgreSQL did not answer ({str(error).strip()})") from error
        seconds = time.monotonic() - started
        self.stdout.write(f"purged {purged} rows expired or deleted before {before.isoformat()} in {seconds:.2f} s")
