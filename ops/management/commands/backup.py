"""`manage.py backup [PATH]`: the whole database in one pg_dump file (see ops.backup)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TextIO

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from ops.audit import audit_record_command
from ops.backup import BackupError, database_backup


class Command(BaseCommand):
    help = (
        "Back up the database (cache entries, users, API keys, settings, audit log) to one pg_dump file, "
        "with the pg_dump of the server's version. Prints the file's path on stdout."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "path", nargs="?", type=Path, help="the file to write (default: <data dir>/backups/birbnest-<time>.dump)"
        )
        parser.add_argument("--pg-bin", type=Path, metavar="DIR", help="directory of the pg_dump to use")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **options: Any) -> None:
        path: Path = options["path"] or (
            settings.BIRB.data_dir / "backups" / time.strftime("birbnest-%Y%m%d-%H%M%S.dump", time.gmtime())
        )
        stderr: TextIO = self.stderr._out  # type: ignore[assignment]  # the stream under OutputWrapper
        with tqdm(unit="B", unit_scale=True, desc="pg_dump", disable=options["no_progress"], file=stderr) as bar:
            try:
                result = database_backup(path=path.resolve(), pg_bin=options["pg_bin"], progress=bar.update)
            except BackupError as error:
                raise CommandError(str(error)) from error
        audit_record_command(
            action="database.backup",
            target=str(result.path),
            details={"bytes": result.size, "pg_dump": result.client.major, "server": result.server_major},
        )
        self.stderr.write(
            f"backed up the database to {result.path}: {result.size} bytes in {result.seconds:.1f} s "
            f"({result.client.path}, version {result.client.major}, server {result.server_major})"
        )
        self.stdout.write(str(result.path))
