"""Decoding persist messages: what the worker accepts, and what it dead-letters as poison."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from persistence.messages import PersistWrite, PoisonMessageError, decode, encode

NOW = datetime(2026, 11, 30, 1, 2, 3, 456789, tzinfo=UTC)
LATER = datetime(2026, 12, 1, 0, 0, 0, 123000, tzinfo=UTC)  # expires_at travels in milliseconds


def _body(**changes: object) -> bytes:
    body = {
        "op": "set", "key": "k", "version": 2, "value": {"a": [1, "é"]}, "metadata": {"m": 1},
        "expires_at": 1_900_000_000_123, "created_at": "2026-11-30T01:02:03.456789Z",
        "updated_at": "2026-11-30T01:02:04Z",
    }  # fmt: skip
    body.update(changes)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def test_what_the_api_encodes_decodes_to_the_same_write() -> None:
    for write in (
        PersistWrite("set", "a:b.c-d_e", 7, '{"x":[1,2]}', '{"tag":"t"}', LATER, NOW, NOW),
        PersistWrite("set", "k", 1, "null", "{}", None, NOW, NOW),
        PersistWrite("delete", "k", 3, None, "{}", None, NOW, NOW),
    ):
        assert decode(encode(write)) == write


def test_each_field_is_read() -> None:
    write = decode(_body())
    assert (write.op, write.key, write.version) == ("set", "k", 2)
    assert (write.value_json, write.metadata_json) == ('{"a":[1,"é"]}', '{"m":1}')
    assert write.expires_at == datetime(2030, 3, 17, 17, 46, 40, 123000, tzinfo=UTC)
    assert write.created_at == NOW
    assert write.updated_at == datetime(2026, 11, 30, 1, 2, 4, tzinfo=UTC)


def test_metadata_that_is_missing_or_not_an_object_is_empty() -> None:
    assert decode(_body(metadata=...)).metadata_json == "{}"
    assert decode(_body(metadata=[1])).metadata_json == "{}"


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        (b"not json", "undecodable", "payload is not JSON"),
        (b"[1]", "undecodable", "not a JSON object"),
        (_body(op="put"), "invalid_field", "op is 'put'"),
        (_body(key="bad key"), "invalid_field", "key 'bad key' is not a valid key"),
        (_body(version=0), "invalid_field", "version 0 is not a positive integer"),
        (_body(version=True), "invalid_field", "version True"),
        (_body(expires_at="soon"), "invalid_field", "expires_at 'soon' is not epoch milliseconds"),
        (_body(expires_at=10**18), "invalid_field", "expires_at 1000000000000000000 is out of range"),
        (_body(value=...), "invalid_field", "a set has no value"),
        (_body(created_at=5), "invalid_field", "created_at is not a timestamp"),
        (_body(updated_at="yesterday"), "invalid_field", "updated_at is not a timestamp: 'yesterday'"),
    ],
)
def test_a_message_that_can_never_be_written_is_poison(payload: bytes, reason: str, detail: str) -> None:
    with pytest.raises(PoisonMessageError) as caught:
        decode(payload)
    assert caught.value.reason == reason
    assert detail in caught.value.detail
