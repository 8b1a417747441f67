"""Reads fall through to PostgreSQL and put the entry back in Redis; rehydration."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from persistence import redis_store, selectors, services
from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def make_row(
    key: str, *, value: object = "v", version: int = 3, ttl: float | None = None, deleted: bool = False
) -> CacheEntry:
    now = timezone.now()
    return CacheEntry.objects.create(
        key=key,
        value=None if deleted else value,
        version=version,
        metadata={"m": 1},
        expires_at=now + timedelta(seconds=ttl) if ttl is not None else None,
        deleted=deleted,
        created_at=now,
        updated_at=now,
    )


def test_after_flushdb_get_answers_from_postgresql_and_refills_redis(client: Client, worker, flush_redis) -> None:
    # given a key persisted by the worker
    key = unique_key()
    client.post(f"/v1/cache/{key}", {"value": [1, 2], "ttl": 600}, content_type="application/json")
    wait_for(lambda: CacheEntry.objects.filter(key=key, version=1).exists())
    # when Redis loses everything
    flush_redis()
    assert redis_store.read(key) is None
    response = client.get(f"/v1/cache/{key}")
    # then
    assert response.status_code == 200
    body = response.json()
    assert body["value"] == [1, 2] and body["version"] == 1 and 590 <= body["ttl"] <= 600
    cached = redis_store.read(key)
    assert cached is not None and cached.version == 1
    assert 590 <= cached.ttl() <= 600, "rehydration keeps the TTL left, never a fresh one"


def test_expired_and_deleted_rows_count_as_missing(client: Client) -> None:
    expired, deleted = unique_key("expired"), unique_key("deleted")
    make_row(expired, ttl=-5)
    make_row(deleted, deleted=True)
    assert client.get(f"/v1/cache/{expired}").status_code == 404
    assert client.get(f"/v1/cache/{deleted}").status_code == 404
    # not put back in Redis as an entry: remembered as absent (a negative entry, NEGATIVE_CACHE_TTL)
    assert redis_store.read(expired) is redis_store.TOMBSTONE


def test_writes_after_redis_loss_continue_from_the_version_postgresql_knows(
    client: Client, worker, flush_redis
) -> None:
    key = unique_key()
    make_row(key, version=41)
    flush_redis()
    response = client.post(f"/v1/cache/{key}", {"value": "new"}, content_type="application/json")
    assert response.json()["version"] == 42


def test_writes_in_flight_when_redis_loses_its_data_are_never_outranked(
    client: Client, worker_factory, flush_redis
) -> None:
    # given writes acknowledged but not persisted yet (no worker runs)
    key = unique_key()
    for value in ("a", "b", "c"):
        last = client.post(f"/v1/cache/{key}", {"value": value}, content_type="application/json").json()
    assert last["version"] == 3
    # when Redis loses everything and the key is written again
    flush_redis()
    newer = client.post(f"/v1/cache/{key}", {"value": "after"}, content_type="application/json").json()
    # then the new write outranks the ones in flight (the backlog could not drain: clock floor)
    assert newer["version"] > 3
    worker_factory().start()
    row = wait_for(lambda: CacheEntry.objects.filter(key=key, version=newer["version"]).first(), timeout=30)
    assert row.value == "after"


def test_concurrent_misses_on_one_key_cause_one_postgresql_query(monkeypatch) -> None:
    key = unique_key()
    make_row(key, value={"big": True})
    calls = []
    real = selectors.cache_entry_get_from_db

    def slow_spy(*, key: str):
        calls.append(key)
        time.sleep(0.2)  # hold the query open so every reader arrives while it runs
        return real(key=key)

    monkeypatch.setattr(selectors, "cache_entry_get_from_db", slow_spy)
    results = []
    threads = [threading.Thread(target=lambda: results.append(services.cache_entry_get(key=key))) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 20 and all(entry is not None and entry.version == 3 for entry in results)


def test_rehydrate_all_restores_every_live_key_and_skips_expired(flush_redis, capsys) -> None:
    live = [unique_key("live") for _ in range(25)]
    for key in live:
        make_row(key, ttl=3600)
    expired = unique_key("expired")
    make_row(expired, ttl=-1)
    gone = unique_key("gone")
    make_row(gone, deleted=True)
    forever = unique_key("forever")
    make_row(forever)
    flush_redis()

    call_command("rehydrate", "--all", "--no-progress")

    assert "rehydrated 26 entries" in capsys.readouterr().out
    for key in [*live, forever]:
        entry = redis_store.read(key)
        assert entry is not None and entry.version == 3
    assert 3590 <= redis_store.read(live[0]).ttl() <= 3600
    assert redis_store.read(forever).ttl() is None
    assert redis_store.read(expired) is None and redis_store.read(gone) is None


def test_rehydrate_keys_leaves_newer_redis_copies_unless_forced(capsys) -> None:
    key, absent = unique_key(), unique_key("absent")
    make_row(key, value="from-pg", version=3)
    newer = selectors.stored_entry_from_row(CacheEntry.objects.get(key=key))
    redis_store.store(type(newer)(**{**newer.__dict__, "version": 5, "value_json": b'"in-redis"'}))

    call_command("rehydrate", key, absent, "--no-progress")
    out = capsys.readouterr().out
    assert "rehydrated 0 entries" in out and "1 already in Redis" in out and "1 not found" in out
    assert redis_store.read(key).value_json == b'"in-redis"'

    call_command("rehydrate", key, "--force", "--no-progress")
    assert redis_store.read(key).value_json == b'"from-pg"'


def test_rehydrate_needs_keys_or_all() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("rehydrate")
    with pytest.raises(CommandError):
        call_command("rehydrate", "bad key")
