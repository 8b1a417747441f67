"""`GET|POST /admin/ratelimit`: read and change the rate-limit settings (the runbook's switch).

``POST`` takes any of ``{"enabled": bool, "limit": int >= 1, "window": seconds >= 1,
"algorithm": "fixed"|"sliding"}`` (partial updates; anything else is 400) and answers 200 with
the settings now in force, which every API process applies within a second. The body is read as
JSON whatever the Content-Type, so the runbook's ``curl -d '{"enabled": true, "limit": 10}'``
works once it carries a token.

Who may call it: operators only.

- An API key with the ``admin`` scope, as ``Authorization: Bearer <key>`` (or ``X-API-Key``);
  no CSRF (a key is not sent by a browser on its own). Make one with
  ``python manage.py apikey create NAME --scopes admin``. It may read and change the settings.
- Or the session of a logged-in staff user (the admin console), with Django's CSRF check:
  ``POST`` needs ``ops.change_ratelimitsettings``; ``GET`` also accepts
  ``ops.view_ratelimitsettings``.

No credentials, or a key that is unknown, revoked or expired → 401 ``UNAUTHORIZED``; a key
without the ``admin`` scope, a user without the permission, a session that is not staff, or a
failed CSRF check → 403 ``FORBIDDEN``. (The DRF authtokens this endpoint took before are gone:
migration ``ops.0005`` removed them and said how to re-issue them.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from birbnest.errors import error_response, method_not_allowed
from ops.access.keyring import current_keyring
from ops.access.middleware import CHALLENGE, presented_key
from ops.audit import audit_record
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


@dataclass(frozen=True)
class _Caller:
    """A staff user of the console, or an API key with the ``admin`` scope (which may do all)."""

    name: str
    actor: str  # as the audit log names callers: the username, or key:<public id>
    user: Any = None

    def may(self, permission: str) -> bool:
        return self.user is None or bool(self.user.has_perm(permission))


def _unauthorized(message: str) -> HttpResponse:
    response = error_response(401, "UNAUTHORIZED", message, None)
    response["WWW-Authenticate"] = CHALLENGE
    return response


def _by_key(token: str) -> tuple[_Caller | None, HttpResponse | None]:
    if token == "":
        return None, _unauthorized(
            "unsupported Authorization scheme; send 'Authorization: Bearer <key>' with an API key that has "
            "the 'admin' scope (python manage.py apikey create NAME --scopes admin)"
        )
    keyring = current_keyring()
    if keyring is None:
        return None, error_response(
            503,
            "SERVICE_UNAVAILABLE",
            "API keys could not be loaded (Redis and PostgreSQL unreachable); try again",
            {"dependency": "redis"},
            headers={"Retry-After": "1"},
        )
    principal = keyring.verify(token)
    if principal is None:
        return None, _unauthorized("the API key is unknown, revoked or expired")
    if "admin" not in principal.scopes:
        return None, error_response(
            403,
            "FORBIDDEN",
            f"API key {principal.public_id} lacks the 'admin' scope this endpoint needs",
            {"missing": "scope", "scope": "admin", "scopes": sorted(principal.scopes)},
        )
    return _Caller(name=f"key {principal.name} ({principal.public_id})", actor=f"key:{principal.public_id}"), None


def _authenticate(request: HttpRequest) -> tuple[_Caller | None, HttpResponse | None]:
    """(caller, None), or (None, the 401/403 answer)."""
    token = presented_key(request)
    if token is not None:
        return _by_key(token)
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None, _unauthorized(
            "authentication required: send 'Authorization: Bearer <key>' with an API key that has the 'admin' "
            "scope, or log in to the admin console"
        )
    if not user.is_staff:
        return None, error_response(403, "FORBIDDEN", "this endpoint is for staff users and admin API keys", None)
    if request.method == "POST":
        reason = _csrf_failure(request)
        if reason:
            return None, error_response(
                403,
                "FORBIDDEN",
                f"CSRF check failed: {reason}; send the X-CSRFToken header, or use an admin API key",
                {"reason": reason},
            )
    return _Caller(name=user.get_username(), actor=user.get_username(), user=user), None


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


@csrf_exempt  # a session is CSRF-checked in _authenticate; a key needs no check
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
    caller, failure = _authenticate(request)
    if caller is None:
        assert failure is not None
        return failure
    if request.method == "GET":
        if not (caller.may(VIEW_PERMISSION) or caller.may(CHANGE_PERMISSION)):
            return error_response(403, "FORBIDDEN", f"permission {VIEW_PERMISSION} required", None)
        return _settings_response(ratelimit_settings_get())
    if not caller.may(CHANGE_PERMISSION):
        return error_response(403, "FORBIDDEN", f"permission {CHANGE_PERMISSION} required", None)
    try:
        changes = _parse_changes(request.body)
        config = ratelimit_settings_update(**changes, by=caller.name)
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
    audit_record(action="ratelimit.change", target="settings", details=changes, request=request, actor=caller.actor)
    logger.info(
        "rate-limit settings changed by %s: %s",
        caller.name,
        ", ".join(f"{name}={changes[name]}" for name in FIELDS if name in changes) or "nothing",
    )
    return _settings_response(config)
