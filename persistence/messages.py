"""The persist message: what the API publishes to ``cache.persist.<op>`` and the worker applies.

JSON: ``{"op": "set"|"delete", "key", "version", "value", "metadata", "expires_at" (epoch ms or
null), "created_at", "updated_at"}``; its ``Nats-Msg-Id`` is ``<key>:<version>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from persistence.keys import is_valid_key

OP_SET = "set"
OP_DELETE = "delete"
OPS = (OP_SET, OP_DELETE)


class PoisonMessageError(Exception):
    """A message that can never be written, however often it is retried."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class PersistWrite:
    """One write as the worker applies it to ``cache_entries``."""

    op: str
    key: str
    version: int
    value_json: str | None
    metadata_json: str
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime


def isoformat(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def encode(write: PersistWrite) -> bytes:
    body: dict[str, Any] = {"op": write.op, "key": write.key, "version": write.version}
    if write.op == "set":
        body["value"] = orjson.Fragment(write.value_json or "null")
        body["metadata"] = orjson.Fragment(write.metadata_json)
        body["expires_at"] = int(write.expires_at.timestamp() * 1000) if write.expires_at else None
    body["created_at"] = isoformat(write.created_at)
    body["updated_at"] = isoformat(write.updated_at)
    return orjson.dumps(body)


def message_id(write: PersistWrite) -> str:
    """Identifies this one write, so a retried publish is de-duplicated by JetStream."""
    return f"{write.key}:{write.version}"


def _timestamp(raw: Any, field: str) -> datetime:
    if not isinstance(raw, str):
        raise PoisonMessageError("invalid_field", f"{field} is not a timestamp")
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise PoisonMessageError("invalid_field", f"{field} is not a timestamp: {raw!r}") from None


def _encoded(value: Any, field: str) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as error:  # e.g. nested deeper than orjson encodes
        raise PoisonMessageError("invalid_field", f"{field} cannot be encoded again: {error}") from None


def _value_text(payload: bytes, body: dict[str, Any], metadata_json: bytes) -> str:
    """The value's JSON text exactly as the message carries it: never decoded and re-encoded.

    A message as :func:`encode` writes it has a fixed layout, and everything around the value is
    rebuilt from the decoded fields byte for byte (orjson writes its own output again unchanged):
    ``{"op":…,"key":…,"version":…,"value":`` before it, ``,"metadata":…,"expires_at":…,
    "created_at":…,"updated_at":…}`` after it. What lies between is the value. A message in
    another layout (written by hand, say) gets the value's compact orjson encoding: the text the
    API would have written for it.
    """
    head = orjson.dumps({"op": body["op"], "key": body["key"], "version": body["version"]})[:-1] + b',"value":'
    after = orjson.dumps(
        {
            "metadata": orjson.Fragment(metadata_json),
            "expires_at": body.get("expires_at"),
            "created_at": body.get("created_at"),
            "updated_at": body.get("updated_at"),
        }
    )
    tail = b"," + after[1:]
    if len(payload) > len(head) + len(tail) and payload.startswith(head) and payload.endswith(tail):
        return payload[len(head) : len(payload) - len(tail)].decode()
    return _encoded(body["value"], "value").decode()


def decode(payload: bytes) -> PersistWrite:
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise PoisonMessageError("undecodable", f"payload is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise PoisonMessageError("undecodable", "payload is not a JSON object")
    op = body.get("op")
    if op not in OPS:
        raise PoisonMessageError("invalid_field", f"op is {op!r}, expected one of {OPS}")
    key = body.get("key")
    if not isinstance(key, str) or not is_valid_key(key):
        raise PoisonMessageError("invalid_field", f"key {key!r} is not a valid key")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PoisonMessageError("invalid_field", f"version {version!r} is not a positive integer")
    expires = body.get("expires_at")
    if expires is None:
        expires_at = None
    elif not isinstance(expires, int) or isinstance(expires, bool):
        raise PoisonMessageError("invalid_field", f"expires_at {expires!r} is not epoch milliseconds")
    else:
        try:
            expires_at = datetime.fromtimestamp(expires / 1000, tz=UTC)
        except (OverflowError, ValueError, OSError):
            raise PoisonMessageError("invalid_field", f"expires_at {expires!r} is out of range") from None
    if op == OP_SET and "value" not in body:
        raise PoisonMessageError("invalid_field", "a set has no value")
    metadata = body.get("metadata")
    created_raw = body.get("created_at")
    created_at = _timestamp(created_raw, "created_at")
    updated_raw = body.get("updated_at")
    # The API stamps both with the same moment: parse it once.
    updated_at = created_at if updated_raw == created_raw else _timestamp(updated_raw, "updated_at")
    metadata_json = _encoded(metadata, "metadata") if isinstance(metadata, dict) and metadata else b"{}"
    return PersistWrite(
        op=op,
        key=key,
        version=version,
        value_json=_value_text(payload, body, metadata_json) if op == OP_SET else None,
        metadata_json=metadata_json.decode(),
        expires_at=expires_at,
        created_at=created_at,
        updated_at=updated_at,
    )


def latest_per_key(writes: list[PersistWrite]) -> list[PersistWrite]:
    """Keep only the highest version of each key (the others would be overwritten anyway)."""
    latest: dict[str, PersistWrite] = {}
    for write in writes:
        current = latest.get(write.key)
        if current is None or write.version > current.version:
            latest[write.key] = write
    return list(latest.values())


# Everything in a persist message besides the value, the metadata and the key (twice: in the body
# and in the Nats-Msg-Id header): field names, op, version, expiry, two timestamps, the header
# block. Generous: the exact size is checked again when the message is published.
ENVELOPE_BOUND = 512


def max_message_size(*, key: str, value_size: int, metadata_size: int) -> int:
    """The most bytes (payload + headers) the persist message of a set can take."""
    return value_size + metadata_size + 2 * len(key.encode()) + ENVELOPE_BOUND
