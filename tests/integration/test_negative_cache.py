"""Negative caching (issue #14, "GET absent key"): a read that PostgreSQL answers "absent" leaves a
negative entry in Redis (a tombstone at version 0) for ``NEGATIVE_CACHE_TTL``, so the next reads of
the key answer 404 from Redis; every write replaces it, and a write that lands while PostgreSQL is
being asked is never hidden by it. On the session's real PostgreSQL, Redis and NATS (and a real
Redis Cluster at the end)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from persistence import redis_store, selectors, services
from persistence.keys import entry_key, key_slot, version_key
from persistence.models import CacheEntry
from persistence.redis_store import StoredEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

NEGATIVE = {b"v": b"0", b"t": b"1"}
TABLE = CacheEntry._meta.db_table


@contextmanager
def entry_queries() -> Iterator[Callable[[], int]]:
    """Counts this process's queries of the cache_entries table (the read-through's)."""
    connection.queries_log.clear()  # a full log (it keeps 9,000) would count nothing
    with CaptureQueriesContext(connection) as queries:
        yield lambda: sum(f'"{TABLE}"' in query["sql"] for query in queries.captured_queries)


def calls_of(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[Any]:
    """Records each call of ``module.name`` (which still runs): its first argument."""
    real = getattr(module, name)
    calls: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def set_value(key: str, value: Any, ttl: int | None = None) -> StoredEntry:
    return services.cache_entry_set(key=key, value_json=orjson.dumps(value), ttl=ttl).entry


# --- (1) PostgreSQL once, then Redis -------------------------------------------------------------


def test_an_absent_key_is_asked_of_postgresql_once_then_answered_by_redis(client: Client, redis_client) -> None:
    key = unique_key("absent")
    with entry_queries() as first:
        miss = client.get(f"/v1/cache/{key}")
    assert miss.status_code == 404 and miss.json()["code"] == "NOT_FOUND"
    assert first() == 1
    assert redis_client.hgetall(entry_key(key)) == NEGATIVE
    assert 0 < redis_client.pttl(entry_key(key)) <= 30_000
    with entry_queries() as again:
        for _ in range(20):
            response = client.get(f"/v1/cache/{key}")
            assert response.status_code == 404 and response.content == miss.content
    assert again() == 0, "within NEGATIVE_CACHE_TTL the answer comes from Redis"
    assert redis_store.read(key) is redis_store.TOMBSTONE
    assert redis_store.held_many([key])[key] == redis_store.Held(0, tombstone=True)


def test_concurrent_misses_of_an_absent_key_make_one_query_and_store_one_negative_entry(monkeypatch) -> None:
    key = unique_key("herd")
    real = selectors.cache_entry_get_from_db
    queried: list[str] = []

    def slow(*, key: str) -> Any:
        queried.append(key)
        time.sleep(0.2)  # every reader arrives while the query runs
        return real(key=key)

    monkeypatch.setattr(selectors, "cache_entry_get_from_db", slow)
    stores = calls_of(monkeypatch, redis_store, "remember_absent")
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(services.cache_entry_get(key=key))) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [None] * 10
    assert queried == [key] and len(stores) == 1
    assert redis_store.read(key) is redis_store.TOMBSTONE


def test_a_negative_entry_counts_as_a_cache_hit_through_the_api(api, redis_client) -> None:
    key = unique_key("absent")

    def counts() -> tuple[int, int]:
        body = httpx.get(f"{api.url}/metrics").json()
        return body["cache_hits"], body["cache_misses"]

    hits, misses = counts()
    for _ in range(5):
        assert httpx.get(f"{api.url}/v1/cache/{key}").status_code == 404
    after_hits, after_misses = counts()
    assert (after_hits - hits, after_misses - misses) == (4, 1)
    assert redis_client.hgetall(entry_key(key)) == NEGATIVE


# --- (2) a write replaces it at once ---------------------------------------------------------------


def test_a_write_after_a_negative_entry_is_readable_at_once_through_the_api(api, redis_client) -> None:
    key, created_only, replaced = unique_key("post"), unique_key("create"), unique_key("put")
    with httpx.Client(base_url=api.url) as http:
        for name in (key, created_only, replaced):
            assert http.get(f"/v1/cache/{name}").status_code == 404
            assert redis_client.hgetall(entry_key(name)) == NEGATIVE
        # POST, create-only PUT (the negative entry says "absent": no need to ask PostgreSQL), PUT
        posted = http.post(f"/v1/cache/{key}", json={"value": {"n": 1}, "ttl": 600})
        assert posted.status_code == 201 and posted.json()["version"] == 1, posted.text
        assert (
            http.put(f"/v1/cache/{created_only}", json={"value": 2}, headers={"If-None-Match": "*"}).status_code == 201
        )
        assert http.put(f"/v1/cache/{replaced}", json={"value": 3}).status_code == 201
        read = http.get(f"/v1/cache/{key}")
        assert read.status_code == 200 and read.json()["value"] == {"n": 1} and read.json()["version"] == 1
        assert 590 <= read.json()["ttl"] <= 600
        assert http.get(f"/v1/cache/{created_only}").json()["value"] == 2
        assert http.get(f"/v1/cache/{replaced}").json()["value"] == 3
        got = http.post("/v1/cache/batch/get", json={"keys": [key, created_only, replaced]}).json()
        assert set(got["entries"]) == {key, created_only, replaced} and got["missing"] == []
    assert redis_client.hget(entry_key(key), "t") is None


def test_every_write_and_delete_store_replaces_a_negative_entry(redis_client) -> None:
    # given negative entries
    written, tombstoned, rehydrated = unique_key("w"), unique_key("d"), unique_key("r")
    for key in (written, tombstoned, rehydrated):
        assert services.cache_entry_get(key=key) is None
        assert redis_client.hgetall(entry_key(key)) == NEGATIVE
    # a write's store
    entry = set_value(written, "v")
    assert redis_store.read(written) == entry
    # a delete's tombstone (any version above 0)
    assert redis_store.store_tombstones([(tombstoned, 1)], ttl_ms=60_000) == [True]
    assert redis_client.hgetall(entry_key(tombstoned)) == {b"v": b"1", b"t": b"1"}
    # rehydration of a row put into PostgreSQL by hand (not through the API: hidden until then)
    now = timezone.now()
    CacheEntry.objects.create(key=rehydrated, value="by hand", version=1, metadata={}, created_at=now, updated_at=now)
    assert services.cache_entry_get(key=rehydrated) is None
    call_command("rehydrate", rehydrated, "--no-progress")
    loaded = services.cache_entry_get(key=rehydrated)
    assert loaded is not None and loaded.value_json == b'"by hand"'


def test_the_workers_stale_check_and_an_eviction_drop_a_negative_entry(redis_client) -> None:
    marked, evicted = unique_key("marked"), unique_key("evicted")
    for key in (marked, evicted):
        assert services.cache_entry_get(key=key) is None
    # the worker persisted version 2 of the key: the negative entry becomes a stale marker (a miss)
    assert redis_store.evict_stale({marked: 2}) == 1
    assert redis_client.hget(entry_key(marked), "e") == b"1"
    assert redis_store.read(marked) is None
    # an operator's eviction deletes it
    assert redis_store.evict_stale({evicted: 1}, mark=False) == 1
    assert not redis_client.exists(entry_key(evicted))


def test_touch_and_delete_of_a_remembered_absent_key_are_404_without_postgresql(client: Client) -> None:
    key = unique_key("absent")
    assert client.get(f"/v1/cache/{key}").status_code == 404
    with entry_queries() as queries:
        assert client.delete(f"/v1/cache/{key}").status_code == 404
        assert client.post(f"/v1/cache/{key}/touch", {"ttl": 5}, content_type="application/json").status_code == 404
    assert queries() == 0


# --- (3) the race: a write while PostgreSQL is asked -----------------------------------------------


def test_a_write_stored_while_postgresql_is_asked_stands(monkeypatch, redis_client) -> None:
    key = unique_key("race")
    real = selectors.cache_entry_get_from_db

    def read_then_write(*, key: str) -> Any:
        found = real(key=key)  # absent: the write below is not in this answer
        set_value(key, "late")
        return found

    monkeypatch.setattr(selectors, "cache_entry_get_from_db", read_then_write)
    assert services.cache_entry_get(key=key) is None  # what PostgreSQL said when it was asked
    monkeypatch.setattr(selectors, "cache_entry_get_from_db", real)
    entry = services.cache_entry_get(key=key)
    assert entry is not None and entry.value_json == b'"late"', "the write's entry is not replaced"


def test_a_write_whose_entry_is_gone_again_before_the_negative_store_is_not_hidden(
    monkeypatch, redis_client, worker
) -> None:
    """The entry check alone would not do: here the write's entry is stored, persisted and evicted
    (Redis's maxmemory, an operator) before the reader stores its negative entry. Its version
    counter moved since the reader read it, so nothing is stored and the next read finds the row."""
    key = unique_key("race")
    real = selectors.cache_entry_get_from_db

    def read_then_write_persist_evict(*, key: str) -> Any:
        found = real(key=key)
        written = set_value(key, "late")
        wait_for(lambda: CacheEntry.objects.filter(key=key, version=written.version).exists(), timeout=30)
        assert redis_client.delete(entry_key(key)) == 1
        return found

    monkeypatch.setattr(selectors, "cache_entry_get_from_db", read_then_write_persist_evict)
    assert services.cache_entry_get(key=key) is None
    monkeypatch.setattr(selectors, "cache_entry_get_from_db", real)
    assert not redis_client.exists(entry_key(key)), "no negative entry over a write it did not see"
    entry = services.cache_entry_get(key=key)
    assert entry is not None and entry.value_json == b'"late"'


def test_the_negative_store_needs_the_counter_it_was_given_and_no_hash(redis_client) -> None:
    key = unique_key("guard")
    assert redis_store.version_counters([key]) == [None]
    # a counter that was absent must still be absent
    version = set_value(key, 1).version
    redis_client.delete(entry_key(key))
    assert redis_store.remember_absent([(key, None)], ttl_ms=10_000) == [False]
    # one that moved is refused too; the one read now is taken
    counter = redis_store.version_counters([key])[0]
    assert counter == str(version).encode()
    assert redis_store.remember_absent([(key, b"0")], ttl_ms=10_000) == [False]
    assert redis_store.remember_absent([(key, counter)], ttl_ms=10_000) == [True]
    assert redis_client.hgetall(entry_key(key)) == NEGATIVE
    # never over a hash (an entry, a tombstone, a stale marker, or itself)
    assert redis_store.remember_absent([(key, counter)], ttl_ms=10_000) == [False]
    assert redis_client.get(version_key(key)) == counter, "the counter is left alone"


# --- (4) NEGATIVE_CACHE_TTL=0 --------------------------------------------------------------------


def test_ttl_zero_turns_it_off(client: Client, settings, monkeypatch, redis_client) -> None:
    settings.BIRB = replace(settings.BIRB, negative_cache_ttl=0.0)
    counters = calls_of(monkeypatch, redis_store, "version_counters")
    key, batched = unique_key("off"), unique_key("off")
    with entry_queries() as queries:
        for _ in range(3):
            assert client.get(f"/v1/cache/{key}").status_code == 404
            got = client.post("/v1/cache/batch/get", {"keys": [batched]}, content_type="application/json")
            assert got.json()["missing"] == [batched]
    assert queries() == 6, "every read asks PostgreSQL"
    assert not redis_client.exists(entry_key(key)) and not redis_client.exists(entry_key(batched))
    assert counters == [], "and no round trip is spent on the counter"


def test_ttl_setting_is_validated() -> None:
    from birbnest.env import ConfigError, load_config

    base = {"SECRET_KEY": "a-test-key-that-is-not-a-known-example"}
    assert load_config(base).negative_cache_ttl == 30.0
    assert load_config({**base, "NEGATIVE_CACHE_TTL": "0"}).negative_cache_ttl == 0.0
    assert load_config({**base, "NEGATIVE_CACHE_TTL": "500ms"}).negative_cache_ttl == 0.5
    assert load_config({**base, "NEGATIVE_CACHE_TTL": "1h"}).negative_cache_ttl == 3600.0
    for bad, says in (("2h", "maximum of 3600s"), ("-1", "not a duration"), ("0.0001", "minimum of 1ms")):
        with pytest.raises(ConfigError, match=says):
            load_config({**base, "NEGATIVE_CACHE_TTL": bad})


# --- (5) batch get ------------------------------------------------------------------------------


def test_batch_get_leaves_negative_entries_in_one_round_trip(client: Client, monkeypatch, redis_client) -> None:
    present = unique_key("present")
    set_value(present, "here")
    absent = [unique_key("absent") for _ in range(5)]
    counters = calls_of(monkeypatch, redis_store, "version_counters")
    stores = calls_of(monkeypatch, redis_store, "remember_absent")
    body = {"keys": [present, *absent, absent[0]]}
    with entry_queries() as first:
        got = client.post("/v1/cache/batch/get", body, content_type="application/json").json()
    assert set(got["entries"]) == {present} and got["missing"] == absent
    assert first() == len(absent)
    assert counters == [absent] and [[key for key, _ in call] for call in stores] == [absent]
    for key in absent:
        assert redis_client.hgetall(entry_key(key)) == NEGATIVE
    # the next batch is answered by Redis alone, every key a hit
    with entry_queries() as again:
        found, missing, hits = services.cache_entries_get_many(keys=[present, *absent])
    assert again() == 0 and set(found) == {present} and missing == absent and hits == 1 + len(absent)
    # a write of one of them replaces its negative entry at once
    set_value(absent[2], "now")
    got = client.post("/v1/cache/batch/get", {"keys": absent}, content_type="application/json").json()
    assert set(got["entries"]) == {absent[2]} and got["missing"] == [k for k in absent if k != absent[2]]


# --- (6) delete and expiry are as before ------------------------------------------------------------


def test_a_deleted_key_keeps_its_tombstone(client: Client, redis_client) -> None:
    key = unique_key("deleted")
    assert client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json").status_code == 201
    assert client.delete(f"/v1/cache/{key}").status_code == 204
    with entry_queries() as queries:
        assert client.get(f"/v1/cache/{key}").status_code == 404
    assert queries() == 0
    held = redis_client.hgetall(entry_key(key))
    assert held == {b"v": b"2", b"t": b"1"}, "the delete's tombstone, not a negative entry"
    assert redis_client.pttl(entry_key(key)) > 30_000  # TOMBSTONE_RETENTION, not NEGATIVE_CACHE_TTL
    again = client.post(f"/v1/cache/{key}", {"value": 2}, content_type="application/json")
    assert again.status_code == 201 and again.json()["version"] == 3


def test_an_expired_entry_reads_as_absent_and_a_new_write_is_read_at_once(client: Client, redis_client) -> None:
    key = unique_key("expiring")
    assert client.post(f"/v1/cache/{key}", {"value": 1, "ttl": 1}, content_type="application/json").status_code == 201
    wait_for(lambda: not redis_client.exists(entry_key(key)), timeout=5, message="the entry expired in Redis")
    assert client.get(f"/v1/cache/{key}").status_code == 404
    assert redis_client.hgetall(entry_key(key)) == NEGATIVE
    written = client.post(f"/v1/cache/{key}", {"value": 2}, content_type="application/json")
    assert written.status_code == 201 and written.json()["version"] == 2
    assert client.get(f"/v1/cache/{key}").json()["value"] == 2


def test_a_negative_entry_expires_after_its_ttl(client: Client, settings, redis_client) -> None:
    settings.BIRB = replace(settings.BIRB, negative_cache_ttl=0.3)
    key = unique_key("short")
    with entry_queries() as queries:
        assert client.get(f"/v1/cache/{key}").status_code == 404
        assert 0 < redis_client.pttl(entry_key(key)) <= 300
        assert client.get(f"/v1/cache/{key}").status_code == 404
        assert queries() == 1
        wait_for(lambda: not redis_client.exists(entry_key(key)), timeout=5, message="the negative entry expired")
        assert client.get(f"/v1/cache/{key}").status_code == 404
        assert queries() == 2, "then PostgreSQL is asked again"


# --- Redis Cluster ------------------------------------------------------------------------------


@pytest.mark.cluster
def test_on_a_redis_cluster_negative_entries_live_in_their_keys_slot(redis_cluster) -> None:
    redis_cluster.wait_healthy()
    old = django_settings.BIRB
    prefix = f"neg{unique_key('')[1:7]}:"
    django_settings.BIRB = replace(old, redis_cluster=True, redis_url=redis_cluster.url, redis_key_prefix=prefix)
    try:
        cluster = redis_store.cluster_client()
        keys = [unique_key("absent") for _ in range(30)]
        # single reads and a batch, over keys on every master
        for key in keys[:10]:
            assert services.cache_entry_get(key=key) is None
        found, missing, hits = services.cache_entries_get_many(keys=keys)
        assert found == {} and missing == keys and hits == 10
        masters = set()
        for key in keys:
            assert cluster.hgetall(entry_key(key)) == NEGATIVE, key
            assert int(cluster.cluster_keyslot(entry_key(key))) == key_slot(key)
            assert int(cluster.cluster_keyslot(version_key(key))) == key_slot(key)
            masters.add(redis_cluster.master_of_slot(key_slot(key)))
        assert masters == set(redis_cluster.master_ports())
        # a write replaces it; the guard holds on the cluster too
        entry = set_value(keys[0], "written")
        assert services.cache_entry_get(key=keys[0]) == entry
        cluster.delete(entry_key(keys[0]))
        assert redis_store.remember_absent([(keys[0], None)], ttl_ms=10_000) == [False]
        assert redis_store.remember_absent([(keys[1], None)], ttl_ms=10_000) == [False]  # a hash is there
        assert redis_store.namespace_flush() > 0
    finally:
        django_settings.BIRB = old


def test_a_first_write_not_cached_replaces_the_negative_entry_once_persisted(worker, monkeypatch) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    # given an absent key remembered as absent
    key = unique_key("first-uncached")
    assert services.cache_entry_get(key=key) is None
    # when its first write is made durable but Redis refuses to store it
    store_written = redis_store.store_written

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("refused for the test")

    monkeypatch.setattr(redis_store, "store_written", refused)
    result = services.cache_entry_set(key=key, value_json=b'"first"', ttl=None)
    monkeypatch.setattr(redis_store, "store_written", store_written)
    assert result.entry.version == 1
    # then once the worker has persisted it, the negative entry no longer hides it
    wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), timeout=20, message="the write persisted")
    wait_for(lambda: services.cache_entry_get(key=key) is not None, timeout=5, message="the write to be readable")
