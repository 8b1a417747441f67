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


def _canonical(value: bytes, metadata: bytes = b'{"m":1}') -> bytes:
    """A message in the layout ``encode`` writes, with the value's and metadata's text as given."""
    return (
        b'{"op":"set","key":"k","version":2,"value":' + value + b',"metadata":' + metadata + b',"expires_at":null,'
        b'"created_at":"2026-11-30T01:02:03.456789Z","updated_at":"2026-11-30T01:02:03.456789Z"}'
    )


@pytest.mark.parametrize(
    "value",
    [
        b"1e20",
        b"1180591620717411303424",
        b"-0.0",
        b"1e19",
        b"1.5e300",
        b'{"b":1,"a":2}',
        b'{"z":[1e20,-0.0],"metadata":{"m":1},"s":",\\"metadata\\":{}"}',
        b"[" * 300 + b"]" * 300,  # deeper than orjson encodes (254 levels), not deeper than it decodes
    ],
    ids=["1e20", "2**70", "-0.0", "1e19", "1.5e300", "key-order", "look-alike", "depth-300"],
)
def test_the_value_is_kept_as_the_text_the_message_carries(value: bytes) -> None:
    write = decode(_canonical(value))
    assert write.value_json == value.decode()
    assert write.metadata_json == '{"m":1}'
    assert encode(write) == _canonical(value), "re-encoding gives the same message"


def test_a_message_in_another_layout_gets_the_compact_encoding_of_its_value() -> None:
    # written by hand: other order, spaces; the value is stored as the API would have written it
    payload = (
        b'{"version": 2, "op": "set", "key": "k", "value": {"b": 1e20, "a": -0.0}, "metadata": {},'
        b' "created_at": "2026-11-30T01:02:03Z", "updated_at": "2026-11-30T01:02:03Z", "expires_at": null}'
    )
    assert decode(payload).value_json == '{"b":1e+20,"a":-0.0}'


def test_a_value_in_another_layout_that_cannot_be_encoded_again_is_poison() -> None:
    deep = b"[" * 300 + b"]" * 300
    stamps = b'"created_at": "2026-11-30T01:02:03Z", "updated_at": "2026-11-30T01:02:03Z"'
    payload = b'{"op": "set", "key": "k", "version": 2, "value": ' + deep + b", " + stamps + b"}"
    with pytest.raises(PoisonMessageError) as caught:
        decode(payload)
    assert caught.value.reason == "invalid_field"
    assert "value cannot be encoded again" in caught.value.detail
