"""Input validation of the cache API (hand-written: it runs on every write)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from cache_api.errors import ApiError, invalid
from persistence.keys import KEY_RULE, is_valid_key

WRITE_FIELDS = ("value", "ttl", "metadata")
# An escaped U+0000 in orjson's output: "\u0000" not preceded by an escaped backslash.
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


@dataclass(frozen=True)
class WriteInput:
    value_json: bytes
    ttl: int | None
    metadata_json: bytes


def validate_key(key: str) -> str:
    if not is_valid_key(key):
        shown = key if len(key) <= 64 else key[:64] + "…"
        raise invalid(f"invalid key '{shown}': keys are {KEY_RULE}", {"key": shown, "length": len(key)})
    return key


def _json_body(raw: bytes) -> Any:
    if not raw:
        raise invalid("request body is empty: expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise invalid(f"request body is not valid JSON: {error}") from None


def parse_write(raw: bytes, *, max_value_size: int) -> WriteInput:
    body = _json_body(raw)
    if not isinstance(body, dict):
        raise invalid('request body must be a JSON object with a "value"')
    unknown = sorted(set(body) - set(WRITE_FIELDS) - {"key"})
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)}", {"allowed": list(WRITE_FIELDS)})
    if "value" not in body:
        raise invalid('missing field "value"', {"field": "value"})
    value_json = orjson.dumps(body["value"])
    if len(value_json) > max_value_size:
        raise ApiError(
            413,
            "PAYLOAD_TOO_LARGE",
            f"value is {len(value_json)} bytes of JSON; the limit is {max_value_size}",
            {"size": len(value_json), "max_value_size": max_value_size},
        )
    _refuse_nul(value_json, "value")
    ttl = body.get("ttl")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0):
        raise invalid(
            f"ttl must be a non-negative integer number of seconds, got {orjson.dumps(ttl).decode()}", {"field": "ttl"}
        )
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("metadata must be a JSON object", {"field": "metadata"})
    metadata_json = orjson.dumps(metadata or {})
    _refuse_nul(metadata_json, "metadata")
    return WriteInput(value_json=value_json, ttl=ttl, metadata_json=metadata_json)


def _refuse_nul(encoded: bytes, field: str) -> None:
    # PostgreSQL's jsonb cannot store U+0000; accepting it would make a write that can never
    # be persisted.
    if _NUL.search(encoded):
        raise invalid(f"{field} contains the character U+0000, which cannot be stored", {"field": field})


def parse_if_match(header: str | None) -> int | None:
    if header is None:
        return None
    text = header.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    try:
        version = int(text)
    except ValueError:
        raise invalid(f"If-Match must be a version number, got '{header}'", {"header": "If-Match"}) from None
    if version < 0:
        raise invalid(f"If-Match must be a version number, got '{header}'", {"header": "If-Match"})
    return version


def parse_batch_keys(raw: bytes, *, max_keys: int) -> list[str]:
    body = _json_body(raw)
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise invalid('request body must be {"keys": ["key", ...]}')
    keys = body["keys"]
    if not keys:
        raise invalid("keys must not be empty")
    if len(keys) > max_keys:
        raise invalid(f"too many keys: {len(keys)} (at most {max_keys})", {"count": len(keys), "max": max_keys})
    bad = [k for k in keys if not isinstance(k, str) or not is_valid_key(k)]
    if bad:
        raise invalid(f"invalid key(s): keys are {KEY_RULE}", {"invalid": bad[:10]})
    return keys
