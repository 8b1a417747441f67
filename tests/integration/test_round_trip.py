"""Write -> read -> PostgreSQL, through a real worker, on real servers."""

from __future__ import annotations

import time

import pytest
from django.test import Client

from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def persisted(key: str, version: int) -> CacheEntry | None:
    return CacheEntry.objects.filter(key=key, version__gte=version).first()


def test_post_then_get_returns_the_same_entry_and_the_worker_persists_it(client: Client, worker) -> None:
    # given
    key = unique_key()
    # when
    before = time.time()
    created = client.post(
        f"/v1/cache/{key}",
        {"value": {"n": 1, "s": "é"}, "ttl": 300, "metadata": {"by": "t"}},
        content_type="application/json",
    )
    after = time.time()
    read = client.get(f"/v1/cache/{key}")
    # then
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["key"] == key and body["value"] == {"n": 1, "s": "é"} and body["version"] == 1
    assert body["metadata"] == {"by": "t"}
    assert 299 <= body["ttl"] <= 300
    assert read.status_code == 200
    assert read.json()["value"] == body["value"] and read.json()["version"] == 1
    assert 298 <= read.json()["ttl"] <= 300
    row = wait_for(lambda: persisted(key, 1), message="row in PostgreSQL")
    assert row.value == {"n": 1, "s": "é"} and row.version == 1 and row.metadata == {"by": "t"}
    # the expiry was fixed when the write was made (the worker may take seconds on a busy machine)
    assert row.expires_at is not None and before + 299 <= row.expires_at.timestamp() <= after + 300


def test_replace_answers_200_with_the_next_version(client: Client, worker) -> None:
    key = unique_key()
    first = client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json")
    second = client.put(f"/v1/cache/{key}", {"value": 2}, content_type="application/json")
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["version"] == 2
    assert second.json()["created_at"] == first.json()["created_at"]
    assert second.json()["ttl"] is None
    row = wait_for(lambda: persisted(key, 2))
    assert row.value == 2
