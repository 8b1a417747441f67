"""Unit tests of the error mapping: every contract code has its class, and odd answers still map."""

from __future__ import annotations

import pytest
from birbnest_client import errors

# The contract's codes (docs: "Errors always have the body {"error", "code", "details"}").
CONTRACT_CODES = {
    "NOT_FOUND": (errors.NotFound, 404),
    "INVALID_REQUEST": (errors.InvalidRequest, 400),
    "PAYLOAD_TOO_LARGE": (errors.PayloadTooLarge, 413),
    "VERSION_MISMATCH": (errors.VersionMismatch, 409),
    "PRECONDITION_FAILED": (errors.PreconditionFailed, 412),
    "RATE_LIMITED": (errors.RateLimited, 429),
    "UNAUTHORIZED": (errors.Unauthorized, 401),
    "FORBIDDEN": (errors.Forbidden, 403),
    "SERVICE_UNAVAILABLE": (errors.ServiceUnavailable, 503),
    "TIMEOUT": (errors.Timeout, 408),
    "INTERNAL_ERROR": (errors.InternalError, 500),
}


@pytest.mark.parametrize(("code", "expected"), CONTRACT_CODES.items())
def test_each_contract_code_raises_its_class(code: str, expected: tuple[type[errors.BirbNestError], int]) -> None:
    cls, status = expected
    error = errors.from_answer(status, {"error": f"it is {code}", "code": code, "details": {"k": 1}})
    assert type(error) is cls and isinstance(error, errors.BirbNestError)
    assert (error.message, error.code, error.status, error.details) == (f"it is {code}", code, status, {"k": 1})
    assert str(error) == f"it is {code}"


def test_every_code_is_mapped_and_nothing_else() -> None:
    assert set(errors.BY_CODE) == set(CONTRACT_CODES)


def test_retry_after_is_kept_on_429_and_503() -> None:
    limited = errors.from_answer(429, {"error": "slow", "code": "RATE_LIMITED", "details": None}, retry_after=7.0)
    assert isinstance(limited, errors.RateLimited) and limited.retry_after == 7.0
    down = errors.from_answer(503, {"error": "down", "code": "SERVICE_UNAVAILABLE"}, retry_after=1.0)
    assert isinstance(down, errors.ServiceUnavailable) and down.retry_after == 1.0


def test_answers_without_the_contract_body_map_by_status() -> None:
    # a proxy's HTML page, an empty body, an unknown code
    assert type(errors.from_answer(502, "<html>Bad Gateway</html>")) is errors.InternalError
    assert type(errors.from_answer(404, None)) is errors.NotFound
    assert type(errors.from_answer(418, {"error": "teapot", "code": "TEAPOT"})) is errors.InvalidRequest
    assert type(errors.from_answer(503, None)) is errors.ServiceUnavailable
    unknown = errors.from_answer(500, {"error": "boom", "code": "NEW_CODE"})
    assert type(unknown) is errors.InternalError and unknown.code == "NEW_CODE"


def test_an_answered_408_did_nothing_and_a_client_timeout_may_have() -> None:
    answered = errors.from_answer(408, {"error": "send the whole body at once", "code": "TIMEOUT"})
    assert isinstance(answered, errors.Timeout) and answered.request_sent is False and answered.status == 408
    assert errors.Timeout("timed out").request_sent is True
