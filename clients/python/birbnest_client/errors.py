"""Exceptions: one class per error code of the Birb Nest contract, all under :class:`BirbNestError`.

The service answers every error with ``{"error": message, "code": CODE, "details": …}``; the
client raises the class named after ``CODE`` with the message, code, HTTP status and details.
Transport failures (no answer at all) are :class:`ConnectionFailed` or, for a timeout,
:class:`Timeout`; both say whether the request may have reached the service (``request_sent``).
"""

from __future__ import annotations

from typing import Any


class BirbNestError(Exception):
    """Base class of every error the client raises.

    ``code`` is the contract's error code (``"NOT_FOUND"``…), ``status`` the HTTP status (None
    when no answer came), ``details`` the answer's ``details`` (often a dict naming the field).
    """

    code: str = "ERROR"

    def __init__(self, message: str, code: str | None = None, status: int | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.status = status
        self.details = details
        #: In ``set_many`` / ``delete_many``: the results of the chunks (requests of up to
        #: ``max_batch_keys``) that were written before the one that raised this error.
        self.completed: list[Any] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, status={self.status!r})"


class NotFound(BirbNestError):
    """404 ``NOT_FOUND``: the key does not exist (or has expired)."""

    code = "NOT_FOUND"


class InvalidRequest(BirbNestError):
    """400 ``INVALID_REQUEST``: bad key, value, TTL, header or body. Also raised by the client
    itself, before sending, for a key outside ``[A-Za-z0-9._:-]{1,255}`` (status None)."""

    code = "INVALID_REQUEST"


class PayloadTooLarge(BirbNestError):
    """413 ``PAYLOAD_TOO_LARGE``: value over ``MAX_VALUE_SIZE``, or a batch answer over its cap."""

    code = "PAYLOAD_TOO_LARGE"


class VersionMismatch(BirbNestError):
    """409 ``VERSION_MISMATCH``: ``If-Match`` named a version the key is no longer at."""

    code = "VERSION_MISMATCH"


class PreconditionFailed(BirbNestError):
    """412 ``PRECONDITION_FAILED``: a create-only write (``If-None-Match: *``) found the key."""

    code = "PRECONDITION_FAILED"


class _RetryAfter(BirbNestError):
    def __init__(
        self,
        message: str,
        code: str | None = None,
        status: int | None = None,
        details: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code, status, details)
        #: Seconds the service asked the client to wait (``Retry-After``), or None.
        self.retry_after = retry_after


class RateLimited(_RetryAfter):
    """429 ``RATE_LIMITED``: too many requests; ``retry_after`` seconds until the next window."""

    code = "RATE_LIMITED"


class Unauthorized(BirbNestError):
    """401 ``UNAUTHORIZED``: no API key, or an unknown / expired one."""

    code = "UNAUTHORIZED"


class Forbidden(BirbNestError):
    """403 ``FORBIDDEN``: the API key lacks the scope, or the key is outside its prefixes."""

    code = "FORBIDDEN"


class ServiceUnavailable(_RetryAfter):
    """503 ``SERVICE_UNAVAILABLE``: a dependency (Redis, NATS, PostgreSQL) is down. On a write it
    means the write was not acknowledged (not made durable). ``retry_after`` from the answer."""

    code = "SERVICE_UNAVAILABLE"


class Timeout(BirbNestError):
    """``TIMEOUT``: the service answered 408 (it did not read the body: too slow, or no request
    thread free to read it), or the client timed out (status None). ``request_sent`` False: the
    call certainly did nothing (no connection was made, or the service's 408); True: it may have
    been applied."""

    code = "TIMEOUT"

    def __init__(
        self,
        message: str,
        code: str | None = None,
        status: int | None = None,
        details: Any = None,
        request_sent: bool = True,
    ) -> None:
        super().__init__(message, code, status, details)
        self.request_sent = request_sent


class InternalError(BirbNestError):
    """500 ``INTERNAL_ERROR`` (or any other 5xx / unknown code): a bug or an unexpected failure."""

    code = "INTERNAL_ERROR"


class ConnectionFailed(BirbNestError):
    """No answer: the connection could not be made or broke (after the allowed retries).

    ``request_sent`` False: the connection was never established, so the request certainly did
    nothing. True: the request may have reached the service, and a write may have been applied.
    """

    code = "CONNECTION_FAILED"

    def __init__(
        self,
        message: str,
        code: str | None = None,
        status: int | None = None,
        details: Any = None,
        request_sent: bool = True,
    ) -> None:
        super().__init__(message, code, status, details)
        self.request_sent = request_sent


#: The contract's codes and the class each one raises.
BY_CODE: dict[str, type[BirbNestError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        InvalidRequest,
        PayloadTooLarge,
        VersionMismatch,
        PreconditionFailed,
        RateLimited,
        Unauthorized,
        Forbidden,
        ServiceUnavailable,
        Timeout,
        InternalError,
    )
}

_BY_STATUS: dict[int, type[BirbNestError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: InvalidRequest,
    408: Timeout,
    409: VersionMismatch,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_class(code: str | None, status: int) -> type[BirbNestError]:
    """The class for an answer's ``code`` (or, for an answer without one, its HTTP status)."""
    if code in BY_CODE:
        return BY_CODE[code]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalError if status >= 500 else InvalidRequest


def from_answer(status: int, body: Any, retry_after: float | None = None) -> BirbNestError:
    """The exception for an error answer: its status, its decoded JSON body (or anything else)."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message: str = body["error"]
        code = body.get("code") if isinstance(body.get("code"), str) else None
        details = body.get("details")
    else:
        message, code, details = f"HTTP {status}", None, body
    cls = error_class(code, status)
    code = code or cls.code
    if issubclass(cls, _RetryAfter):
        return cls(message, code, status, details, retry_after=retry_after)
    if cls is Timeout:
        # An answered 408: the service did not read the body, so the request was not handled.
        return Timeout(message, code, status, details, request_sent=False)
    return cls(message, code, status, details)


__all__ = [
    "BY_CODE",
    "BirbNestError",
    "ConnectionFailed",
    "Forbidden",
    "InternalError",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RateLimited",
    "ServiceUnavailable",
    "Timeout",
    "Unauthorized",
    "VersionMismatch",
    "error_class",
    "from_answer",
]
