"""Input validation of the cache API (hand-written: it runs on every write)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from birbnest.errors import ApiError, invalid
from persistence.keys import KEY_RULE, is_valid_key
from persistence.services import MAX_TTL_SECONDS

WRITE_FIELDS = ("value", "ttl", "metadata")
MAX_VERSION = 2**63 - 1
# orjson encodes at most 254 levels of nested arrays and objects (a value) and metadata, itself
# an object, holds 253 below it.
MAX_DEPTH = 254
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
    value_json = _encoded(body["value"], "value")
    if len(value_json) > max_value_size:
        raise ApiError(
            413,
            "PAYLOAD_TOO_LARGE",
            f"value is {len(value_json)} bytes of JSON; the limit is {max_value_size}",
            {"size": len(value_json), "max_value_size": max_value_size},
        )
    _refuse_nul(value_json, "value")
    # Present means given: null is not a way to say "absent" (omit the field for the default).
    ttl = body.get("ttl")
    if "ttl" in body and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0):
        raise invalid(
            f"ttl must be a non-negative integer number of seconds (0 = never expires; omit it for the default), "
            f"got {_shown(ttl)}",
            {"field": "ttl"},
        )
    if ttl is not None and ttl > MAX_TTL_SECONDS:
        raise invalid(
            f"ttl must be at most {MAX_TTL_SECONDS} seconds (100 years; 0 = never expires), got {ttl}",
            {"field": "ttl", "max": MAX_TTL_SECONDS},
        )
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        shown = _shown(metadata)
        raise invalid(f"metadata must be a JSON object (omit it for none), got {shown}", {"field": "metadata"})
    metadata_json = _encoded(metadata, "metadata")
    _refuse_nul(metadata_json, "metadata")
    return WriteInput(value_json=value_json, ttl=ttl, metadata_json=metadata_json)


def _encoded(data: Any, field: str) -> bytes:
    """The compact JSON text that is stored. orjson decodes 1,024 levels of nesting but encodes
    254: what it cannot encode is refused here, before anything is stored."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError as error:
        raise invalid(
            f"{field} cannot be stored: {error} (at most {MAX_DEPTH} levels of nested arrays and objects)",
            {"field": field, "max_depth": MAX_DEPTH},
        ) from None


def _shown(data: Any) -> str:
    text = orjson.dumps(data).decode() if not isinstance(data, dict | list) else type(data).__name__
    return text if len(text) <= 40 else text[:40] + "…"


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
        version = -1
    # Versions are PostgreSQL bigints: anything else can never match.
    if not 0 <= version <= MAX_VERSION:
        shown = header if len(header) <= 40 else header[:40] + "…"
        raise invalid(f"If-Match must be a version number (0 to {MAX_VERSION}), got '{shown}'", {"header": "If-Match"})
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
