"""`manage.py restore PATH`: a backup into an empty database, then Redis rebuilt from it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from redis.exceptions import RedisError
from tqdm import tqdm

from ops.audit import audit_record_command
from ops.backup import BackupError, database_restore, restore_redis


class Command(BaseCommand):
    help = (
        "Restore a `manage.py backup` file into an empty database (--clean: replace what it holds), "
        "then empty the service's Redis keys and load every live entry back (rehydrate --all)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("path", type=Path, help="a file written by manage.py backup")
        parser.add_argument("--clean", action="store_true", help="drop the backup's tables first if they exist")
        parser.add_argument("--pg-bin", type=Path, metavar="DIR", help="directory of the pg_restore to use")
        parser.add_argument("--no-rehydrate", action="store_true", help="leave Redis as it is")
        parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def handle(self, *args: Any, **options: Any) -> None:
        path: Path = options["path"].resolve()
        if not options["yes"]:
            self._confirm(
                f"Restore {path} into the database"
                + (", dropping the tables it holds first" if options["clean"] else "")
                + ("" if options["no_rehydrate"] else ", then delete the service's Redis keys and rehydrate")
                + "? Stop the API and the workers first. [y/N] "
            )
        stderr: TextIO = self.stderr._out  # type: ignore[assignment]  # the stream under OutputWrapper
        quiet = options["no_progress"]
        with tqdm(unit="items", desc="pg_restore", disable=quiet, file=stderr) as bar:
            try:
                restored = database_restore(
                    path=path, pg_bin=options["pg_bin"], clean=options["clean"], progress=bar.update,
                    total=lambda n: setattr(bar, "total", n),
                )  # fmt: skip
            except BackupError as error:
                raise CommandError(str(error)) from error
            bar.update(max(0, (bar.total or 0) - bar.n))
        self.stderr.write(
            f"restored {path} ({restored.items} items, {len(restored.tables)} tables) in {restored.seconds:.1f} s "
            f"with {restored.client.path} (version {restored.client.major})"
        )
        details: dict[str, Any] = {"clean": options["clean"], "tables": len(restored.tables)}
        if not options["no_rehydrate"]:
            with tqdm(unit="entries", desc="rehydrate", disable=quiet, file=stderr) as bar:
                try:
                    flushed, result = restore_redis(progress=bar.update, total=lambda n: setattr(bar, "total", n))
                except (RedisError, DatabaseError) as error:
                    raise CommandError(
                        f"the database is restored, but Redis could not be rebuilt ({str(error).strip()}); "
                        "run `manage.py rehydrate --all --force` once Redis answers"
                    ) from error
            details.update(redis_keys_deleted=flushed, rehydrated=result.loaded, failed=result.failed)
            self.stderr.write(
                f"Redis: deleted {flushed} keys of the service, rehydrated {result.loaded} entries"
                + (f", {result.failed} could not be loaded (see `manage.py rehydrate --all`)" if result.failed else "")
            )
        # Recorded in the restored database: its own audit log ends with the restore.
        audit_record_command(action="database.restore", target=str(path), details=details)
        self.stdout.write(f"restored {path}")

    def _confirm(self, prompt: str) -> None:
        if not sys.stdin or not sys.stdin.isatty():
            raise CommandError(f"{prompt.removesuffix(' [y/N] ')}\nNot a terminal, so nothing was done: add --yes.")
        if input(prompt).strip().lower() not in ("y", "yes"):
            raise CommandError("Nothing restored.")
