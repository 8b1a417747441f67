"""`GET /v1/cache?prefix=&cursor=&limit=` (issue #12, part A): live keys from PostgreSQL in byte
order, a stable cursor, read-your-writes through the worker, on the session's real servers."""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from django.db import connection
from django.test import Client

from persistence import selectors
from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.content[:300])
    body = orjson.loads(response.content)
    assert set(body) == {"error", "code", "details"} and body["code"] == code, body
    return body


def _list(client: Client, **params: Any) -> Any:
    headers = params.pop("headers", {})
    return client.get("/v1/cache" + (f"?{urlencode(params)}" if params else ""), **headers)


def _page(client: Client, **params: Any) -> dict[str, Any]:
    response = _list(client, **params)
    assert response.status_code == 200, response.content[:300]
    body = response.json()
    assert set(body) == {"keys", "next_cursor"}
    return body


def _all(client: Client, prefix: str, limit: int) -> list[str]:
    keys: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"prefix": prefix, "limit": limit}
        if cursor:
            params["cursor"] = cursor
        page = _page(client, **params)
        keys += page["keys"]
        cursor = page["next_cursor"]
        if cursor is None:
            return keys


@pytest.fixture
def ready_worker(worker: Any) -> Any:
    """A worker that has created its consumer (before that, the backlog's state is unknown)."""
    return worker.wait_ready()


def _write(client: Client, key: str, **body: Any) -> None:
    response = client.put(f"/v1/cache/{key}", {"value": 1, **body}, content_type="application/json")
    assert response.status_code in (200, 201), response.content


def test_listing_right_after_writing_has_every_key_in_byte_order(client: Client, ready_worker) -> None:
    # given keys written just now, some whose order differs between byte order and a locale's
    prefix = unique_key("ls") + ":"
    suffixes = ["b", "B", "a", "_x", "-y", ".z", "0", "Z:1", "a.b", "a-b", "aa", "zz"]
    for suffix in suffixes:
        _write(client, prefix + suffix)
    # when listing at once (no wait in the test: the API waits for the worker)
    page = _page(client, prefix=prefix)
    # then
    assert page["keys"] == sorted(prefix + s for s in suffixes)  # Python sorts str by code point = bytes here
    assert page["next_cursor"] is None


def test_pagination_over_several_pages_is_stable_while_keys_are_inserted(client: Client, ready_worker) -> None:
    prefix = unique_key("pg") + ":"
    for i in range(0, 24, 2):
        _write(client, f"{prefix}{i:03d}")
    first = _page(client, prefix=prefix, limit=5)
    assert first["keys"] == [f"{prefix}{i:03d}" for i in range(0, 10, 2)]
    assert first["next_cursor"]
    # keys inserted before and after the cursor while the client pages
    _write(client, f"{prefix}001")
    _write(client, f"{prefix}011")
    _write(client, f"{prefix}099")
    second = _page(client, prefix=prefix, limit=5, cursor=first["next_cursor"])
    assert second["keys"] == [f"{prefix}{i:03d}" for i in (10, 11, 12, 14, 16)]
    rest = _page(client, prefix=prefix, limit=5, cursor=second["next_cursor"])
    assert rest["keys"] == [f"{prefix}{i:03d}" for i in (18, 20, 22, 99)]
    assert rest["next_cursor"] is None
    # the same cursor gives the same page again
    assert _page(client, prefix=prefix, limit=5, cursor=first["next_cursor"]) == second
    # an exact multiple of the limit ends with next_cursor null, not an empty page after
    assert len(_all(client, prefix, 3)) == 15
    exact = _page(client, prefix=prefix, limit=15)
    assert len(exact["keys"]) == 15 and exact["next_cursor"] is None


def test_prefix_filters_and_expired_and_deleted_keys_are_left_out(client: Client, ready_worker) -> None:
    base = unique_key("flt")
    keys = [f"{base}:a", f"{base}:b", f"{base}:c", f"{base}x", f"{base}", f"{base}:a:1"]
    for key in keys:
        _write(client, key)
    _write(client, f"{base}:expiring", ttl=1)
    assert client.delete(f"/v1/cache/{base}:b").status_code == 204
    wait_for(lambda: CacheEntry.objects.filter(key=f"{base}:b", deleted=True).exists(), message="tombstone row")
    time.sleep(1.1)
    assert _all(client, f"{base}:", 2) == [f"{base}:a", f"{base}:a:1", f"{base}:c"]
    assert _page(client, prefix=base)["keys"] == sorted(
        [f"{base}", f"{base}:a", f"{base}:a:1", f"{base}:c", f"{base}x"]
    )
    assert _page(client, prefix=f"{base}:a")["keys"] == [f"{base}:a", f"{base}:a:1"]
    assert _page(client, prefix=f"{base}:zzz")["keys"] == []
    # the whole table: the test's keys among whatever else is there, in order
    everything = _all(client, "", 1000)
    assert everything == sorted(everything) and f"{base}:c" in everything and f"{base}:b" not in everything


def test_limit_prefix_and_cursor_are_checked(client: Client) -> None:
    for limit in ("0", "1001", "-1", "abc", "1.5", "", "\uff11"):
        body = _error(_list(client, limit=limit), 400, "INVALID_REQUEST")
        assert body["details"]["field"] == "limit", limit
    for prefix in ("a b", "a/b", "é", "x" * 256):
        assert _error(_list(client, prefix=prefix), 400, "INVALID_REQUEST")["details"]["field"] == "prefix"
    bad_key = base64.urlsafe_b64encode(b"not a key").decode().rstrip("=")
    for cursor in ("!!!", "a", bad_key, "", "YQ==x", base64.urlsafe_b64encode(b"\xff").decode()):
        assert _error(_list(client, cursor=cursor), 400, "INVALID_REQUEST")["details"]["field"] == "cursor", cursor
    _error(_list(client, other="1"), 400, "INVALID_REQUEST")


def test_limit_bounds_are_served(client: Client, ready_worker) -> None:
    assert _list(client, limit=1).status_code == 200
    assert _list(client, limit=1000).status_code == 200
    assert _list(client).status_code == 200


def test_a_backlog_that_does_not_drain_answers_503(client: Client, ready_worker) -> None:
    ready_worker.stop()
    _write(client, unique_key("stuck"))
    started = time.monotonic()
    response = _list(client)
    body = _error(response, 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["reason"] == "persist_backlog" and response["Retry-After"]
    assert time.monotonic() - started < 15


def test_listing_needs_read_and_a_prefix_inside_the_keys_prefixes(
    client: Client, make_api_key: Any, ready_worker: Any
) -> None:
    writer = make_api_key(scopes=["write"])
    confined = make_api_key(scopes=["read"], key_prefixes=["team-a:", "tmp."])
    _error(_list(client, headers={"HTTP_AUTHORIZATION": f"Bearer {writer}"}), 403, "FORBIDDEN")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {confined}"}
    for prefix in ("", "team-", "team-b:", "tmp"):
        details = _error(_list(client, prefix=prefix, headers=auth), 403, "FORBIDDEN")["details"]
        assert details["missing"] == "key_prefix" and details["key_prefixes"] == ["team-a:", "tmp."]
    for prefix in ("team-a:", "team-a:x", "tmp."):
        assert _list(client, prefix=prefix, headers=auth).status_code == 200, prefix


def test_the_listing_query_uses_the_byte_order_index() -> None:
    table = connection.ops.quote_name(CacheEntry._meta.db_table)
    sql = selectors._LIST_SQL.format(
        table=table, bounds='key COLLATE "C" > %s AND key COLLATE "C" >= %s AND key COLLATE "C" < %s'
    )
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a near-empty test table: ask what the plan can use
        cursor.execute("EXPLAIN " + sql, ["", "ab", "ac", 10])
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("RESET enable_seqscan")
    assert "cache_entries_key_c_idx" in plan, plan
    assert "Sort" not in plan, plan
