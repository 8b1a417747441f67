"""The contract's error body, and the one exception handler that maps errors to it.

``{"error": "<human message>", "code": "<CODE>", "details": ...}``
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from rest_framework import exceptions as drf

from persistence.errors import (
    BatchTooLargeError,
    KeyNotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    VersionMismatchError,
)

logger = logging.getLogger(__name__)


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


def to_response(error: Exception) -> HttpResponse | None:
    """Map a domain or DRF error to the contract's body; None for anything unexpected."""
    if isinstance(error, ApiError):
        return error_response(error.status, error.code, error.message, error.details)
    if isinstance(error, KeyNotFoundError):
        return error_response(404, "NOT_FOUND", f"key '{error.key}' not found", {"key": error.key})
    if isinstance(error, VersionMismatchError):
        return error_response(
            409,
            "VERSION_MISMATCH",
            f"key '{error.key}' is at version {error.current}, not {error.expected}",
            {"key": error.key, "expected_version": error.expected, "current_version": error.current},
        )
    if isinstance(error, ServiceUnavailableError):
        details = {"dependency": error.dependency, **(error.details or {})}
        return error_response(503, "SERVICE_UNAVAILABLE", error.message, details, headers={"Retry-After": "1"})
    if isinstance(error, PayloadTooLargeError):
        return error_response(
            413,
            "PAYLOAD_TOO_LARGE",
            f"the write (value, metadata and key) takes up to {error.size} bytes as a stream message; the "
            f"message broker accepts {error.limit}: send a smaller value or metadata",
            {"size": error.size, "max_message_size": error.limit},
        )
    if isinstance(error, BatchTooLargeError):
        return error_response(
            413,
            "PAYLOAD_TOO_LARGE",
            f"the entries asked for hold at least {error.size} bytes; a batch answer carries at most {error.limit} "
            "(MAX_BATCH_RESPONSE_SIZE): ask for fewer keys at a time",
            {"size_at_least": error.size, "max_batch_response_size": error.limit},
        )
    if isinstance(error, RequestDataTooBig):
        return error_response(413, "PAYLOAD_TOO_LARGE", "request body is too large", None)
    if isinstance(error, drf.MethodNotAllowed):
        return error_response(405, "INVALID_REQUEST", str(error.detail), None)
    if isinstance(error, drf.NotFound):
        return error_response(404, "NOT_FOUND", "not found", None)
    if isinstance(error, drf.APIException):
        return error_response(error.status_code, "INVALID_REQUEST", str(error.detail), None)
    return None


def exception_handler(error: Exception, context: dict[str, Any]) -> HttpResponse | None:
    """DRF's EXCEPTION_HANDLER."""
    response = to_response(error)
    if response is not None and isinstance(error, drf.MethodNotAllowed):
        view = context.get("view")
        if view is not None:
            response["Allow"] = ", ".join(view.allowed_methods)
    return response


def json_404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return error_response(404, "NOT_FOUND", f"no such endpoint: {request.path}", {"path": request.path})


def json_500(request: HttpRequest) -> HttpResponse:
    return error_response(500, "INTERNAL_ERROR", "internal error", None)


def method_not_allowed(request: HttpRequest, allowed: list[str]) -> HttpResponse:
    response = error_response(405, "INVALID_REQUEST", f"method {request.method} not allowed", {"allowed": allowed})
    response["Allow"] = ", ".join(allowed)
    return response
