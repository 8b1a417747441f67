"""The contract's error body, for every app: ``{"error": "<human message>", "code": "<CODE>", "details": ...}``.

Apps raise :class:`ApiError` for an answer they decide themselves, or build one with
:func:`error_response`; the data plane's mapping of domain errors to HTTP is in
``cache_api/errors.py``.
"""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpRequest, HttpResponse


class ApiError(Exception):
    """An error answered as it is: status, code, message, details."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        super().__init__(message)


def invalid(message: str, details: Any = None) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message, details)


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> HttpResponse:
    body = orjson.dumps({"error": message, "code": code, "details": details})
    response = HttpResponse(body, status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def json_404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return error_response(404, "NOT_FOUND", f"no such endpoint: {request.path}", {"path": request.path})


def json_400(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Django's own 400s (a Host header ALLOWED_HOSTS does not name, a suspicious request)."""
    return error_response(400, "INVALID_REQUEST", "bad request", None)


def json_500(request: HttpRequest) -> HttpResponse:
    return error_response(500, "INTERNAL_ERROR", "internal error", None)


def method_not_allowed(request: HttpRequest, allowed: list[str]) -> HttpResponse:
    response = error_response(405, "INVALID_REQUEST", f"method {request.method} not allowed", {"allowed": allowed})
    response["Allow"] = ", ".join(allowed)
    return response
