"""`POST /v1/cache/batch/set` and `POST /v1/cache/batch/delete` (issue #12, part A), on the session's
real PostgreSQL, Redis and NATS, with a real worker where PostgreSQL matters."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from django.conf import settings
from django.test import Client

from persistence import redis_store
from persistence.keys import version_key
from persistence.models import CacheEntry
from persistence.redis_store import StoredEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.content[:300])
    body = orjson.loads(response.content)
    assert set(body) == {"error", "code", "details"} and body["code"] == code, body
    return body


def _post(client: Client, path: str, body: Any, **headers: Any) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(path, raw, content_type="application/json", **headers)


def batch_set(client: Client, entries: Any, **headers: Any) -> Any:
    return _post(client, "/v1/cache/batch/set", {"entries": entries}, **headers)


def batch_delete(client: Client, keys: Any, **headers: Any) -> Any:
    return _post(client, "/v1/cache/batch/delete", {"keys": keys}, **headers)


def _results(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.content[:500]
    body = response.json()
    assert set(body) == {"results"}
    return body["results"]


def test_batch_set_writes_every_entry_with_its_own_version_in_redis_and_postgresql(client: Client, worker) -> None:
    # given one key that exists and two that do not
    old, new1, new2 = unique_key("old"), unique_key("new"), unique_key("new")
    client.post(f"/v1/cache/{old}", {"value": 0}, content_type="application/json")
    client.post(f"/v1/cache/{old}", {"value": 0}, content_type="application/json")
    # when
    results = _results(
        batch_set(
            client,
            [
                {"key": new1, "value": {"n": 1e20}, "ttl": 300, "metadata": {"by": "batch"}},
                {"key": old, "value": [1, 2]},
                {"key": new2, "value": "two", "ttl": 0},
            ],
        )
    )
    # then: in request order
    assert results == [
        {"key": new1, "status": 201, "version": 1, "created": True},
        {"key": old, "status": 200, "version": 3, "created": False},
        {"key": new2, "status": 201, "version": 1, "created": True},
    ]
    cached = redis_store.read_many([new1, old, new2])
    assert all(isinstance(c, StoredEntry) for c in cached)
    first = cached[0]
    assert isinstance(first, StoredEntry)
    assert first.value_json == b'{"n":1e+20}' and first.metadata_json == b'{"by":"batch"}'
    assert 295 <= (first.ttl() or 0) <= 300 and cached[2].ttl() is None  # type: ignore[union-attr]
    read = client.get(f"/v1/cache/{old}").json()
    assert (read["value"], read["version"]) == ([1, 2], 3)
    # and the worker persists them at the versions answered
    for key, version in ((new1, 1), (old, 3), (new2, 1)):
        wait_for(lambda key=key, version=version: CacheEntry.objects.filter(key=key, version=version).exists())
    rows = {row.key: row for row in CacheEntry.objects.filter(key__in=[new1, old, new2])}
    assert rows[new1].value == {"n": 1e20} and rows[new1].metadata == {"by": "batch"}
    assert rows[new1].expires_at is not None and rows[new2].expires_at is None
    assert rows[old].value == [1, 2]


def test_batch_set_answers_each_conditional_entry_on_its_own(client: Client) -> None:
    taken, stale, fresh, ok = (unique_key(n) for n in ("taken", "stale", "fresh", "ok"))
    for key in (taken, stale, ok):
        client.post(f"/v1/cache/{key}", {"value": "before"}, content_type="application/json")
    results = _results(
        batch_set(
            client,
            [
                {"key": taken, "value": "x", "if_none_match": "*"},
                {"key": stale, "value": "x", "if_match": 7},
                {"key": fresh, "value": "x", "if_none_match": "*"},
                {"key": ok, "value": "x", "if_match": 1},
            ],
        )
    )
    assert results[0] == {
        "key": taken,
        "status": 412,
        "code": "PRECONDITION_FAILED",
        "error": results[0]["error"],
        "details": {"key": taken, "current": 1},
    }
    assert results[1]["status"] == 409 and results[1]["code"] == "VERSION_MISMATCH"
    assert results[1]["details"] == {"key": stale, "expected_version": 7, "current_version": 1}
    assert results[2] == {"key": fresh, "status": 201, "version": 1, "created": True}
    assert results[3] == {"key": ok, "status": 200, "version": 2, "created": False}
    # the refused ones changed nothing and consumed no version
    for key in (taken, stale):
        assert client.get(f"/v1/cache/{key}").json()["value"] == "before"
        assert int(redis_store.client().get(version_key(key))) == 1


@pytest.mark.parametrize(
    ("bad_entry", "message"),
    [
        ({"key": "bad key", "value": 1}, "invalid key"),
        ({"key": "ok", "value": 1, "ttl": -1}, "ttl"),
        ({"key": "ok", "value": 1, "ttl": None}, "ttl"),
        ({"key": "ok", "value": 1, "metadata": [1]}, "metadata"),
        ({"key": "ok"}, "value"),
        ({"key": "ok", "value": 1, "if_match": "1"}, "if_match"),
        ({"key": "ok", "value": 1, "if_none_match": "x"}, "if_none_match"),
        ({"key": "ok", "value": 1, "if_none_match": "*", "if_match": 1}, "if_match"),
        ({"key": "ok", "value": 1, "extra": 1}, "unknown field"),
        ({"value": 1}, "key"),
        ([1], "object"),
    ],
)
def test_an_invalid_entry_refuses_the_whole_batch_naming_it(client: Client, bad_entry: Any, message: str) -> None:
    first = unique_key("first")
    if isinstance(bad_entry, dict) and bad_entry.get("key") == "ok":
        bad_entry = {**bad_entry, "key": unique_key("ok")}
    body = _error(batch_set(client, [{"key": first, "value": 1}, bad_entry]), 400, "INVALID_REQUEST")
    assert body["details"]["index"] == 1, body
    assert body["details"]["key"] == (bad_entry.get("key") if isinstance(bad_entry, dict) else None)
    assert message in body["error"] and body["error"].startswith("entries[1]"), body["error"]
    assert client.get(f"/v1/cache/{first}").status_code == 404, "nothing written"


def test_a_duplicate_key_too_many_entries_or_a_big_value_refuse_the_whole_batch(client: Client) -> None:
    key, other = unique_key("dup"), unique_key("other")
    dup = _error(
        batch_set(client, [{"key": other, "value": 1}, {"key": key, "value": 1}, {"key": key, "value": 2}]),
        400,
        "INVALID_REQUEST",
    )
    assert (dup["details"]["index"], dup["details"]["key"]) == (2, key)
    limit = settings.BIRB.max_batch_keys
    many = [{"key": f"{key}-{i}", "value": i} for i in range(limit + 1)]
    assert _error(batch_set(client, many), 400, "INVALID_REQUEST")["details"] == {"count": limit + 1, "max": limit}
    _error(batch_set(client, []), 400, "INVALID_REQUEST")
    for body in (b"", b"[]", b'{"entries": {}}', b'{"entries": [], "x": 1}', b"{"):
        _error(_post(client, "/v1/cache/batch/set", body), 400, "INVALID_REQUEST")
    big = "x" * settings.BIRB.max_value_size
    too_large = _error(
        batch_set(client, [{"key": other, "value": 1}, {"key": key, "value": big}]), 413, "PAYLOAD_TOO_LARGE"
    )
    assert (too_large["details"]["index"], too_large["details"]["key"]) == (1, key)
    assert redis_store.read_many([key, other]) == [None, None], "nothing written"
    assert redis_store.read_many([f"{key}-{i}" for i in range(limit + 1)]) == [None] * (limit + 1)


def test_batch_set_of_keys_redis_lost_answers_200_for_those_postgresql_holds(
    client: Client, worker, flush_redis
) -> None:
    kept, new = unique_key("kept"), unique_key("new")
    client.post(f"/v1/cache/{kept}", {"value": 1}, content_type="application/json")
    wait_for(lambda: CacheEntry.objects.filter(key=kept, version=1).exists())
    flush_redis()
    results = _results(batch_set(client, [{"key": kept, "value": 2}, {"key": new, "value": 2}]))
    assert results == [
        {"key": kept, "status": 200, "version": 2, "created": False},
        {"key": new, "status": 201, "version": 1, "created": True},
    ]


def test_batch_delete_answers_each_key_and_the_worker_keeps_tombstones(client: Client, worker) -> None:
    live1, live2, absent = unique_key("live"), unique_key("live"), unique_key("absent")
    client.post(f"/v1/cache/{live1}", {"value": 1}, content_type="application/json")
    client.post(f"/v1/cache/{live2}", {"value": 1}, content_type="application/json")
    client.post(f"/v1/cache/{live2}", {"value": 2}, content_type="application/json")
    results = _results(batch_delete(client, [live1, absent, live2]))
    assert results[0] == {"key": live1, "status": 204, "deleted": True, "version": 2}
    assert results[1] == {
        "key": absent,
        "status": 404,
        "code": "NOT_FOUND",
        "error": results[1]["error"],
        "details": {"key": absent},
    }
    assert results[2] == {"key": live2, "status": 204, "deleted": True, "version": 3}
    for key in (live1, live2):
        assert client.get(f"/v1/cache/{key}").status_code == 404
    wait_for(lambda: CacheEntry.objects.filter(key__in=[live1, live2], deleted=True).count() == 2)
    # deleted again: 404 for each
    assert [r["status"] for r in _results(batch_delete(client, [live1, live2]))] == [404, 404]


def test_batch_delete_of_keys_only_postgresql_holds(client: Client, worker, flush_redis) -> None:
    key = unique_key("cold")
    client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json")
    wait_for(lambda: CacheEntry.objects.filter(key=key, version=1).exists())
    flush_redis()
    assert _results(batch_delete(client, [key])) == [{"key": key, "status": 204, "deleted": True, "version": 2}]
    assert client.get(f"/v1/cache/{key}").status_code == 404


def test_batch_delete_refuses_invalid_or_duplicate_keys_whole(client: Client) -> None:
    key = unique_key("keep")
    client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json")
    dup = _error(batch_delete(client, [key, key]), 400, "INVALID_REQUEST")
    assert dup["details"] == {"index": 1, "key": key}
    bad = _error(batch_delete(client, [key, "no/slash"]), 400, "INVALID_REQUEST")
    assert bad["details"] == {"index": 1, "key": "no/slash"}
    _error(batch_delete(client, [key, 7]), 400, "INVALID_REQUEST")
    _error(batch_delete(client, []), 400, "INVALID_REQUEST")
    limit = settings.BIRB.max_batch_keys
    _error(batch_delete(client, [f"k{i}" for i in range(limit + 1)]), 400, "INVALID_REQUEST")
    assert client.get(f"/v1/cache/{key}").status_code == 200


def test_batch_writes_need_their_scopes_and_stay_inside_the_keys_prefixes(client: Client, make_api_key: Any) -> None:
    writer = make_api_key(scopes=["read", "write"])
    deleter = make_api_key(scopes=["delete"])
    confined = make_api_key(scopes=["read", "write", "delete"], key_prefixes=["team-a:"])
    inside, outside = f"team-a:{unique_key()}", f"team-b:{unique_key()}"
    auth = {"HTTP_AUTHORIZATION": f"Bearer {writer}"}
    assert _results(batch_set(client, [{"key": inside, "value": 1}, {"key": outside, "value": 1}], **auth))
    # batch delete needs "delete", not "write"
    refused = _error(batch_delete(client, [inside], **auth), 403, "FORBIDDEN")
    assert refused["details"]["scope"] == "delete"
    _error(batch_set(client, [{"key": inside, "value": 2}], HTTP_AUTHORIZATION=f"Bearer {deleter}"), 403, "FORBIDDEN")
    # a confined key: any key outside its prefixes refuses the whole batch
    as_confined = {"HTTP_AUTHORIZATION": f"Bearer {confined}"}
    refused = _error(
        batch_set(client, [{"key": inside, "value": 3}, {"key": outside, "value": 3}], **as_confined),
        403,
        "FORBIDDEN",
    )
    assert refused["details"]["keys"] == [outside]
    _error(batch_delete(client, [inside, outside], **as_confined), 403, "FORBIDDEN")
    read = client.post("/v1/cache/batch/get", {"keys": [inside, outside]}, content_type="application/json", **auth)
    assert {key: e["value"] for key, e in read.json()["entries"].items()} == {inside: 1, outside: 1}, "nothing changed"
    assert _results(batch_delete(client, [inside], **as_confined))[0]["status"] == 204


def test_with_nats_down_each_write_answers_503_and_nothing_is_visible(client: Client, servers: Any) -> None:
    if not servers.owns("nats"):
        pytest.skip("NATS is not this run's own server")
    existing, fresh = unique_key("existing"), unique_key("fresh")
    client.post(f"/v1/cache/{existing}", {"value": "before"}, content_type="application/json")
    servers.stop("nats")
    try:
        results = _results(
            batch_set(
                client,
                [{"key": existing, "value": "during"}, {"key": fresh, "value": "during", "if_none_match": "*"}],
            )
        )
        deleted = _results(batch_delete(client, [existing]))
    finally:
        servers.start("nats")
    for result in [*results, *deleted]:
        assert result["status"] == 503 and result["code"] == "SERVICE_UNAVAILABLE", result
        assert result["details"]["dependency"] == "nats"
    assert client.get(f"/v1/cache/{existing}").json()["value"] == "before"
    assert client.get(f"/v1/cache/{fresh}").status_code == 404
    # the failed create-only write gave its reservation back: the retry creates the key
    retry = wait_for(
        lambda: (r := batch_set(client, [{"key": fresh, "value": "after", "if_none_match": "*"}])).status_code == 200
        and r.json()["results"][0]["status"] != 503
        and r,
        message="a write once NATS is back",
    )
    assert _results(retry)[0]["status"] == 201


def test_a_batch_seeds_the_keys_redis_has_no_counter_for_with_one_query(client: Client, monkeypatch) -> None:
    from django.utils import timezone

    from persistence import selectors

    # given keys Redis has no counter for while it keeps every counter it assigned: two with rows
    # in PostgreSQL (one live at v7, one deleted at v4) and two that never existed
    now = timezone.now()
    live, deleted, new1, new2 = (unique_key(name) for name in ("live", "deleted", "new", "new"))
    CacheEntry.objects.create(key=live, value=1, version=7, metadata={}, created_at=now, updated_at=now)
    CacheEntry.objects.create(
        key=deleted, value=None, version=4, metadata={}, deleted=True, created_at=now, updated_at=now
    )
    redis_store.mark_counters_complete()
    one_by_one, together = [], []
    one, many = selectors.cache_entry_version_in_db, selectors.cache_entries_versions_in_db
    monkeypatch.setattr(selectors, "cache_entry_version_in_db", lambda **kw: one_by_one.append(kw) or one(**kw))
    monkeypatch.setattr(selectors, "cache_entries_versions_in_db", lambda **kw: together.append(kw) or many(**kw))
    # when one batch writes all four
    entries = [{"key": key, "value": 2} for key in (live, deleted, new1, new2)]
    results = _results(batch_set(client, entries))
    # then each version follows what PostgreSQL had, and PostgreSQL was asked once for all of them
    assert results == [
        {"key": live, "status": 200, "version": 8, "created": False},
        {"key": deleted, "status": 201, "version": 5, "created": True},
        {"key": new1, "status": 201, "version": 1, "created": True},
        {"key": new2, "status": 201, "version": 1, "created": True},
    ]
    assert one_by_one == []
    assert len(together) == 1 and sorted(together[0]["keys"]) == sorted([live, deleted, new1, new2])
