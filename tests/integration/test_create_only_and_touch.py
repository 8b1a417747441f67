"""`If-None-Match: *` (create-only writes) and `POST /v1/cache/{key}/touch` (issue #12, part A), on
the session's real PostgreSQL, Redis and NATS, with a real worker where PostgreSQL matters."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
from django.test import Client

from persistence import redis_store
from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_ONLY = {"HTTP_IF_NONE_MATCH": "*"}


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.content[:300])
    body = orjson.loads(response.content)
    assert set(body) == {"error", "code", "details"} and body["code"] == code, body
    return body


def _write(client: Client, key: str, body: dict[str, Any], **headers: Any) -> Any:
    return client.put(f"/v1/cache/{key}", body, content_type="application/json", **headers)


def _persisted(key: str, version: int) -> CacheEntry | None:
    return CacheEntry.objects.filter(key=key, version__gte=version).first()


# --- If-None-Match: * ------------------------------------------------------------------------------


def test_create_only_creates_an_absent_key_and_is_refused_412_once_it_exists(client: Client) -> None:
    key = unique_key("create")
    created = _write(client, key, {"value": "first"}, **CREATE_ONLY)
    assert created.status_code == 201 and created.json()["version"] == 1
    refused = _write(client, key, {"value": "second"}, **CREATE_ONLY)
    body = _error(refused, 412, "PRECONDITION_FAILED")
    assert body["details"] == {"key": key, "current": 1}
    # nothing changed, and no version was consumed: the next plain write is version 2
    assert client.get(f"/v1/cache/{key}").json()["value"] == "first"
    assert client.post(f"/v1/cache/{key}", {"value": 3}, content_type="application/json").json()["version"] == 2


def test_create_only_after_a_delete_creates_the_key_again(client: Client) -> None:
    key = unique_key("recreate")
    assert _write(client, key, {"value": 1}).status_code == 201
    assert client.delete(f"/v1/cache/{key}").status_code == 204
    again = client.post(f"/v1/cache/{key}", {"value": 2}, content_type="application/json", **CREATE_ONLY)
    assert again.status_code == 201 and again.json()["version"] == 3


def test_create_only_on_an_expired_key_creates_it(client: Client) -> None:
    key = unique_key("expired")
    assert _write(client, key, {"value": 1, "ttl": 1}).status_code == 201
    time.sleep(1.2)
    assert _write(client, key, {"value": 2}, **CREATE_ONLY).status_code == 201


def test_twenty_concurrent_create_only_writers_exactly_one_wins(api) -> None:
    key = unique_key("race")

    def create(i: int) -> tuple[int, Any]:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            response = http.put(f"/v1/cache/{key}", json={"value": {"writer": i}}, headers={"If-None-Match": "*"})
            return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(create, range(20)))

    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [412] * 19, statuses
    winner = next(body for status, body in results if status == 201)
    for status, body in results:
        if status == 412:
            assert body["code"] == "PRECONDITION_FAILED" and body["details"]["key"] == key
    read = httpx.get(f"{api.url}/v1/cache/{key}").json()
    assert (read["version"], read["value"]) == (winner["version"], winner["value"]) == (1, winner["value"])


def test_create_only_on_a_key_redis_lost_but_postgresql_holds_is_412(client: Client, worker, flush_redis) -> None:
    # given a key the worker persisted, then Redis loses everything
    key = unique_key("lost")
    assert _write(client, key, {"value": "kept"}).status_code == 201
    wait_for(lambda: _persisted(key, 1), message="row in PostgreSQL")
    flush_redis()
    # when a create-only write comes
    refused = _write(client, key, {"value": "clobber"}, **CREATE_ONLY)
    # then it is refused and PostgreSQL's entry stands
    assert _error(refused, 412, "PRECONDITION_FAILED")["details"] == {"key": key, "current": 1}
    assert client.get(f"/v1/cache/{key}").json()["value"] == "kept"


def test_create_only_on_a_key_evicted_from_redis_is_412_and_on_a_deleted_row_is_201(
    client: Client, worker, flush_redis
) -> None:
    live, gone = unique_key("evicted"), unique_key("gone")
    assert _write(client, live, {"value": 1}).status_code == 201
    assert _write(client, gone, {"value": 1}).status_code == 201
    assert client.delete(f"/v1/cache/{gone}").status_code == 204
    wait_for(lambda: _persisted(live, 1) and _persisted(gone, 2), message="rows in PostgreSQL")
    redis_store.evict(live)  # the counter stays: only the entry is gone (maxmemory)
    redis_store.evict(gone)  # the tombstone is gone (its retention ran out)
    _error(_write(client, live, {"value": 2}, **CREATE_ONLY), 412, "PRECONDITION_FAILED")
    created = _write(client, gone, {"value": 2}, **CREATE_ONLY)
    assert created.status_code == 201 and created.json()["version"] == 3


def test_if_none_match_other_than_star_and_with_if_match_is_400(client: Client) -> None:
    key = unique_key("bad")
    for value in ('"1"', "1", "**", ""):
        body = _error(_write(client, key, {"value": 1}, HTTP_IF_NONE_MATCH=value), 400, "INVALID_REQUEST")
        assert body["details"] == {"header": "If-None-Match"}, value
    both = _write(client, key, {"value": 1}, HTTP_IF_NONE_MATCH="*", HTTP_IF_MATCH="1")
    _error(both, 400, "INVALID_REQUEST")
    assert client.get(f"/v1/cache/{key}").status_code == 404


def test_create_only_is_persisted_by_the_worker(client: Client, worker) -> None:
    key = unique_key("persist")
    assert _write(client, key, {"value": {"a": 1}}, **CREATE_ONLY).status_code == 201
    row = wait_for(lambda: _persisted(key, 1), message="row in PostgreSQL")
    assert row.value == {"a": 1}


# --- touch -----------------------------------------------------------------------------------------


def _touch(client: Client, key: str, body: Any, **headers: Any) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(f"/v1/cache/{key}/touch", raw, content_type="application/json", **headers)


def test_touch_sets_a_new_ttl_and_version_keeping_value_and_metadata_and_is_persisted(client: Client, worker) -> None:
    key = unique_key("touch")
    first = _write(client, key, {"value": {"n": 1e20}, "ttl": 60, "metadata": {"by": "t"}}).json()
    touched = _touch(client, key, {"ttl": 3600})
    assert touched.status_code == 200, touched.content
    body = touched.json()
    assert body["version"] == 2 and body["value"] == {"n": 1e20} and body["metadata"] == {"by": "t"}
    assert 3599 <= body["ttl"] <= 3600
    assert body["created_at"] == first["created_at"] and body["updated_at"] >= first["updated_at"]
    assert b'"n":1e+20' in touched.content  # the value's text, as written
    assert touched["ETag"] == '"2"'
    read = client.get(f"/v1/cache/{key}").json()
    assert read["version"] == 2 and 3598 <= read["ttl"] <= 3600
    row = wait_for(lambda: _persisted(key, 2), message="the touch in PostgreSQL")
    assert row.value == {"n": 1e20} and row.metadata == {"by": "t"}
    assert row.expires_at is not None and 3590 <= row.expires_at.timestamp() - time.time() <= 3600
    # ttl 0: never expires
    forever = _touch(client, key, {"ttl": 0}).json()
    assert forever["ttl"] is None and forever["version"] == 3
    assert wait_for(lambda: _persisted(key, 3), message="the second touch").expires_at is None


def test_touch_of_an_absent_deleted_or_expired_key_is_404(client: Client) -> None:
    absent, deleted, expired = unique_key("absent"), unique_key("deleted"), unique_key("expired")
    _write(client, deleted, {"value": 1})
    client.delete(f"/v1/cache/{deleted}")
    _write(client, expired, {"value": 1, "ttl": 1})
    time.sleep(1.2)
    for key in (absent, deleted, expired):
        assert _error(_touch(client, key, {"ttl": 10}), 404, "NOT_FOUND")["details"] == {"key": key}


def test_touch_honours_if_match(client: Client) -> None:
    key = unique_key("cas")
    _write(client, key, {"value": 1})
    _write(client, key, {"value": 2})
    stale = _error(_touch(client, key, {"ttl": 10}, HTTP_IF_MATCH="1"), 409, "VERSION_MISMATCH")
    assert stale["details"]["current_version"] == 2
    assert _touch(client, key, {"ttl": 10}, HTTP_IF_MATCH="2").json()["version"] == 3


def test_touch_of_a_key_only_postgresql_holds_reads_it_through(client: Client, worker, flush_redis) -> None:
    key = unique_key("cold")
    first = _write(client, key, {"value": "cold", "metadata": {"m": 1}}).json()
    wait_for(lambda: _persisted(key, 1), message="row in PostgreSQL")
    flush_redis()
    body = _touch(client, key, {"ttl": 100}).json()
    assert (body["value"], body["metadata"], body["version"]) == ("cold", {"m": 1}, 2)
    assert body["created_at"] == first["created_at"]


def test_touch_bodies_are_checked(client: Client) -> None:
    key = unique_key("badtouch")
    _write(client, key, {"value": 1})
    for body in (b"", b"[]", b"{}", {"ttl": -1}, {"ttl": "10"}, {"ttl": None}, {"ttl": 1.5}, {"ttl": 10, "x": 1}):
        _error(_touch(client, key, body), 400, "INVALID_REQUEST")
    _error(_touch(client, key, {"ttl": 10**12}), 400, "INVALID_REQUEST")
    assert client.get(f"/v1/cache/{key}").json()["version"] == 1
