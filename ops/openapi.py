"""The service routes in the OpenAPI document: `/health`, `/metrics`, `/admin/ratelimit`.

They are plain Django views (not DRF's), so drf-spectacular does not find them: this
postprocessing hook (``SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]``) writes their paths as
they answer (:mod:`ops.views`, :mod:`ops.ratelimit.api`). The `Error` component they refer to is
the data plane's (cache_api/openapi.py, the hook before this one). The admin console's HTML
pages are not part of the API and are left out.
"""

from __future__ import annotations

from typing import Any

from ops.ratelimit.config import ALGORITHMS
from ops.ratelimit.services import MAX_INT

ERROR = {"$ref": "#/components/schemas/Error"}
CODE_OF = {400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 503: "SERVICE_UNAVAILABLE"}
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "required": True, "description": "Seconds to wait."}}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def _error(status: int, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An Error whose code is the one the status always carries."""
    code = {"type": "object", "properties": {"code": {"type": "string", "enum": [CODE_OF[status]]}}}
    return _json({"allOf": [ERROR, code]}, description, headers)


CHECK = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
        "latency_ms": {"type": "number"},
        "error": {"type": "string", "description": "Why it is unhealthy."},
    },
    "required": ["status", "latency_ms"],
}
HEALTH = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
        "service": {"type": "string"},
        "version": {"type": "string"},
        "uptime": {"type": "number", "description": "Seconds since this process started."},
        "checks": {
            "type": "object",
            "properties": {"database": CHECK, "redis": CHECK, "nats": CHECK},
            "required": ["database", "redis", "nats"],
        },
    },
    "required": ["status", "service", "version", "uptime", "checks"],
}
METRICS = {
    "type": "object",
    "description": "Summed over all server processes.",
    "properties": {
        "cache_hits": {"type": "integer", "minimum": 0},
        "cache_misses": {"type": "integer", "minimum": 0},
        "cache_hit_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "total_requests": {"type": "integer", "minimum": 0},
        "total_errors": {"type": "integer", "minimum": 0, "description": "Answers with a 5xx status."},
        "average_latency_ms": {"type": "number", "minimum": 0},
    },
    "required": [
        "cache_hits",
        "cache_misses",
        "cache_hit_rate",
        "total_requests",
        "total_errors",
        "average_latency_ms",
    ],
}
_COUNT = {"type": "integer", "minimum": 1, "maximum": MAX_INT}
RATELIMIT_SETTINGS = {
    "type": "object",
    "properties": {
        "enabled": {"type": "boolean"},
        "limit": {**_COUNT, "description": "Requests per window and client."},
        "window": {**_COUNT, "description": "Seconds."},
        "algorithm": {"type": "string", "enum": list(ALGORITHMS)},
        "overrides": {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "description": "Client (API key id or address) -> its own limit.",
        },
        "blocked": {"type": "array", "items": {"type": "string"}},
        "updated_at": {"type": "string", "nullable": True},
        "updated_by": {"type": "string"},
    },
    "required": ["enabled", "limit", "window", "algorithm", "overrides", "blocked", "updated_at", "updated_by"],
}
RATELIMIT_CHANGE = {
    "type": "object",
    "description": "Any of the fields (a partial update); the others keep their values.",
    "properties": {
        "enabled": {"type": "boolean"},
        "limit": _COUNT,
        "window": _COUNT,
        "algorithm": {"type": "string", "enum": list(ALGORITHMS)},
    },
    "additionalProperties": False,
    "example": {"enabled": True, "limit": 10, "window": 60},
}
ADMIN_AUTH_ERRORS = {
    "401": _error(
        401,
        "UNAUTHORIZED: no credentials, or an unknown, revoked or expired API key.",
        {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
    ),
    "403": _error(403, "FORBIDDEN: the key lacks the admin scope, or the console user the permission (or CSRF)."),
    "503": _error(503, "SERVICE_UNAVAILABLE: PostgreSQL or Redis unreachable.", RETRY_AFTER),
}
OPEN: list[dict[str, list[str]]] = []  # no security requirement: open to every client


def paths() -> dict[str, Any]:
    return {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Health of the service and its three servers",
                "tags": ["service"],
                "security": OPEN,
                "responses": {
                    "200": _json(HEALTH, "All checks healthy."),
                    "503": _json(HEALTH, "At least one check unhealthy."),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Request and cache counters (JSON)",
                "description": "JSON for humans and jq. A scraper that asks for text/plain or OpenMetrics "
                "(Accept) gets the Prometheus text instead, as at /metrics/prometheus (which may need the "
                "METRICS_TOKEN bearer token).",
                "tags": ["service"],
                "security": OPEN,
                "responses": {
                    "200": {
                        "description": "The counters.",
                        "content": {
                            "application/json": {"schema": METRICS},
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    },
                    "401": _error(
                        401,
                        "UNAUTHORIZED: the Prometheus text was asked for and METRICS_TOKEN is set.",
                        {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
                    ),
                },
            }
        },
        "/admin/ratelimit": {
            "get": {
                "operationId": "ratelimit_settings_get",
                "summary": "The rate-limit settings in force",
                "description": "For operators: an API key with the admin scope, or a staff session.",
                "tags": ["admin"],
                "responses": {"200": _json(RATELIMIT_SETTINGS, "The settings."), **ADMIN_AUTH_ERRORS},
            },
            "post": {
                "operationId": "ratelimit_settings_update",
                "summary": "Change the rate-limit settings",
                "description": "Takes effect on every API process within a second. For operators: an API key "
                "with the admin scope, or a staff session (with CSRF).",
                "tags": ["admin"],
                "requestBody": {"required": True, "content": {"application/json": {"schema": RATELIMIT_CHANGE}}},
                "responses": {
                    "200": _json(RATELIMIT_SETTINGS, "The settings now in force."),
                    "400": _error(400, "INVALID_REQUEST: not a JSON object, an unknown field or a bad value."),
                    **ADMIN_AUTH_ERRORS,
                },
            },
        },
    }


def postprocess_schema(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    result.setdefault("paths", {}).update(paths())
    tags = {tag["name"] for tag in result.get("tags", [])}
    result["tags"] = [
        *result.get("tags", []),
        *(
            tag
            for tag in (
                {"name": "cache", "description": "The data plane: JSON values by key (/v1/)."},
                {"name": "service", "description": "Health and metrics (open, no key)."},
                {"name": "admin", "description": "Operators only."},
            )
            if tag["name"] not in tags
        ),
    ]
    return result
