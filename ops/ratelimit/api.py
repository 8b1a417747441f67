"""`GET|POST /admin/ratelimit`: read and change the rate-limit settings (the runbook's switch).

``POST`` takes any of ``{"enabled": bool, "limit": int >= 1, "window": seconds >= 1,
"algorithm": "fixed"|"sliding"}`` (partial updates; anything else is 400) and answers 200 with
the settings now in force, which every API process applies within a second. The body is read as
JSON whatever the Content-Type, so the runbook's ``curl -d '{"enabled": true, "limit": 10}'``
works once it carries a token.

Who may call it: operators only.

- ``Authorization: Token <key>`` (or ``Bearer <key>``) with a DRF authtoken of an active user;
  no CSRF (a token is not sent by a browser on its own). Operators get one with
  ``python manage.py drf_create_token <username>``.
- Or the session of a logged-in staff user (the admin console), with Django's CSRF check.

``POST`` needs ``ops.change_ratelimitsettings``; ``GET`` also accepts
``ops.view_ratelimitsettings``. No credentials or a bad token → 401 ``UNAUTHORIZED``; a user
without the permission, a session that is not staff, or a failed CSRF check → 403 ``FORBIDDEN``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError
from rest_framework.authtoken.models import Token

from birbnest.errors import error_response, method_not_allowed
from ops.ratelimit import RateLimitConfig, RateLimitSettingsError, ratelimit_settings_get, ratelimit_settings_update

logger = logging.getLogger(__name__)

FIELDS = ("enabled", "limit", "window", "algorithm")
CHANGE_PERMISSION = "ops.change_ratelimitsettings"
VIEW_PERMISSION = "ops.view_ratelimitsettings"


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request: HttpRequest, reason: str) -> Any:
        return reason  # the reason, instead of Django's HTML page


def _csrf_failure(request: HttpRequest) -> str | None:
    check = _CsrfCheck(lambda request: HttpResponse())
    check.process_request(request)  # reads the CSRF cookie into request.META
    # As DRF's CSRFCheck: no view callback (Django only looks on it for csrf_exempt), and _reject
    # above makes the answer the reason or None. django-stubs types neither of these uses.
    return check.process_view(request, None, (), {})  # type: ignore[arg-type,return-value]


def _unauthorized(message: str) -> HttpResponse:
    response = error_response(401, "UNAUTHORIZED", message, None)
    response["WWW-Authenticate"] = 'Token realm="birb-nest"'
    return response


def _authenticate(request: HttpRequest) -> tuple[Any, HttpResponse | None]:
    """(user, None), or (None, the 401/403 answer)."""
    authorization = request.META.get("HTTP_AUTHORIZATION", "")
    if authorization:
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() not in ("token", "bearer") or not key:
            return None, _unauthorized("unsupported Authorization header; send 'Authorization: Token <key>'")
        token = Token.objects.select_related("user").filter(key=key).first()
        if token is None or not token.user.is_active:
            return None, _unauthorized("invalid token; create one with 'manage.py drf_create_token <username>'")
        return token.user, None
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None, _unauthorized(
            "authentication required: send 'Authorization: Token <key>' or log in to the admin console"
        )
    if not user.is_staff:
        return None, error_response(403, "FORBIDDEN", "this endpoint is for staff users and operator tokens", None)
    if request.method == "POST":
        reason = _csrf_failure(request)
        if reason:
            return None, error_response(
                403,
                "FORBIDDEN",
                f"CSRF check failed: {reason}; send the X-CSRFToken header, or use an operator token",
                {"reason": reason},
            )
    return user, None


def _settings_response(config: RateLimitConfig) -> HttpResponse:
    response = HttpResponse(orjson.dumps(config.as_dict()), content_type="application/json")
    response["Cache-Control"] = "no-store"
    return response


def _parse_changes(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body or b"")
    except orjson.JSONDecodeError as error:
        raise RateLimitSettingsError("body", body[:100].decode(errors="replace"), f"a JSON object ({error})") from None
    if not isinstance(data, dict):
        raise RateLimitSettingsError("body", data, "a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RateLimitSettingsError("fields", unknown, "only " + ", ".join(FIELDS))
    for name, value in data.items():
        if value is None:  # the service reads None as "leave as is"; here it is a mistake
            raise RateLimitSettingsError(name, value, "a value (leave the field out to keep it)")
    return data


@csrf_exempt  # a session is CSRF-checked in _authenticate; a token needs no check
def ratelimit_settings_api(request: HttpRequest) -> HttpResponse:
    if request.method not in ("GET", "POST"):
        return method_not_allowed(request, ["GET", "POST"])
    try:
        return _handle(request)
    except DatabaseError as error:
        logger.warning("rate-limit settings unavailable: PostgreSQL unreachable", extra={"error": str(error)})
        return error_response(
            503,
            "SERVICE_UNAVAILABLE",
            "PostgreSQL is unreachable; the rate-limit settings cannot be read or changed now",
            {"dependency": "database"},
            headers={"Retry-After": "1"},
        )


def _handle(request: HttpRequest) -> HttpResponse:
    user, failure = _authenticate(request)
    if failure is not None:
        return failure
    if request.method == "GET":
        if not (user.has_perm(VIEW_PERMISSION) or user.has_perm(CHANGE_PERMISSION)):
            return error_response(403, "FORBIDDEN", f"permission {VIEW_PERMISSION} required", None)
        return _settings_response(ratelimit_settings_get())
    if not user.has_perm(CHANGE_PERMISSION):
        return error_response(403, "FORBIDDEN", f"permission {CHANGE_PERMISSION} required", None)
    try:
        changes = _parse_changes(request.body)
        config = ratelimit_settings_update(**changes, by=user.get_username())
    except RateLimitSettingsError as error:
        return error_response(400, "INVALID_REQUEST", str(error), {"field": error.name, "expected": error.expected})
    except RedisError as error:
        logger.warning("rate-limit settings saved but not published: Redis unreachable", extra={"error": str(error)})
        return error_response(
            503,
            "SERVICE_UNAVAILABLE",
            "the settings are saved in PostgreSQL but could not be applied: Redis is unreachable; "
            "send the request again once Redis is back",
            {"dependency": "redis"},
            headers={"Retry-After": "1"},
        )
    logger.info(
        "rate-limit settings changed by %s: %s",
        user.get_username(),
        ", ".join(f"{name}={changes[name]}" for name in FIELDS if name in changes) or "nothing",
    )
    return _settings_response(config)
