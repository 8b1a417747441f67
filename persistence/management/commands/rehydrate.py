"""`manage.py rehydrate KEY… | --all [--force]`: load entries from PostgreSQL into Redis."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from persistence.keys import is_valid_key
from persistence.rehydration import cache_entries_rehydrate, count_live


class Command(BaseCommand):
    help = "Load live entries from PostgreSQL into Redis with the TTL they have left."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("keys", nargs="*", help="keys to rehydrate")
        parser.add_argument("--all", action="store_true", help="rehydrate every live entry")
        parser.add_argument("--force", action="store_true", help="overwrite what Redis has")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **options: Any) -> None:
        keys: list[str] = options["keys"]
        if options["all"] == bool(keys):
            raise CommandError("give one or more keys, or --all (not both)")
        bad = [k for k in keys if not is_valid_key(k)]
        if bad:
            raise CommandError(f"invalid key(s): {', '.join(bad)}")
        selection = None if options["all"] else keys
        total = count_live(selection)
        with tqdm(total=total, unit="entries", disable=options["no_progress"], file=self.stderr._out) as bar:
            result = cache_entries_rehydrate(keys=selection, force=options["force"], progress=bar.update)
        summary = f"rehydrated {result.loaded} entries"
        if result.skipped_present:
            summary += f", {result.skipped_present} already in Redis at the same or a newer version"
        if result.missing:
            summary += f", {result.missing} not found in PostgreSQL (absent, deleted or expired)"
        self.stdout.write(summary)
