"""Numbers beyond 64-bit integers, -0.0, exponents and key order, after Redis lost the entry.

Issue 8, item 2: ``{"value": 1e20}`` was accepted, but PostgreSQL's ``jsonb`` rewrote it
(``100000000000000000000``) and the read-through could not encode that integer again, so GET,
DELETE and batch get of the key answered 500 for ever, and ``rehydrate --all`` stopped at it.
The rule now: the stored text is the compact JSON the API produced at write time (orjson's
encoding of the decoded body), and Redis, PostgreSQL and every read path give that same text.

Issue 8, item 8: replacing a key that PostgreSQL has but Redis lost answered 201, not 200.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import httpx
import orjson
import pytest
from django.core.management import call_command
from django.db import connection

from persistence import redis_store
from persistence.keys import entry_key
from persistence.models import CacheEntry
from persistence.redis_store import StoredEntry
from tests.conftest import manage, service_env, unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

JSON = {"Content-Type": "application/json"}

# Literals as a client writes them (2**70 written out as an integer literal).
LITERALS = {
    "1e20": b"1e20",
    "2**70": b"1180591620717411303424",
    "1e308": b"1e308",
    "1.5e300": b"1.5e300",
    "-0.0": b"-0.0",
    "1e19": b"1e19",
    "key-order": b'{"b":1,"a":2}',
    "nested": (
        b'{"z":[1e20,-0.0,{"y":1180591620717411303424,"x":1e19}],"b":{"d":1.5e300,"c":1e308},'
        b'"a":{"b":1,"a":2},"n":-9223372036854775808,"u":18446744073709551615}'
    ),
}

# The entry body is rendered in a fixed order (StoredEntry.to_json), the value and the metadata
# as the JSON text they are stored as: compare those bytes, not what a decoder makes of them.
ENTRY = re.compile(
    rb'"value":(?P<value>.*),"version":\d+,"ttl":(?:null|\d+),"metadata":(?P<metadata>.*),"created_at":"'
)


def fragments(body: bytes) -> tuple[bytes, bytes]:
    """The value's and the metadata's JSON text in an answer holding one entry."""
    match = ENTRY.search(body)
    assert match is not None, body[:500]
    return match["value"], match["metadata"]


def persisted(key: str, version: int) -> bool:
    return CacheEntry.objects.filter(key=key, version=version).exists()


def text_in_postgresql(key: str) -> tuple[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT value::text, metadata::text FROM cache_entries WHERE key = %s", [key])
        return cursor.fetchone()


def evict(redis_client: Any, key: str) -> None:
    """Drop the entry's hash (the version counter stays), as an operator's eviction does."""
    redis_client.delete(entry_key(key))
    assert redis_store.read(key) is None


@pytest.mark.parametrize("literal", LITERALS.values(), ids=LITERALS.keys())
def test_a_value_reads_back_as_the_same_json_text_from_redis_and_from_postgresql(
    api: Any, worker: Any, redis_client: Any, literal: bytes
) -> None:
    # given a write the API accepted, with the literal in the value and in the metadata
    key = unique_key("num")
    body = b'{"value":' + literal + b',"metadata":{"z":' + literal + b',"a":0}}'
    created = httpx.post(f"{api.url}/v1/cache/{key}", content=body, headers=JSON, timeout=10)
    assert created.status_code == 201, created.content
    first = httpx.get(f"{api.url}/v1/cache/{key}", timeout=10)
    assert first.status_code == 200, first.content
    value, metadata = fragments(first.content)
    # the stored text is orjson's compact encoding of what the client sent (README: numbers)
    assert value == orjson.dumps(orjson.loads(literal))
    assert metadata == b'{"z":' + value + b',"a":0}'
    wait_for(lambda: persisted(key, 1), message=f"{key} persisted")

    # when Redis no longer has the entry, then a GET reads PostgreSQL and answers the same text
    evict(redis_client, key)
    again = httpx.get(f"{api.url}/v1/cache/{key}", timeout=10)
    assert again.status_code == 200, again.content
    assert fragments(again.content) == (value, metadata)
    # which is exactly the text PostgreSQL keeps (a json column, not jsonb)
    assert text_in_postgresql(key) == (value.decode(), metadata.decode())
    restored = redis_store.read(key)
    assert isinstance(restored, StoredEntry) and (restored.value_json, restored.metadata_json) == (value, metadata)

    # a batch get that includes it
    evict(redis_client, key)
    batch = httpx.post(f"{api.url}/v1/cache/batch/get", json={"keys": [key]}, timeout=10)
    assert batch.status_code == 200, batch.content
    assert orjson.loads(batch.content)["missing"] == []
    assert fragments(batch.content) == (value, metadata)

    # rehydration
    evict(redis_client, key)
    call_command("rehydrate", "--all", "--no-progress")
    restored = redis_store.read(key)
    assert isinstance(restored, StoredEntry) and (restored.value_json, restored.metadata_json) == (value, metadata)

    # and a delete
    evict(redis_client, key)
    deleted = httpx.delete(f"{api.url}/v1/cache/{key}", timeout=10)
    assert deleted.status_code == 204, deleted.content
    assert httpx.get(f"{api.url}/v1/cache/{key}", timeout=10).status_code == 404
    # (the tombstone reaches PostgreSQL too; waiting for it leaves the next test no backlog)
    wait_for(lambda: CacheEntry.objects.filter(key=key, version=2, deleted=True).exists(), message="tombstone")


def _insert(key: str, *, value: str = '{"n":1e20}', expires_at: str = "NULL") -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO cache_entries (key, value, version, metadata, expires_at, deleted, created_at, updated_at) "
            f'VALUES (%s, %s, 4, \'{{"by":"hand"}}\', {expires_at}, false, now(), now())',
            [key, value],
        )


def test_a_row_that_cannot_be_loaded_is_reported_and_the_others_are_rehydrated(flush_redis: Any) -> None:
    # given good rows, and between them rows an operator inserted by hand that cannot be loaded:
    # a key the API would refuse, and an expiry psycopg cannot represent ('infinity')
    run = unique_key("")
    good = [f"a{run}:{n}" for n in range(3)] + [f"d{run}:{n}" for n in range(3)]
    for key in good:
        _insert(key)
    bad_key = f"b{run} with spaces"
    forever = f"c{run}:forever"
    _insert(bad_key)
    _insert(forever, expires_at="'infinity'")
    flush_redis()

    # when the whole table is rehydrated by the command, as an operator runs it
    done = manage(
        "rehydrate", "--all", "--no-progress", env=service_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = (stream.decode() for stream in done.communicate(timeout=60))

    # then the good rows are in Redis, each bad one is listed with its reason, and it exits 1
    assert done.returncode == 1, (out, err)
    for key in good:
        entry = redis_store.read(key)
        assert isinstance(entry, StoredEntry) and entry.value_json == b'{"n":1e20}', key
    report = out + err
    assert "rehydrated 6 entries" in report, report
    assert f"{bad_key}: " in report and "not a valid key" in report, report
    assert f"{forever}: " in report and "infinity" in report, report
    assert "2 entries could not be loaded" in report, report
    assert "Traceback" not in report, report


def test_replacing_a_key_that_postgresql_has_after_redis_lost_everything_answers_200(
    api: Any, worker: Any, flush_redis: Any
) -> None:
    # given a key the worker persisted
    key = unique_key("replace")
    first = httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 1}, timeout=10)
    assert first.status_code == 201, first.content
    wait_for(lambda: persisted(key, 1), message=f"{key} persisted")
    # when Redis loses everything (FLUSHALL) and the key is written again
    flush_redis()
    second = httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 2}, timeout=10)
    # then it is a replacement
    assert second.status_code == 200, second.content
    assert orjson.loads(second.content)["version"] == 2
    wait_for(lambda: persisted(key, 2), message=f"{key} v2 persisted")


def test_replacing_a_key_whose_redis_copy_was_evicted_answers_200(api: Any, worker: Any, redis_client: Any) -> None:
    key = unique_key("replace")
    assert httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 1}, timeout=10).status_code == 201
    wait_for(lambda: persisted(key, 1), message=f"{key} persisted")
    # the hash is evicted, the version counter stays
    evict(redis_client, key)
    second = httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 2}, timeout=10)
    assert second.status_code == 200, second.content
    assert orjson.loads(second.content)["version"] == 2
    wait_for(lambda: persisted(key, 2), message=f"{key} v2 persisted")


def test_a_key_written_again_after_a_delete_is_created_again(api: Any, worker: Any) -> None:
    # given a key persisted, then deleted (the worker may or may not have written the tombstone)
    key = unique_key("recreate")
    assert httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 1}, timeout=10).status_code == 201
    wait_for(lambda: persisted(key, 1), message=f"{key} persisted")
    assert httpx.delete(f"{api.url}/v1/cache/{key}", timeout=10).status_code == 204
    # when it is written again, then it is new: PostgreSQL's live row, if still there, is older
    again = httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 2}, timeout=10)
    assert again.status_code == 201, again.content
    assert orjson.loads(again.content)["version"] == 3
    wait_for(lambda: persisted(key, 3), message=f"{key} v3 persisted")
