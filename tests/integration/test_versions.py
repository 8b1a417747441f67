"""Versions only grow: concurrency, deletes, late older writes, the worker's guarded upsert."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from persistence import jetstream, redis_store, write_behind
from persistence.keys import entry_key
from persistence.messages import PersistWrite, decode, latest_per_key
from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_fifty_concurrent_writers_on_one_key_end_at_the_highest_acknowledged_version(api, worker) -> None:
    key = unique_key("hot")

    def write(i: int) -> tuple[int, int, int]:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            response = http.post(f"/v1/cache/{key}", json={"value": {"writer": i}})
            assert response.status_code in (200, 201), response.text
            body = response.json()
            return body["version"], body["value"]["writer"], response.status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(write, range(50)))

    versions = sorted(v for v, _, _ in results)
    assert versions == list(range(1, 51)), "every write got its own version"
    assert [status for _, _, status in results].count(201) == 1, "exactly one writer created the key"
    top_version, top_writer, _ = max(results)
    row = wait_for(
        lambda: CacheEntry.objects.filter(key=key, version=top_version).first(), message="top version persisted"
    )
    assert row.value == {"writer": top_writer}
    cached = httpx.get(f"{api.url}/v1/cache/{key}").json()
    assert (cached["version"], cached["value"]) == (top_version, {"writer": top_writer})


def _publish_raw(op: str, body: dict) -> None:
    n = jetstream.names()
    jetstream.publisher().publish(
        n.persist_subject(op),
        orjson.dumps(body),
        headers={"Nats-Msg-Id": f"{body['key']}:{body['version']}"},
        timeout=5,
    )


def test_delete_then_a_delayed_older_write_keeps_the_key_deleted(client: Client, worker) -> None:
    # given a key at version 1, deleted (version 2) and persisted as deleted
    key = unique_key()
    created = client.post(f"/v1/cache/{key}", {"value": "old"}, content_type="application/json").json()
    assert client.delete(f"/v1/cache/{key}").status_code == 204
    assert client.get(f"/v1/cache/{key}").status_code == 404
    wait_for(lambda: CacheEntry.objects.filter(key=key, deleted=True).exists(), message="tombstone persisted")
    # when an older write that was still in flight arrives late, in JetStream and in Redis
    late = {
        "op": "set", "key": key, "version": 1, "value": "late", "metadata": {}, "expires_at": None,
        "created_at": created["created_at"], "updated_at": created["updated_at"],
    }  # fmt: skip
    _publish_raw("set", late)
    stored, _, _ = redis_store.store(
        redis_store.StoredEntry(key, 1, b'"late"', b"{}", created["created_at"], created["updated_at"], None)
    )
    # then it changes nothing
    assert stored is False
    marker = unique_key("marker")
    client.post(f"/v1/cache/{marker}", {"value": 1}, content_type="application/json")
    wait_for(lambda: CacheEntry.objects.filter(key=marker).exists(), message="the worker got past the late write")
    row = CacheEntry.objects.get(key=key)
    assert row.deleted and row.version == 2
    assert client.get(f"/v1/cache/{key}").status_code == 404


def test_a_deleted_key_can_be_written_again_with_a_higher_version(client: Client, worker) -> None:
    key = unique_key()
    client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json")
    client.delete(f"/v1/cache/{key}")
    again = client.post(f"/v1/cache/{key}", {"value": 2}, content_type="application/json")
    assert again.status_code == 201 and again.json()["version"] == 3
    row = wait_for(lambda: CacheEntry.objects.filter(key=key, version=3).first())
    assert not row.deleted and row.value == 2


def _write(key: str, version: int, value: object, op: str = "set") -> PersistWrite:
    now = datetime.now(UTC)
    return PersistWrite(op, key, version, orjson.dumps(value).decode() if op == "set" else None, "{}", None, now, now)


def test_the_upsert_is_one_statement_and_never_lowers_a_version() -> None:
    keys = [unique_key() for _ in range(200)]
    with CaptureQueriesContext(connection) as queries:
        write_behind.cache_entries_upsert_many(writes=[_write(k, 5, {"v": 5}) for k in keys])
    upserts = [q for q in queries.captured_queries if "INSERT INTO" in q["sql"]]
    assert len(upserts) == 1
    assert CacheEntry.objects.filter(key__in=keys).count() == 200

    # a lower version (a redelivery, a replay, a slower worker) changes nothing
    write_behind.cache_entries_upsert_many(writes=[_write(keys[0], 4, "older"), _write(keys[1], 6, "newer")])
    assert CacheEntry.objects.get(key=keys[0]).value == {"v": 5}
    assert CacheEntry.objects.get(key=keys[1]).value == "newer"
    # a delete keeps its version as a tombstone
    write_behind.cache_entries_upsert_many(writes=[_write(keys[2], 7, None, op="delete")])
    write_behind.cache_entries_upsert_many(writes=[_write(keys[2], 6, "late")])
    tombstone = CacheEntry.objects.get(key=keys[2])
    assert tombstone.deleted and tombstone.version == 7


def test_a_batch_keeps_only_the_highest_version_per_key() -> None:
    writes = [_write("a", 1, 1), _write("b", 3, 3), _write("a", 3, 3), _write("a", 2, 2), _write("b", 1, 1)]
    assert sorted((w.key, w.version) for w in latest_per_key(writes)) == [("a", 3), ("b", 3)]


def test_messages_round_trip_through_decode() -> None:
    body = {
        "op": "set", "key": "k", "version": 3, "value": {"x": [1]}, "metadata": {"a": 1},
        "expires_at": 1_900_000_000_000, "created_at": "2026-11-30T00:00:00Z", "updated_at": "2026-11-30T00:00:01Z",
    }  # fmt: skip
    write = decode(orjson.dumps(body))
    assert (write.op, write.key, write.version, write.value_json) == ("set", "k", 3, '{"x":[1]}')
    assert write.expires_at.timestamp() == 1_900_000_000


def test_a_write_whose_message_jetstream_drops_as_a_duplicate_is_not_acknowledged(client: Client) -> None:
    # given a message with the id the next write of this key will use (a version collision)
    redis_store.mark_counters_complete()  # versions seeded from PostgreSQL, as in normal operation
    key = unique_key()
    stamp = "2026-11-30T00:00:00Z"
    body = {"op": "set", "key": key, "version": 1, "value": "other", "metadata": {}, "expires_at": None}
    _publish_raw("set", {**body, "created_at": stamp, "updated_at": stamp})
    # when the API writes version 1 of the key
    response = client.post(f"/v1/cache/{key}", {"value": "mine"}, content_type="application/json")
    # then it does not answer 2xx for a message JetStream dropped, and shows nothing
    assert response.status_code == 503, response.content
    assert "duplicate" in response.json()["details"]["reason"]
    assert redis_store.read(key) is None


def _entry(key: str, version: int, value: bytes = b'"v"', created_at: str = "2026-01-01T00:00:00Z"):
    return redis_store.StoredEntry(key, version, value, b"{}", created_at, "x", None)


def test_evict_stale_drops_only_copies_older_than_what_postgresql_holds() -> None:
    keys = [unique_key("evict") for _ in range(3)]
    for key, version in zip(keys, (1, 3, 2), strict=True):
        redis_store.store(_entry(key, version))
    # persisted versions: keys[0] at 2 (Redis holds 1: stale), keys[1] at 2 (Redis holds 3: newer),
    # keys[2] at 2 (equal: kept), and a key Redis does not hold at all
    dropped = redis_store.evict_stale({keys[0]: 2, keys[1]: 2, keys[2]: 2, unique_key("absent"): 5})
    assert dropped == 1
    assert redis_store.read(keys[0]) is None
    assert redis_store.read(keys[1]).version == 3 and redis_store.read(keys[2]).version == 2
    # more keys than one script call takes: chunked, same result
    many = {unique_key("evict-many"): 1 for _ in range(redis_store.EVICT_CHUNK + 10)}
    for key in many:
        redis_store.store(_entry(key, 1))
    assert redis_store.evict_stale(dict.fromkeys(many, 2)) == len(many)
    assert redis_store.read_many(list(many)) == [None] * len(many)
    assert redis_store.evict_stale({}) == 0


def test_a_write_still_in_flight_after_the_worker_evicted_its_key_is_neither_stored_nor_new() -> None:
    # The race the concurrent-writers test once hit: v1 is in Redis, the worker commits v3 (whose
    # API thread has not reached Redis yet) and evicts v1; then the thread holding v2 stores.
    key = unique_key("race")
    assert redis_store.store(_entry(key, 1, created_at="2026-01-01T00:00:00Z"))[:2] == (True, True)
    assert redis_store.evict_stale({key: 3}) == 1
    assert redis_store.read(key) is None, "a stale marker reads as a miss"
    stored, is_new, created_at = redis_store.store(_entry(key, 2, created_at="2026-06-01T00:00:00Z"))
    assert (stored, is_new, created_at) == (False, False, "2026-01-01T00:00:00Z")
    assert redis_store.read(key) is None
    # PostgreSQL's row (v3) loaded by a read-through replaces the marker, keeping created_at
    stored, is_new, created_at = redis_store.store(_entry(key, 3, b'"three"', created_at="2026-06-01T00:00:00Z"))
    assert (stored, is_new, created_at) == (True, False, "2026-01-01T00:00:00Z")
    assert redis_store.read(key).value_json == b'"three"'
    # and it does not outlive the entry it stands for
    ttl_key = unique_key("race-ttl")
    redis_store.store(redis_store.StoredEntry(ttl_key, 1, b"1", b"{}", "c", "u", int(time.time() * 1000) + 5_000))
    redis_store.evict_stale({ttl_key: 2})
    assert 0 < redis_store.client().pttl(entry_key(ttl_key)) <= 5_000


def test_an_operators_eviction_deletes_the_copy_outright() -> None:
    key = unique_key("evict-op")
    redis_store.store(_entry(key, 1))
    assert redis_store.evict_stale({key: 2}, mark=False) == 1
    assert not redis_store.client().exists(entry_key(key))
