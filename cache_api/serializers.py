"""Input validation of the cache API (hand-written: it runs on every write)."""

from __future__ import annotations

import base64
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
    return _write_fields(body, max_value_size=max_value_size)


def _write_fields(body: dict[str, Any], *, max_value_size: int) -> WriteInput:
    """The checks of a write's ``value``, ``ttl`` and ``metadata`` (a single write's body, a batch's entry)."""
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
    ttl = _ttl(body["ttl"]) if "ttl" in body else None
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        shown = _shown(metadata)
        raise invalid(f"metadata must be a JSON object (omit it for none), got {shown}", {"field": "metadata"})
    metadata_json = _encoded(metadata, "metadata")
    _refuse_nul(metadata_json, "metadata")
    return WriteInput(value_json=value_json, ttl=ttl, metadata_json=metadata_json)


def _ttl(ttl: Any, *, default_hint: str = "; omit it for the default") -> int:
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        raise invalid(
            f"ttl must be a non-negative integer number of seconds (0 = never expires{default_hint}), "
            f"got {_shown(ttl)}",
            {"field": "ttl"},
        )
    if ttl > MAX_TTL_SECONDS:
        raise invalid(
            f"ttl must be at most {MAX_TTL_SECONDS} seconds (100 years; 0 = never expires), got {ttl}",
            {"field": "ttl", "max": MAX_TTL_SECONDS},
        )
    return ttl


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


def parse_if_none_match(header: str | None) -> bool:
    """``If-None-Match: *`` (create-only) → True; absent → False; anything else → 400."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    shown = header if len(header) <= 40 else header[:40] + "…"
    raise invalid(
        f"If-None-Match supports only '*' (write only if the key does not exist), got '{shown}'",
        {"header": "If-None-Match"},
    )


def parse_conditions(if_match: str | None, if_none_match: str | None) -> tuple[int | None, bool]:
    """The write's conditions from its headers: (If-Match version, create-only)."""
    version = parse_if_match(if_match)
    create_only = parse_if_none_match(if_none_match)
    if version is not None and create_only:
        raise invalid(
            "If-Match (the key is at this version) and If-None-Match: * (the key does not exist) cannot both hold; "
            "send one of them",
            {"header": "If-None-Match"},
        )
    return version, create_only


@dataclass(frozen=True)
class BatchSetEntry:
    key: str
    write: WriteInput
    if_match: int | None
    if_none_match: bool


BATCH_SET_FIELDS = ("key", "value", "ttl", "metadata", "if_match", "if_none_match")


def _entries_list(body: Any, field: str, example: str, *, max_keys: int) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get(field), list):
        raise invalid(f"request body must be {example}")
    unknown = sorted(set(body) - {field})
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)}", {"allowed": [field]})
    items = body[field]
    if not items:
        raise invalid(f"{field} must not be empty")
    if len(items) > max_keys:
        raise invalid(f"too many {field}: {len(items)} (at most {max_keys})", {"count": len(items), "max": max_keys})
    return items


def _in_entry(error: ApiError, index: int, key: Any) -> ApiError:
    """The error of one entry of a batch, naming it (``details.index``, ``details.key``)."""
    shown = key if isinstance(key, str) and len(key) <= 64 else (key[:64] + "…" if isinstance(key, str) else None)
    details = {"index": index, "key": shown, **(error.details if isinstance(error.details, dict) else {})}
    details["index"], details["key"] = index, shown
    where = f"entries[{index}]" + (f" (key '{shown}')" if shown is not None else "")
    return ApiError(error.status, error.code, f"{where}: {error.message}", details)


def parse_batch_set(raw: bytes, *, max_keys: int, max_value_size: int) -> list[BatchSetEntry]:
    """``{"entries": [{"key", "value", "ttl"?, "metadata"?, "if_match"?, "if_none_match"?}, …]}``:
    every entry checked as a single write's body is, before anything is written; the first bad
    one refuses the whole batch, named."""
    items = _entries_list(
        _json_body(raw), "entries", '{"entries": [{"key": "...", "value": ...}, ...]}', max_keys=max_keys
    )
    entries: list[BatchSetEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        key = item.get("key") if isinstance(item, dict) else None
        try:
            if not isinstance(item, dict):
                raise invalid('each entry must be a JSON object {"key": ..., "value": ...}')
            unknown = sorted(set(item) - set(BATCH_SET_FIELDS))
            if unknown:
                raise invalid(f"unknown field(s): {', '.join(unknown)}", {"allowed": list(BATCH_SET_FIELDS)})
            if not isinstance(key, str):
                raise invalid('missing field "key" (a string)', {"field": "key"})
            validate_key(key)
            if key in seen:
                raise invalid("the key appears twice in the batch; each key may be written once", {"field": "key"})
            seen.add(key)
            write = _write_fields(item, max_value_size=max_value_size)
            if_match = item.get("if_match")
            if "if_match" in item and (
                not isinstance(if_match, int) or isinstance(if_match, bool) or not 0 <= if_match <= MAX_VERSION
            ):
                raise invalid(f"if_match must be a version number (0 to {MAX_VERSION})", {"field": "if_match"})
            if_none_match = item.get("if_none_match")
            if "if_none_match" in item and if_none_match != "*":
                raise invalid(
                    'if_none_match may only be "*" (write only if the key does not exist)', {"field": "if_none_match"}
                )
            if if_match is not None and if_none_match is not None:
                raise invalid(
                    "if_match and if_none_match cannot both hold; give one of them", {"field": "if_none_match"}
                )
        except ApiError as error:
            raise _in_entry(error, index, key) from None
        entries.append(BatchSetEntry(key, write, if_match, if_none_match == "*"))
    return entries


def parse_batch_delete(raw: bytes, *, max_keys: int) -> list[str]:
    """``{"keys": [...]}``: valid, distinct keys, else the whole batch is refused naming the first bad one."""
    keys = _entries_list(_json_body(raw), "keys", '{"keys": ["key", ...]}', max_keys=max_keys)
    seen: set[str] = set()
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not is_valid_key(key):
            shown = key if isinstance(key, str) and len(key) <= 64 else _shown(key)
            raise invalid(f"keys[{index}]: invalid key '{shown}': keys are {KEY_RULE}", {"index": index, "key": shown})
        if key in seen:
            raise invalid(f"keys[{index}]: the key '{key}' appears twice in the batch", {"index": index, "key": key})
        seen.add(key)
    return keys


def parse_touch(raw: bytes) -> int:
    """``{"ttl": <seconds, 0 = never expires>}``: the new TTL."""
    body = _json_body(raw)
    if not isinstance(body, dict) or "ttl" not in body:
        raise invalid('request body must be {"ttl": <seconds, 0 = never expires>}', {"field": "ttl"})
    unknown = sorted(set(body) - {"ttl"})
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)}", {"allowed": ["ttl"]})
    return _ttl(body["ttl"], default_hint="")


LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1000
_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._:-]{0,255}")


@dataclass(frozen=True)
class ListQuery:
    prefix: str
    after: str
    limit: int


def list_cursor(key: str) -> str:
    """The opaque cursor of a page that ends at ``key``: base64url of it, unpadded."""
    return base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()


def parse_list_query(params: Any) -> ListQuery:
    """``prefix`` (a key's beginning; default none), ``cursor`` (a previous page's ``next_cursor``),
    ``limit`` (1 to 1000, default 100)."""
    unknown = sorted(set(params) - {"prefix", "cursor", "limit"})
    if unknown:
        raise invalid(f"unknown query parameter(s): {', '.join(unknown)}", {"allowed": ["prefix", "cursor", "limit"]})
    prefix = params.get("prefix", "")
    if not _PREFIX_PATTERN.fullmatch(prefix):
        shown = prefix if len(prefix) <= 64 else prefix[:64] + "…"
        raise invalid(
            f"invalid prefix '{shown}': a prefix is up to 255 of the key characters (A-Z a-z 0-9 . _ : -)",
            {"field": "prefix"},
        )
    raw_limit = params.get("limit", str(LIST_LIMIT_DEFAULT))
    limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6 else 0
    if not 1 <= limit <= LIST_LIMIT_MAX:
        shown = raw_limit if len(raw_limit) <= 20 else raw_limit[:20] + "…"
        raise invalid(
            f"limit must be an integer from 1 to {LIST_LIMIT_MAX}, got '{shown}'",
            {"field": "limit", "max": LIST_LIMIT_MAX},
        )
    after = ""
    cursor = params.get("cursor")
    if cursor is not None:
        try:
            after = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
            valid = cursor.isascii() and is_valid_key(after) and list_cursor(after) == cursor
        except (ValueError, UnicodeError):
            valid = False
        if not valid:
            shown = cursor if len(cursor) <= 40 else cursor[:40] + "…"
            raise invalid(
                f"invalid cursor '{shown}': pass the next_cursor of a previous page as it is", {"field": "cursor"}
            )
    return ListQuery(prefix=prefix, after=after, limit=limit)


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
