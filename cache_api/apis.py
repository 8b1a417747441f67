"""The HTTP data plane: thin DRF views over persistence.services.

Views return ready JSON bytes (entries are rendered without decoding their values); DRF's
authentication, permission and parsing machinery is switched off for these routes.
"""

from __future__ import annotations

from typing import Any

import orjson
from django.conf import settings
from django.http import HttpResponse
from rest_framework.request import Request
from rest_framework.views import APIView

from birbnest.errors import ApiError
from birbnest.principal import principal_of, require_keys
from cache_api.errors import to_response
from cache_api.serializers import (
    list_cursor,
    parse_batch_delete,
    parse_batch_keys,
    parse_batch_set,
    parse_conditions,
    parse_if_match,
    parse_list_query,
    parse_touch,
    parse_write,
    validate_key,
)
from persistence import services
from persistence.errors import KeyNotFoundError, PayloadTooLargeError
from persistence.redis_store import StoredEntry


def entry_response(entry: StoredEntry, status: int = 200) -> HttpResponse:
    response = HttpResponse(entry.to_json(), status=status, content_type="application/json")
    response["ETag"] = f'"{entry.version}"'
    return response


class LeanApiView(APIView):
    """DRF's view with what the data plane does not use switched off.

    API keys and rate limits are middleware (``ops.access``, ``ops.ratelimit``), which answer
    before a view runs; a view only confines the request's key to its key prefixes
    (:func:`birbnest.principal.require_keys`). So there are no DRF authenticators, permissions or
    throttles to run, and one renderer. DRF's exception handling (errors.py) and method dispatch stay.
    """

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []
    throttle_classes: list[Any] = []

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # APIView.initial minus format suffixes, versioning, authentication, permissions and
        # throttles, all unused here (a sixth of a cache hit's Python calls).
        self.format_kwarg = None
        request.accepted_renderer, request.accepted_media_type = self.perform_content_negotiation(request)

    # A plain HttpResponse, which DRF's finalize_response takes; the DRF stubs type options() as
    # returning a Response (and with a Request, unlike Django's View: reported here too).
    def options(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponse:  # type: ignore[override]
        """204 with ``Allow`` (as Django's own views answer), not DRF's description of the view."""
        response = HttpResponse(status=204)
        response["Allow"] = ", ".join(self.allowed_methods)
        return response

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # One renderer (JSON): skip negotiation on every request.
        renderer = self.get_renderers()[0]
        return renderer, renderer.media_type


class CacheEntryApi(LeanApiView):
    """`GET|POST|PUT|DELETE /v1/cache/{key}`."""

    def get(self, request: Request, key: str) -> HttpResponse:
        validate_key(key)
        require_keys(request, (key,))
        entry = services.cache_entry_read(key=key)
        if entry is None:
            raise KeyNotFoundError(key)
        return entry_response(entry)

    def post(self, request: Request, key: str) -> HttpResponse:
        return self._write(request, key)

    def put(self, request: Request, key: str) -> HttpResponse:
        return self._write(request, key)

    def _write(self, request: Request, key: str) -> HttpResponse:
        validate_key(key)
        require_keys(request, (key,))
        if_match, create_only = parse_conditions(request.headers.get("If-Match"), request.headers.get("If-None-Match"))
        data = parse_write(request.body, max_value_size=settings.BIRB.max_value_size)
        result = services.cache_entry_set(
            key=key,
            value_json=data.value_json,
            ttl=data.ttl,
            metadata_json=data.metadata_json,
            if_match=if_match,
            if_none_match=create_only,
        )
        return entry_response(result.entry, status=201 if result.created else 200)

    def delete(self, request: Request, key: str) -> HttpResponse:
        validate_key(key)
        require_keys(request, (key,))
        services.cache_entry_delete(key=key)
        return HttpResponse(status=204)


class CacheEntryBatchGetApi(LeanApiView):
    """`POST /v1/cache/batch/get` with `{"keys": [...]}`."""

    def post(self, request: Request) -> HttpResponse:
        keys = parse_batch_keys(request.body, max_keys=settings.BIRB.max_batch_keys)
        require_keys(request, keys)
        found, missing, _hits = services.cache_entries_get_many(
            keys=keys, max_bytes=settings.BIRB.max_batch_response_size
        )
        body = orjson.dumps(
            {"entries": {key: orjson.Fragment(entry.to_json()) for key, entry in found.items()}, "missing": missing}
        )
        return HttpResponse(body, content_type="application/json")


def _json(body: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(body), status=status, content_type="application/json")


def _error_result(key: str, error: Exception) -> dict[str, Any]:
    """One key's error in a batch answer: its status and the contract's error body."""
    response = to_response(error)
    if response is None:
        raise error
    return {"key": key, "status": response.status_code, **orjson.loads(response.content)}


class CacheEntryTouchApi(LeanApiView):
    """`POST /v1/cache/{key}/touch` with `{"ttl": <seconds>}`: a new TTL, same value and metadata."""

    def post(self, request: Request, key: str) -> HttpResponse:
        validate_key(key)
        require_keys(request, (key,))
        if_match = parse_if_match(request.headers.get("If-Match"))
        ttl = parse_touch(request.body)
        return entry_response(services.cache_entry_touch(key=key, ttl=ttl, if_match=if_match))


class CacheEntryBatchSetApi(LeanApiView):
    """`POST /v1/cache/batch/set` with `{"entries": [{"key", "value", "ttl"?, "metadata"?, "if_match"?,
    "if_none_match"?}, ...]}`: 200 with a result per entry, in order."""

    def post(self, request: Request) -> HttpResponse:
        entries = parse_batch_set(
            request.body, max_keys=settings.BIRB.max_batch_keys, max_value_size=settings.BIRB.max_value_size
        )
        require_keys(request, [entry.key for entry in entries])
        for index, entry in enumerate(entries):
            try:
                services.check_message_fits(
                    key=entry.key, value_json=entry.write.value_json, metadata_json=entry.write.metadata_json
                )
            except PayloadTooLargeError as error:
                refused = orjson.loads(to_response(error).content)  # type: ignore[union-attr]
                details = {"index": index, "key": entry.key, **refused["details"]}
                raise ApiError(
                    413, "PAYLOAD_TOO_LARGE", f"entries[{index}] (key '{entry.key}'): {refused['error']}", details
                ) from None
        results = services.cache_entries_set_many(
            requests=[
                services.SetRequest(
                    key=entry.key,
                    value_json=entry.write.value_json,
                    ttl=entry.write.ttl,
                    metadata_json=entry.write.metadata_json,
                    if_match=entry.if_match,
                    if_none_match=entry.if_none_match,
                )
                for entry in entries
            ]
        )
        answers = []
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, Exception):
                answers.append(_error_result(entry.key, result))
            else:
                answers.append(
                    {
                        "key": entry.key,
                        "status": 201 if result.created else 200,
                        "version": result.entry.version,
                        "created": result.created,
                    }
                )
        return _json({"results": answers})


class CacheEntryBatchDeleteApi(LeanApiView):
    """`POST /v1/cache/batch/delete` with `{"keys": [...]}`: 200 with a result per key, in order."""

    def post(self, request: Request) -> HttpResponse:
        keys = parse_batch_delete(request.body, max_keys=settings.BIRB.max_batch_keys)
        require_keys(request, keys)
        results = services.cache_entries_delete_many(keys=keys)
        answers = [
            _error_result(key, result)
            if isinstance(result, Exception)
            else {"key": key, "status": 204, "deleted": True, "version": result}
            for key, result in zip(keys, results, strict=True)
        ]
        return _json({"results": answers})


class CacheKeyListApi(LeanApiView):
    """`GET /v1/cache?prefix=&cursor=&limit=`: live keys in byte order, a page at a time, from
    PostgreSQL (after the worker has persisted what was acknowledged before the request)."""

    def get(self, request: Request) -> HttpResponse:
        query = parse_list_query(request.GET)
        _require_prefix(request, query.prefix)
        keys, last = services.cache_entries_list_keys(prefix=query.prefix, after=query.after, limit=query.limit)
        return _json({"keys": keys, "next_cursor": list_cursor(last) if last is not None else None})


def _require_prefix(request: Request, prefix: str) -> None:
    """403 unless the request's key may use every key that starts with ``prefix``."""
    principal = principal_of(request)
    if principal is None or not principal.prefixes or prefix.startswith(principal.prefixes):
        return
    allowed = ", ".join(f"'{p}'" for p in principal.prefixes)
    raise ApiError(
        403,
        "FORBIDDEN",
        f"API key {principal.public_id} may only list keys starting with {allowed}; "
        f"ask for a prefix that starts with one of them, not '{prefix}'",
        {"missing": "key_prefix", "key_prefixes": list(principal.prefixes), "prefix": prefix},
    )
