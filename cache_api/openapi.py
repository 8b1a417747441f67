"""The data plane in the OpenAPI document (`/v1/schema/`, drf-spectacular).

The views in :mod:`cache_api.apis` parse their bodies by hand (orjson, on the hot path), so
drf-spectacular cannot see what they take and answer. This module says it, without touching the
views: an :class:`OpenApiViewExtension` per view swaps in a subclass decorated with
``extend_schema``, and the bodies are JSON Schema components (:func:`components`, added to the
document by :func:`postprocess_schema`), written as precisely as the parsing in
:mod:`cache_api.serializers` decides: the schemathesis run against the live API
(tests/integration/test_schemathesis.py) fails when the two disagree either way.

The extensions register themselves when this module is imported; ``birbnest/urls.py`` imports it
beside the schema routes (:data:`urlpatterns`).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.urls import path
from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from persistence.services import MAX_TTL_SECONDS

# Every error code of the contract (docs: CONTRACT.md, "HTTP API (v1)"): the enum of Error.code.
ERROR_CODES = [
    "NOT_FOUND",
    "INVALID_REQUEST",
    "PAYLOAD_TOO_LARGE",
    "VERSION_MISMATCH",
    "PRECONDITION_FAILED",
    "RATE_LIMITED",
    "UNAUTHORIZED",
    "FORBIDDEN",
    "SERVICE_UNAVAILABLE",
    "TIMEOUT",
    "INTERNAL_ERROR",
]
# persistence.keys.KEY_PATTERN as an anchored JSON Schema pattern (ECMA-262 syntax).
KEY_REGEX = r"^[A-Za-z0-9._:-]{1,255}$"
# A key in a URL path: the same, minus "." and "..": HTTP clients remove those from a path as dot
# segments (RFC 3986 5.2.4) before sending it (GET /v1/cache/. becomes GET /v1/cache, the
# listing). Percent-encoded (%2E, %2E%2E) they reach the key; batch bodies name them plainly.
KEY_PATH_REGEX = r"^(?!\.\.?$)[A-Za-z0-9._:-]{1,255}$"
MAX_VERSION = 2**63 - 1


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def components() -> dict[str, Any]:
    """The JSON Schema components of the data plane (limits read from the running settings)."""
    max_batch = settings.BIRB.max_batch_keys
    key = {"type": "string", "pattern": KEY_REGEX, "minLength": 1, "maxLength": 255, "example": "user:42"}
    ttl_in = {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_TTL_SECONDS,
        "description": "Seconds until the entry expires; 0 = never. Omitted: the service's default "
        "(REDIS_DEFAULT_TTL). null is refused.",
    }
    version = {"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_VERSION}
    error_fields = {
        "error": {"type": "string", "description": "A human message."},
        "code": _ref("ErrorCode"),
        "details": {"nullable": True, "description": "Structured details (depend on the code), or null."},
    }
    return {
        "ErrorCode": {"type": "string", "enum": ERROR_CODES, "description": "The contract's error codes."},
        "Error": {
            "type": "object",
            "description": 'Every error answer: {"error": message, "code": CODE, "details": ...}.',
            "properties": error_fields,
            "required": ["error", "code", "details"],
        },
        "Key": key,
        "Version": {**version, "description": "The entry's version: it only grows, one step per write of the key."},
        "Entry": {
            "type": "object",
            "properties": {
                "key": _ref("Key"),
                "value": {"description": "Any JSON value, returned as the same JSON text it was written as."},
                "version": _ref("Version"),
                "ttl": {
                    "type": "integer",
                    "minimum": 0,
                    "nullable": True,
                    "description": "Seconds left before the entry expires, or null: it never expires.",
                },
                "metadata": {"type": "object", "additionalProperties": True},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
            },
            "required": ["key", "value", "version", "ttl", "metadata", "created_at", "updated_at"],
            "additionalProperties": False,
        },
        "EntryWrite": {
            "type": "object",
            "description": "A value larger than MAX_VALUE_SIZE bytes of JSON is refused (413). Strings "
            "(in the value or metadata) may not hold U+0000, and values at most 254 levels of nesting (400).",
            "properties": {
                "value": {"description": "Any JSON value (null too)."},
                "ttl": ttl_in,
                "metadata": {"type": "object", "additionalProperties": True, "description": "Any JSON object."},
                "key": {"description": "Ignored: the key is the path's (allowed so an entry read can be sent back)."},
            },
            "required": ["value"],
            "additionalProperties": False,
        },
        "BatchGetRequest": {
            "type": "object",
            "properties": {"keys": {"type": "array", "items": _ref("Key"), "minItems": 1, "maxItems": max_batch}},
            "required": ["keys"],
        },
        "BatchGetResult": {
            "type": "object",
            "properties": {
                "entries": {"type": "object", "additionalProperties": _ref("Entry"), "description": "key -> entry"},
                "missing": {"type": "array", "items": _ref("Key")},
            },
            "required": ["entries", "missing"],
            "additionalProperties": False,
        },
        "BatchSetEntry": {
            "type": "object",
            "properties": {
                "key": _ref("Key"),
                "value": {"description": "Any JSON value (null too)."},
                "ttl": ttl_in,
                "metadata": {"type": "object", "additionalProperties": True},
                "if_match": {**version, "minimum": 0, "description": "Write only if the key is at this version."},
                "if_none_match": {
                    "type": "string",
                    "enum": ["*"],
                    "description": "Write only if the key is absent (not together with if_match).",
                },
            },
            "required": ["key", "value"],
            "not": {"required": ["if_match", "if_none_match"]},
            "additionalProperties": False,
        },
        "BatchSetRequest": {
            "type": "object",
            "description": "Keys must be distinct. Any invalid entry refuses the whole batch (400/413, "
            "details.index and details.key name it) and nothing is written.",
            "properties": {
                "entries": {"type": "array", "items": _ref("BatchSetEntry"), "minItems": 1, "maxItems": max_batch}
            },
            "required": ["entries"],
            "additionalProperties": False,
        },
        "BatchKeyError": {
            "type": "object",
            "description": "One key's write or delete that was not made (the others are).",
            "properties": {
                "key": _ref("Key"),
                "status": {"type": "integer", "enum": [404, 409, 412, 503]},
                **error_fields,
            },
            "required": ["key", "status", "error", "code", "details"],
        },
        "BatchSetWritten": {
            "type": "object",
            "properties": {
                "key": _ref("Key"),
                "status": {"type": "integer", "enum": [200, 201]},
                "version": _ref("Version"),
                "created": {"type": "boolean"},
            },
            "required": ["key", "status", "version", "created"],
        },
        "BatchSetResult": {
            "type": "object",
            "description": "One result per entry, in request order. A per-key 503 means that write was not "
            "made durable and nothing of it is visible (safe to retry).",
            "properties": {
                "results": {
                    "type": "array",
                    "items": {"oneOf": [_ref("BatchSetWritten"), _ref("BatchKeyError")]},
                }
            },
            "required": ["results"],
            "additionalProperties": False,
        },
        "BatchDeleteRequest": {
            "type": "object",
            "properties": {
                "keys": {
                    "type": "array",
                    "items": _ref("Key"),
                    "minItems": 1,
                    "maxItems": max_batch,
                    "uniqueItems": True,
                }
            },
            "required": ["keys"],
            "additionalProperties": False,
        },
        "BatchDeleted": {
            "type": "object",
            "properties": {
                "key": _ref("Key"),
                "status": {"type": "integer", "enum": [204]},
                "deleted": {"type": "boolean", "enum": [True]},
                "version": _ref("Version"),
            },
            "required": ["key", "status", "deleted", "version"],
        },
        "BatchDeleteResult": {
            "type": "object",
            "description": "One result per key, in request order.",
            "properties": {
                "results": {"type": "array", "items": {"oneOf": [_ref("BatchDeleted"), _ref("BatchKeyError")]}}
            },
            "required": ["results"],
            "additionalProperties": False,
        },
        "Touch": {
            "type": "object",
            "properties": {"ttl": {**ttl_in, "description": "The new TTL in seconds; 0 = never expires."}},
            "required": ["ttl"],
            "additionalProperties": False,
        },
        "KeyPage": {
            "type": "object",
            "properties": {
                "keys": {"type": "array", "items": _ref("Key"), "description": "Ascending (byte order)."},
                "next_cursor": {
                    "type": "string",
                    "nullable": True,
                    "description": "Pass as `cursor` for the next page; null on the last page.",
                },
            },
            "required": ["keys", "next_cursor"],
            "additionalProperties": False,
        },
    }


# Response headers ---------------------------------------------------------------------------


def _header(name: str, codes: list[int], description: str, *, required: bool = False, kind: Any = str) -> Any:
    return OpenApiParameter(
        name, kind, OpenApiParameter.HEADER, response=codes, required=required, description=description
    )


RATE_LIMIT_HEADERS = [
    _header("X-RateLimit-Limit", [200, 201, 204, 429], "Requests allowed per window (when limiting is on).", kind=int),
    _header("X-RateLimit-Remaining", [200, 201, 204, 429], "Requests left in this window.", kind=int),
    _header("X-RateLimit-Reset", [200, 201, 204, 429], "Unix time (seconds) when the window resets.", kind=int),
    _header("Retry-After", [429], "Seconds to wait before retrying.", required=True, kind=int),
]
COMMON_HEADERS = [
    *RATE_LIMIT_HEADERS,
    _header(
        "WWW-Authenticate",
        [401],
        'The challenge: Bearer realm="birb-nest" (with error="..." for a bad key).',
        required=True,
    ),
    _header("Retry-After", [503], "Seconds to wait before retrying.", required=True, kind=int),
]
ETAG = _header("ETag", [200, 201], 'The entry\'s version, quoted ("7"): send it back in If-Match.', required=True)
IF_MATCH = OpenApiParameter(
    "If-Match",
    {"type": "integer", "format": "int64", "minimum": 0, "maximum": MAX_VERSION},
    OpenApiParameter.HEADER,
    description='Write only if the key is at this version (an ETag: 7 or "7"); else 409 VERSION_MISMATCH.',
)
IF_NONE_MATCH = OpenApiParameter(
    "If-None-Match",
    {"type": "string", "enum": ["*"]},
    OpenApiParameter.HEADER,
    description="`*`: create only; 412 PRECONDITION_FAILED when the key exists. Any other value is refused "
    "(400), and so is If-None-Match together with If-Match.",
)
KEY_IN_PATH = OpenApiParameter(
    "key",
    {"type": "string", "pattern": KEY_PATH_REGEX, "minLength": 1, "maxLength": 255},
    OpenApiParameter.PATH,
    description='1-255 characters from A-Z a-z 0-9 . _ : - (anything else: 400). The keys "." and ".." '
    "must be sent percent-encoded (%2E, %2E%2E): clients remove them from a path as dot segments.",
)

# Error answers -------------------------------------------------------------------------------

ERROR_WHEN = {
    400: "INVALID_REQUEST: the request is malformed (details say what).",
    401: "UNAUTHORIZED: no API key, or an unknown, revoked or expired one (API_AUTH).",
    403: "FORBIDDEN: the API key lacks the scope or key prefix the request needs, or the client is blocked.",
    404: "NOT_FOUND: no such key.",
    408: "TIMEOUT: the request body did not arrive in time (REQUEST_BODY_TIMEOUT).",
    409: "VERSION_MISMATCH: If-Match names another version than the key's.",
    412: "PRECONDITION_FAILED: If-None-Match: * and the key exists.",
    413: "PAYLOAD_TOO_LARGE: the body or value is larger than the service accepts.",
    429: "RATE_LIMITED: too many requests; see Retry-After.",
    503: "SERVICE_UNAVAILABLE: a dependency (Redis, NATS, PostgreSQL) is unreachable; retry after Retry-After.",
}
# What any /v1/ request may get from the middleware before its view runs.
GATE = (400, 401, 403, 429, 503)
# And a request with a body, from the body reader.
BODY = (408, 413)


def error_body(status: int) -> dict[str, Any]:
    """The error body of a status: an Error whose code is the one that status always carries."""
    code = ERROR_WHEN[status].split(":", 1)[0]
    return {"allOf": [_ref("Error"), {"type": "object", "properties": {"code": {"type": "string", "enum": [code]}}}]}


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    return {
        status: OpenApiResponse(error_body(status), description=ERROR_WHEN[status]) for status in sorted(set(statuses))
    }


def _entry(description: str) -> OpenApiResponse:
    return OpenApiResponse(_ref("Entry"), description=description)


def _write(operation_id: str) -> Any:
    return extend_schema(
        operation_id=operation_id,
        summary="Write a key",
        description="Creates (201) or replaces (200) the entry. Durable before the answer: in Redis and in "
        "JetStream, persisted to PostgreSQL by the worker. POST and PUT are the same.",
        tags=["cache"],
        parameters=[KEY_IN_PATH, IF_MATCH, IF_NONE_MATCH, ETAG, *COMMON_HEADERS],
        request={"application/json": _ref("EntryWrite")},
        responses={
            200: _entry("Replaced."),
            201: _entry("Created."),
            **errors(*GATE, *BODY, 409, 412),
        },
    )


class CacheEntryApiSchema(OpenApiViewExtension):
    target_class = "cache_api.apis.CacheEntryApi"

    def view_replacement(self) -> Any:
        @extend_schema_view(
            get=extend_schema(
                operation_id="cache_entry_get",
                summary="Read a key",
                description="From Redis; on a miss from PostgreSQL (and put back in Redis).",
                tags=["cache"],
                parameters=[KEY_IN_PATH, ETAG, *COMMON_HEADERS],
                responses={200: _entry("The entry."), **errors(*GATE, 404)},
            ),
            post=_write("cache_entry_set"),
            put=_write("cache_entry_put"),
            delete=extend_schema(
                operation_id="cache_entry_delete",
                summary="Delete a key",
                description="Removed from Redis at once, from PostgreSQL by the worker (a versioned delete).",
                tags=["cache"],
                parameters=[KEY_IN_PATH, *COMMON_HEADERS],
                responses={204: OpenApiResponse(description="Deleted."), **errors(*GATE, 404)},
            ),
        )
        class Described(self.target_class):  # type: ignore[name-defined]
            pass

        return Described


class CacheEntryBatchGetApiSchema(OpenApiViewExtension):
    target_class = "cache_api.apis.CacheEntryBatchGetApi"

    def view_replacement(self) -> Any:
        @extend_schema_view(
            post=extend_schema(
                operation_id="cache_entries_get",
                summary="Read several keys",
                description="Needs the read scope. The answer's total size is capped (MAX_BATCH_RESPONSE_SIZE: 413).",
                tags=["cache"],
                parameters=COMMON_HEADERS,
                request={"application/json": _ref("BatchGetRequest")},
                responses={
                    200: OpenApiResponse(_ref("BatchGetResult"), description="Found entries and missing keys."),
                    **errors(*GATE, *BODY),
                },
            )
        )
        class Described(self.target_class):  # type: ignore[name-defined]
            pass

        return Described


class CacheEntryTouchApiSchema(OpenApiViewExtension):
    target_class = "cache_api.apis.CacheEntryTouchApi"

    def view_replacement(self) -> Any:
        @extend_schema_view(
            post=extend_schema(
                operation_id="cache_entry_touch",
                summary="Set a key's TTL",
                description="A versioned write of the TTL only: same value and metadata, a new version.",
                tags=["cache"],
                parameters=[KEY_IN_PATH, IF_MATCH, ETAG, *COMMON_HEADERS],
                request={"application/json": _ref("Touch")},
                responses={200: _entry("The entry with its new TTL and version."), **errors(*GATE, *BODY, 404, 409)},
            )
        )
        class Described(self.target_class):  # type: ignore[name-defined]
            pass

        return Described


class CacheEntryBatchSetApiSchema(OpenApiViewExtension):
    target_class = "cache_api.apis.CacheEntryBatchSetApi"

    def view_replacement(self) -> Any:
        @extend_schema_view(
            post=extend_schema(
                operation_id="cache_entries_set",
                summary="Write several keys",
                description="Validation first: an invalid entry, a duplicate key or a value too large refuses the "
                "whole batch (400/413, naming the entry in details.index and details.key) and nothing is written. "
                "Then every entry is written with its own version and made durable before the answer, which "
                "has one result per entry, in order. A per-key 503 means that write was not made (safe to retry).",
                tags=["cache"],
                parameters=COMMON_HEADERS,
                request={"application/json": _ref("BatchSetRequest")},
                responses={
                    200: OpenApiResponse(_ref("BatchSetResult"), description="One result per entry."),
                    **errors(*GATE, *BODY),
                },
            )
        )
        class Described(self.target_class):  # type: ignore[name-defined]
            pass

        return Described


class CacheEntryBatchDeleteApiSchema(OpenApiViewExtension):
    target_class = "cache_api.apis.CacheEntryBatchDeleteApi"

    def view_replacement(self) -> Any:
        @extend_schema_view(
            post=extend_schema(
                operation_id="cache_entries_delete",
                summary="Delete several keys",
                description="An invalid or duplicate key refuses the whole batch (400). Needs the delete scope.",
                tags=["cache"],
                parameters=COMMON_HEADERS,
                request={"application/json": _ref("BatchDeleteRequest")},
                responses={
                    200: OpenApiResponse(_ref("BatchDeleteResult"), description="One result per key."),
                    **errors(*GATE, *BODY),
                },
            )
        )
        class Described(self.target_class):  # type: ignore[name-defined]
            pass

        return Described


LIST_PARAMETERS = [
    OpenApiParameter(
        "prefix",
        {"type": "string", "pattern": r"^[A-Za-z0-9._:-]{0,255}$", "maxLength": 255},
        OpenApiParameter.QUERY,
        description="Only keys that start with it (key characters only). An API key confined to key prefixes "
        "may only list inside one of them (else 403).",
    ),
    OpenApiParameter(
        "cursor",
        {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,340}$"},
        OpenApiParameter.QUERY,
        description="Opaque: a previous page's next_cursor (anything else: 400).",
    ),
    OpenApiParameter(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
        OpenApiParameter.QUERY,
        description="Keys per page, 1 to 1000 (default 100).",
    ),
]


class CacheKeyListApiSchema(OpenApiViewExtension):
    target_class = "cache_api.apis.CacheKeyListApi"

    def view_replacement(self) -> Any:
        @extend_schema_view(
            get=extend_schema(
                operation_id="cache_keys_list",
                summary="List keys",
                description="Live keys in ascending byte order, a page at a time, from PostgreSQL's index. "
                "Read-your-writes: every write acknowledged before the request is in it (the request waits a "
                "few seconds at most for the worker; else 503 with details.reason persist_backlog). Unknown "
                "query parameters are refused (400).",
                tags=["cache"],
                parameters=[*LIST_PARAMETERS, *COMMON_HEADERS],
                responses={200: OpenApiResponse(_ref("KeyPage"), description="A page of keys."), **errors(*GATE)},
            )
        )
        class Described(self.target_class):  # type: ignore[name-defined]
            pass

        return Described


def _link(operation_id: str, key: str, description: str, **extra: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": {"key": key, **extra}, "description": description}


def links() -> dict[tuple[str, str, str], dict[str, Any]]:
    """OpenAPI links between the key operations ((path, method, status) -> links): where a key and
    its version come from for the next request. Client generators and schemathesis's stateful
    phase follow them (a written key can be read, replaced by version, touched and deleted; a
    deleted one is gone)."""
    from_body = {
        "GetEntry": _link("cache_entry_get", "$response.body#/key", "Read the entry written."),
        "ReplaceEntryIfMatch": _link(
            "cache_entry_put",
            "$response.body#/key",
            "Replace it only if it is still at this version.",
            **{"header.If-Match": "$response.body#/version"},
        ),
        "TouchEntry": _link("cache_entry_touch", "$response.body#/key", "Give it a new TTL."),
        "DeleteEntry": _link("cache_entry_delete", "$response.body#/key", "Delete it."),
    }
    entry = "/v1/cache/{key}"
    return {
        (entry, "post", "201"): from_body,
        (entry, "post", "200"): from_body,
        (entry, "put", "201"): from_body,
        (entry, "put", "200"): from_body,
        (entry, "get", "200"): {name: from_body[name] for name in ("TouchEntry", "DeleteEntry")},
        (f"{entry}/touch", "post", "200"): {name: from_body[name] for name in ("GetEntry", "DeleteEntry")},
        (entry, "delete", "204"): {
            "GetDeletedEntry": _link("cache_entry_get", "$request.path.key", "The deleted key reads as 404."),
        },
        ("/v1/cache", "get", "200"): {
            "GetFirstListed": _link("cache_entry_get", "$response.body#/keys/0", "Read the first key listed."),
        },
    }


def postprocess_schema(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """Add the components and the security schemes (bearer token and X-API-Key); every data-plane
    body is required (an empty one is 400)."""
    paths = result.get("paths", {})
    for item in paths.values():
        for operation in item.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation["requestBody"]["required"] = True
    for (path_, method, status), named in links().items():
        response = paths.get(path_, {}).get(method, {}).get("responses", {}).get(status)
        if response is not None:
            response["links"] = named
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(components())
    result["components"]["securitySchemes"] = {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (python manage.py apikey create NAME). With API_AUTH=auto and no key "
            "created yet, loopback clients need none.",
        },
        "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key."},
    }
    return result


# GET /v1/schema/ (JSON or YAML: ?format=json|yaml or Accept) and the Swagger UI page, whose JS and
# CSS are static files of drf-spectacular-sidecar (served by WhiteNoise): no CDN.
urlpatterns = [
    path("v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("v1/schema/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="schema-docs"),
]
