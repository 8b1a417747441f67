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

from birbnest.principal import require_keys
from cache_api.serializers import parse_batch_keys, parse_if_match, parse_write, validate_key
from persistence import services
from persistence.errors import KeyNotFoundError
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
        if_match = parse_if_match(request.headers.get("If-Match"))
        data = parse_write(request.body, max_value_size=settings.BIRB.max_value_size)
        result = services.cache_entry_set(
            key=key, value_json=data.value_json, ttl=data.ttl, metadata_json=data.metadata_json, if_match=if_match
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
