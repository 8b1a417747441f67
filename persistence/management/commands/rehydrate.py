"""`manage.py rehydrate KEY… | --all [--force]`: load entries from PostgreSQL into Redis.

Rows that cannot be loaded are listed with the reason after the others are loaded, and the
command then exits with code 1. What it did goes into the audit log (``entry.rehydrate``).
"""

from __future__ import annotations

from typing import Any, TextIO

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from redis.exceptions import RedisError
from tqdm import tqdm

from persistence.keys import is_valid_key
from persistence.operator_actions import action_target, command_action_send
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
        # The stream under Django's OutputWrapper. django-stubs leaves the private _out out, and its
        # OutputWrapper.__getattr__ types any other attribute as a Callable.
        stderr: TextIO = self.stderr._out  # type: ignore[assignment]
        with tqdm(total=total, unit="entries", disable=options["no_progress"], file=stderr) as bar:
            try:
                result = cache_entries_rehydrate(keys=selection, force=options["force"], progress=bar.update)
            except RedisError as error:  # not one row: nothing more can be loaded
                raise CommandError(
                    f"stopped after {bar.n} of {total} entries: Redis did not answer ({error})"
                ) from error
            except DatabaseError as error:
                raise CommandError(
                    f"stopped after {bar.n} of {total} entries: PostgreSQL did not answer ({str(error).strip()})"
                ) from error
        command_action_send(
            action="entry.rehydrate",
            target="all" if selection is None else action_target(selection),
            details={
                "count": total,
                "force": options["force"],
                "loaded": result.loaded,
                "skipped": result.skipped_present,
                "missing": result.missing,
                "failed": result.failed,
            },
        )
        summary = f"rehydrated {result.loaded} entries"
        if result.skipped_present:
            summary += f", {result.skipped_present} already in Redis at the same or a newer version"
        if result.missing:
            summary += f", {result.missing} not found in PostgreSQL (absent, deleted or expired)"
        if result.failed:
            summary += f", {result.failed} could not be loaded:"
        self.stdout.write(summary)
        if not result.failed:
            return
        for failure in result.failures:
            key = failure.key if failure.key.isprintable() else repr(failure.key)
            self.stdout.write(f"  {key}: {failure.reason}")
        if result.failed > len(result.failures):
            self.stdout.write(f"  … and {result.failed - len(result.failures)} more (each is in the log)")
        # Exit code 1, after the rest was loaded: a script or an operator sees it was not all.
        entries = "entry" if result.failed == 1 else "entries"
        raise CommandError(f"{result.failed} {entries} could not be loaded into Redis (listed above); the rest were")
