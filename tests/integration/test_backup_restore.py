"""`manage.py backup` / `manage.py restore`: a backup, everything wiped (the tables dropped,
Redis flushed), the restore, and every key read back through the API (issue #11)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from ops.backup import BackupError, client_version, database_tables, find_client, server_major
from ops.models import AuditEntry
from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def command(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def drop_every_table() -> None:
    with connection.cursor() as cursor:
        for table in database_tables():
            cursor.execute(f"DROP TABLE IF EXISTS {connection.ops.quote_name(table)} CASCADE")


def write_entries(api: Any, prefix: str, count: int) -> dict[str, dict[str, Any]]:
    written = {}
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for i in range(count):
            key = f"{prefix}:{i}"
            body: dict[str, Any] = {"value": {"n": i, "text": "é" * (i % 7), "big": 10**20}, "metadata": {"i": i}}
            if i % 3 == 0:
                body["ttl"] = 3600
            response = http.post(f"/v1/cache/{key}", json=body)
            assert response.status_code == 201, response.text
            written[key] = response.json()
        gone = f"{prefix}:deleted"
        assert http.post(f"/v1/cache/{gone}", json={"value": 1}).status_code == 201
        assert http.delete(f"/v1/cache/{gone}").status_code == 204
    return written


def test_backup_wipe_restore_and_every_key_reads_back(api, worker, flush_redis, redis_client, tmp_path: Path) -> None:
    # given: entries persisted by the worker, and something of the console's in the database
    prefix = unique_key("bk")
    written = write_entries(api, prefix, 300)
    wait_for(
        lambda: CacheEntry.objects.filter(key__startswith=prefix).count() == len(written) + 1,
        timeout=60,
        message="every write persisted",
    )
    AuditEntry.objects.create(actor="cli:test", address="cli", action="test.mark", target=prefix)

    # when: backed up ...
    out, err = command("backup", str(tmp_path / "birb.dump"), "--no-progress")
    backup = Path(out.strip().splitlines()[-1])
    assert backup == tmp_path / "birb.dump" and backup.stat().st_size > 0
    print(err.strip())
    server = server_major()
    assert f"version {server}, server {server}" in err

    # ... everything wiped ...
    worker.stop()  # as an operator would ("stop services"); its writes would fail on missing tables
    drop_every_table()
    flush_redis()
    assert database_tables() == []
    assert redis_client.dbsize() == 0

    # ... and restored
    out, err = command("restore", str(backup), "--yes", "--no-progress")
    print(err.strip())
    assert f"restored {backup}" in out
    rehydrated = re.search(r"rehydrated (\d+) entries", err)
    assert rehydrated and int(rehydrated.group(1)) >= len(written), err  # the deleted key stays a tombstone

    # then: every key reads back through the API as it was written, from Redis
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for key, entry in written.items():
            response = http.get(f"/v1/cache/{key}")
            assert response.status_code == 200, (key, response.text)
            got = response.json()
            assert got["value"] == entry["value"] and got["metadata"] == entry["metadata"]
            assert got["version"] == entry["version"] and got["created_at"] == entry["created_at"]
            if entry["ttl"] is not None:
                assert 0 < got["ttl"] <= entry["ttl"]
            else:
                assert got["ttl"] is None
        assert http.get(f"/v1/cache/{prefix}:deleted").status_code == 404
        # and a new write goes on from there
        again = http.post(f"/v1/cache/{prefix}:0", json={"value": "after"})
        assert again.status_code == 200 and again.json()["version"] > written[f"{prefix}:0"]["version"]
    assert AuditEntry.objects.filter(action="test.mark", target=prefix).exists()
    assert AuditEntry.objects.filter(action="database.restore").exists()


def test_restore_refuses_a_database_that_is_not_empty_unless_clean(tmp_path: Path) -> None:
    out, _ = command("backup", str(tmp_path / "b.dump"), "--no-progress")
    with pytest.raises(CommandError, match=r"is not empty .* --clean"):
        command("restore", str(tmp_path / "b.dump"), "--yes", "--no-progress", "--no-rehydrate")
    out, _ = command("restore", str(tmp_path / "b.dump"), "--yes", "--no-progress", "--no-rehydrate", "--clean")
    assert "restored" in out


def test_restore_asks_first_and_refuses_without_a_terminal(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="add --yes"):
        command("restore", str(tmp_path / "none.dump"))


def test_an_older_pg_dump_is_not_used_against_a_newer_server() -> None:
    server = server_major()
    older = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (client_version(d / "pg_dump") or 99) < server]
    if not older:
        pytest.skip("no older PostgreSQL client installed here")
    with pytest.raises(BackupError, match=f"no pg_dump of PostgreSQL {server} or newer found"):
        find_client("pg_dump", server=server, pg_bin=older[0])
    # without --pg-bin the right one is found (the embedded wheel's under the test stack)
    assert find_client("pg_dump", server=server).major >= server
