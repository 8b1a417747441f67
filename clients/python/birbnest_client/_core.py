"""What the sync and the async client share: configuration, request building, answer parsing.

Each public method is described once here as a :class:`Call` (method, path, body, headers, how
safe it is to retry) plus a function that turns the final answer into the method's result; the
two clients only differ in how they send it (``httpx.Client`` vs ``httpx.AsyncClient``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from birbnest_client import errors
from birbnest_client._retry import RetryPolicy, Safety, parse_retry_after
from birbnest_client._version import __version__
from birbnest_client.models import BatchResult, Entry

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
API_KEY_ENV = "BIRBNEST_API_KEY"
#: The service's default ``MAX_BATCH_KEYS``: batch calls are split into requests of this many keys.
MAX_BATCH_KEYS = 100
USER_AGENT = f"birbnest-client/{__version__}"

KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,255}")
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._:-]{0,255}")
KEY_RULE = "1-255 characters from A-Z a-z 0-9 . _ : -"

T = TypeVar("T")


def validate_key(key: object) -> str:
    """The key, or :class:`errors.InvalidRequest` before anything is sent."""
    if not isinstance(key, str) or KEY_PATTERN.fullmatch(key) is None:
        shown = repr(key) if len(repr(key)) <= 70 else repr(key)[:70] + "…"
        raise errors.InvalidRequest(f"invalid key {shown}: keys are {KEY_RULE}", details={"key": key})
    return key


def validate_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or PREFIX_PATTERN.fullmatch(prefix) is None:
        raise errors.InvalidRequest(
            f"invalid key prefix {prefix!r}: a prefix is 0-255 characters from A-Z a-z 0-9 . _ : -",
            details={"prefix": prefix},
        )
    return prefix


def validate_ttl(ttl: object, field_name: str = "ttl") -> int | None:
    if ttl is None:
        return None
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        raise errors.InvalidRequest(
            f"{field_name} must be a non-negative int of seconds (0 = never expires, None = the service's "
            f"default), got {ttl!r}",
            details={"field": field_name},
        )
    return ttl


def entry_path(key: str, suffix: str = "") -> str:
    # Keys never need quoting (their alphabet is URL-safe), but the path is built safely anyway.
    # The keys "." and ".." would be dot segments, which URL normalisation removes (RFC 3986
    # 5.2.4): "/v1/cache/." would reach the listing. Percent-encoded, they stay keys.
    quoted = quote(validate_key(key), safe="")
    if quoted in (".", ".."):
        quoted = quoted.replace(".", "%2E")
    return "/v1/cache/" + quoted + suffix


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def unique_keys(keys: Iterable[str]) -> list[str]:
    """The keys, validated, each once, in first-seen order (``keys`` may be a single str: refused)."""
    if isinstance(keys, str):
        raise errors.InvalidRequest("keys must be an iterable of keys, not one str", details={"keys": keys})
    return list(dict.fromkeys(validate_key(key) for key in keys))


@dataclass(frozen=True)
class Settings:
    """A client's configuration (shared by the sync and async clients)."""

    base_url: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    policy: RetryPolicy
    max_batch_keys: int


def make_settings(
    *,
    base_url: str,
    api_key: str | None,
    timeout: float | httpx.Timeout | None,
    retries: int,
    backoff: float,
    max_backoff: float,
    max_retry_after: float,
    max_batch_keys: int,
    headers: Mapping[str, str] | None,
) -> Settings:
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
    if not max_batch_keys >= 1:
        raise ValueError(f"max_batch_keys must be at least 1, got {max_batch_keys!r}")
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if key:
        all_headers["Authorization"] = f"Bearer {key}"
    all_headers.update(headers or {})
    return Settings(
        base_url=base_url.rstrip("/"),
        headers=all_headers,
        timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
        policy=RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff, max_retry_after=max_retry_after),
        max_batch_keys=max_batch_keys,
    )


def encode_json(body: Any) -> bytes:
    """The request body; a value that is not JSON is refused before anything is sent."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise errors.InvalidRequest(f"the value cannot be sent as JSON: {error}", details={"field": "value"}) from None


@dataclass(frozen=True)
class Call:
    """One HTTP request of a public method, and how safe it is to send it again."""

    method: str
    path: str
    safety: Safety
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Overrides the client's ``retries`` for this call (health checks are not retried).
    retries: int | None = None

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": self.params, "headers": self.headers}
        if self.json is not None:
            kwargs["content"] = encode_json(self.json)
            kwargs["headers"] = {**self.headers, "Content-Type": "application/json"}
        return kwargs


def error_for(response: httpx.Response) -> errors.BirbNestError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text[:500] or None
    return errors.from_answer(response.status_code, body, parse_retry_after(response.headers.get("Retry-After")))


def json_of(response: httpx.Response) -> Any:
    """The body of a 2xx answer; any other answer raises its error."""
    if not 200 <= response.status_code < 300:
        raise error_for(response)
    return response.json()


# --- the calls ---------------------------------------------------------------------------------


def get_call(key: str) -> Call:
    return Call("GET", entry_path(key), Safety.READ)


def entry_or_none(response: httpx.Response) -> Entry | None:
    if response.status_code == 404:
        return None
    return Entry.from_json(json_of(response))


def entry_of(response: httpx.Response) -> Entry:
    return Entry.from_json(json_of(response))


def set_call(
    key: str,
    value: Any,
    *,
    ttl: int | None,
    metadata: Mapping[str, Any] | None,
    if_match: int | None,
    if_none_match: bool,
) -> Call:
    path = entry_path(key)
    body: dict[str, Any] = {"value": value}
    if validate_ttl(ttl) is not None:
        body["ttl"] = ttl
    if metadata is not None:
        body["metadata"] = dict(metadata)
    headers = {}
    if if_match is not None:
        headers["If-Match"] = str(_version(if_match, "if_match"))
    if if_none_match:
        headers["If-None-Match"] = "*"
    conditional = if_match is not None or if_none_match
    return Call("PUT", path, Safety.CONDITIONAL if conditional else Safety.WRITE, json=body, headers=headers)


def _version(version: object, name: str) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise errors.InvalidRequest(f"{name} must be a version number (an int >= 0), got {version!r}")
    return version


def delete_call(key: str) -> Call:
    return Call("DELETE", entry_path(key), Safety.WRITE)


def deleted(response: httpx.Response) -> bool:
    if response.status_code == 404:
        return False
    if not 200 <= response.status_code < 300:
        raise error_for(response)
    return True


def touch_call(key: str, ttl: int, *, if_match: int | None) -> Call:
    path = entry_path(key, "/touch")
    if ttl is None:
        raise errors.InvalidRequest("touch needs a ttl (int seconds, 0 = never expires)", details={"field": "ttl"})
    validate_ttl(ttl)
    headers = {} if if_match is None else {"If-Match": str(_version(if_match, "if_match"))}
    safety = Safety.WRITE if if_match is None else Safety.CONDITIONAL
    return Call("POST", path, safety, json={"ttl": ttl}, headers=headers)


def batch_get_call(keys: list[str]) -> Call:
    return Call("POST", "/v1/cache/batch/get", Safety.READ, json={"keys": keys})


def batch_entries(response: httpx.Response) -> dict[str, Entry]:
    body = json_of(response)
    return {key: Entry.from_json(data) for key, data in body["entries"].items()}


def normalize_entries(entries: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> list[dict[str, Any]]:
    """``set_many``'s argument as the batch body's entries, validated, each key once.

    A Mapping is ``{key: value}``; anything else is an iterable of ``dict(key=…, value=…, ttl=…,
    metadata=…, if_match=…, if_none_match=…)`` (``if_none_match`` True or ``"*"``).
    """
    if isinstance(entries, Mapping):
        items: list[Mapping[str, Any]] = [{"key": key, "value": value} for key, value in entries.items()]
    else:
        items = list(entries)
    allowed = {"key", "value", "ttl", "metadata", "if_match", "if_none_match"}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, Mapping) or "key" not in item or "value" not in item:
            raise errors.InvalidRequest(
                f"entry {index} must be a mapping with 'key' and 'value' (or pass {{key: value}})",
                details={"index": index},
            )
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise errors.InvalidRequest(f"entry {index} has unknown field(s) {unknown}", details={"index": index})
        key = validate_key(item["key"])
        if key in seen:
            raise errors.InvalidRequest(f"key {key!r} appears twice in set_many", details={"index": index, "key": key})
        seen.add(key)
        entry: dict[str, Any] = {"key": key, "value": item["value"]}
        if item.get("ttl") is not None:
            entry["ttl"] = validate_ttl(item["ttl"])
        if item.get("metadata") is not None:
            entry["metadata"] = dict(item["metadata"])
        if item.get("if_match") is not None:
            entry["if_match"] = _version(item["if_match"], "if_match")
        if item.get("if_none_match") in (True, "*"):
            entry["if_none_match"] = "*"
        elif item.get("if_none_match") not in (None, False):
            raise errors.InvalidRequest(f"entry {index}: if_none_match must be True or '*'", details={"index": index})
        out.append(entry)
    return out


def batch_set_call(entries: list[dict[str, Any]]) -> Call:
    return Call("POST", "/v1/cache/batch/set", Safety.WRITE, json={"entries": entries})


def batch_delete_call(keys: list[str]) -> Call:
    return Call("POST", "/v1/cache/batch/delete", Safety.WRITE, json={"keys": keys})


def batch_results(response: httpx.Response) -> list[BatchResult]:
    body = json_of(response)
    return [BatchResult.from_json(item) for item in body["results"]]


def list_call(prefix: str, cursor: str | None, limit: int) -> Call:
    params: dict[str, Any] = {"prefix": validate_prefix(prefix), "limit": limit}
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise errors.InvalidRequest(f"limit must be a positive int, got {limit!r}", details={"field": "limit"})
    if cursor is not None:
        params["cursor"] = cursor
    return Call("GET", "/v1/cache", Safety.READ, params=params)


def key_page(response: httpx.Response) -> tuple[list[str], str | None]:
    body = json_of(response)
    return list(body["keys"]), body.get("next_cursor")


def health_call() -> Call:
    # /health answers 503 with the same body when a dependency is down: that body is the answer.
    return Call("GET", "/health", Safety.READ, retries=0)


def health_of(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 503:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "status" in body:
            return body
    result: dict[str, Any] = json_of(response)
    return result


def merge_retried(results: list[BatchResult], retried: list[BatchResult]) -> list[BatchResult]:
    """``results`` with the entries of ``retried`` (a later attempt of some of its keys) put in."""
    by_key = {result.key: result for result in retried}
    return [by_key.get(result.key, result) for result in results]


def unavailable(results: list[BatchResult]) -> list[str]:
    """The keys whose per-key answer was 503: not made durable, nothing visible, safe to send again."""
    return [result.key for result in results if result.status == 503]


def after_failed_retry(results: list[BatchResult], keys: set[str], error: errors.BirbNestError) -> list[BatchResult]:
    """``results`` when the request re-sending ``keys`` (per-key 503s) itself failed with ``error``.

    An answer (any status) or a connection never made means those writes still did not happen:
    their 503 results stay. A request that may have reached the service leaves them unknown:
    status 0 (no answer) with the error.
    """
    if not isinstance(error, errors.ConnectionFailed | errors.Timeout) or not error.request_sent or error.status:
        return results
    return [BatchResult(result.key, 0, error=error) if result.key in keys else result for result in results]


def mark_absent(results: list[BatchResult]) -> list[BatchResult]:
    """Delete results: a key that was not there (404) has ``deleted`` False, as ``delete`` says."""
    return [dataclasses.replace(result, deleted=False) if result.status == 404 else result for result in results]
