"""The data plane's one mapping of errors to HTTP: domain errors (persistence/errors.py), the
errors the API raises itself (:class:`birbnest.errors.ApiError`) and DRF's, each to the
contract's error body (built by :mod:`birbnest.errors`)."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse
from rest_framework import exceptions as drf

from birbnest.errors import ApiError, error_response
from persistence.errors import (
    BatchTooLargeError,
    KeyNotFoundError,
    PayloadTooLargeError,
    PreconditionFailedError,
    ServiceUnavailableError,
    VersionMismatchError,
)

logger = logging.getLogger(__name__)


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
    if isinstance(error, PreconditionFailedError):
        return error_response(
            412,
            "PRECONDITION_FAILED",
            f"key '{error.key}' exists (version {error.current}); If-None-Match: * writes only a key that does not",
            {"key": error.key, "current": error.current},
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
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return error_response(
            413, "PAYLOAD_TOO_LARGE", f"request body is larger than {limit} bytes", {"max_body_size": limit}
        )
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
