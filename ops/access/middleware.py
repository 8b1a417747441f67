"""API keys on the data plane (`/v1/`): who may call it, and with which scopes.

``API_AUTH``:

- ``auto`` (the default), Redis's protected mode: while no API key exists, only loopback clients
  are served without one (a fresh ``make run`` and the runbook's ``curl localhost`` lines work),
  and only when their ``Host`` header, if any, names loopback too (``localhost``, ``127.0.0.1``:
  a page whose site name a DNS rebinding pointed at 127.0.0.1 is refused); others get 401 saying
  how to make a key. Once a key exists (revoked and expired ones count),
  every request needs one.
- ``required``: every request needs a key.
- ``off``: no checks at all (``runapi`` logs a warning at start).

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. No key → 401
``UNAUTHORIZED`` with ``WWW-Authenticate: Bearer``; an unknown, revoked or expired key → 401
(the same answer for all three); a key without the scope the method needs (GET, HEAD and a batch
get: ``read``; POST, PUT, PATCH: ``write``; DELETE and a batch delete: ``delete``) → 403 ``FORBIDDEN`` naming it.
The key's prefixes are checked by the views (:func:`birbnest.principal.require_keys`), which
see a batch's keys. Keys are checked in process against :mod:`ops.access.keyring`: no database
query, no Redis round trip on the request path.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import DisallowedHost, MiddlewareNotUsed
from django.http import HttpRequest, HttpResponse

from birbnest.errors import error_response
from birbnest.principal import ATTRIBUTE, Principal
from ops.access.keyring import current_keyring, note_used

logger = logging.getLogger(__name__)

DATA_PLANE_PREFIX = "/v1/"
# The OpenAPI document and its Swagger UI page reveal no data: open without a key.
SCHEMA_PREFIX = "/v1/schema/"
BATCH_GET_PATH = "/v1/cache/batch/get"
BATCH_DELETE_PATH = "/v1/cache/batch/delete"
SCOPE_BY_METHOD = {"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write", "PATCH": "write", "DELETE": "delete"}
CHALLENGE = 'Bearer realm="birb-nest"'
HOW_TO_MAKE_A_KEY = "create one with 'python manage.py apikey create NAME' and send it as 'Authorization: Bearer <key>'"


@lru_cache(maxsize=1024)
def is_local_name(host: str | None) -> bool:
    """Whether a Host header names this machine's loopback (``localhost``, ``127.0.0.1:8080``,
    ``[::1]``), or is absent. A web page whose site name a DNS rebinding pointed at 127.0.0.1 makes
    the browser send that name: such a request must not pass as a loopback client's while no key
    exists. (A browser always sends Host; a request without one is not from a page.)"""
    if host is None:
        return True
    if host.startswith("["):  # [::1]:8080
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host  # a bare IPv6 has several
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


@lru_cache(maxsize=1024)
def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def presented_key(request: HttpRequest) -> str | None:
    """The key the request sends, '' for an Authorization header of another kind, None for none."""
    authorization = request.META.get("HTTP_AUTHORIZATION")
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        return credentials.strip() if scheme.lower() == "bearer" else ""
    api_key = request.META.get("HTTP_X_API_KEY")
    return api_key.strip() if api_key is not None else None


def scope_needed(request: HttpRequest) -> str | None:
    if request.method == "POST" and request.path_info == BATCH_GET_PATH:
        return "read"
    if request.method == "POST" and request.path_info == BATCH_DELETE_PATH:
        return "delete"
    return SCOPE_BY_METHOD.get(request.method or "")


def _unauthorized(message: str, error: str | None = None) -> HttpResponse:
    challenge = f'{CHALLENGE}, error="{error}"' if error else CHALLENGE
    return error_response(401, "UNAUTHORIZED", message, None, headers={"WWW-Authenticate": challenge})


def _unavailable() -> HttpResponse:
    return error_response(
        503,
        "SERVICE_UNAVAILABLE",
        "API keys could not be loaded (Redis and PostgreSQL unreachable); try again",
        {"dependency": "redis", "reason": "keys_unavailable"},
        headers={"Retry-After": "1"},
    )


def _missing_scope(principal: Principal, scope: str) -> HttpResponse:
    return error_response(
        403,
        "FORBIDDEN",
        f"API key {principal.public_id} lacks the '{scope}' scope this request needs",
        {"missing": "scope", "scope": scope, "scopes": sorted(principal.scopes)},
    )


def check_request(request: HttpRequest, mode: str) -> HttpResponse | None:
    """None when the request may go on (with its principal set on it); else the answer."""
    keyring = current_keyring()
    token = presented_key(request)
    if token is None:
        if keyring is None:
            return _unavailable()
        if mode == "auto" and not keyring.any_key:
            if is_loopback(request.META.get("REMOTE_ADDR", "")) and is_local_name(request.META.get("HTTP_HOST")):
                return None
            return _unauthorized("no API key exists yet, so only loopback clients are served; " + HOW_TO_MAKE_A_KEY)
        return _unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if token == "":
        return _unauthorized("unsupported Authorization scheme; send 'Authorization: Bearer <key>'", "invalid_request")
    if keyring is None:
        return _unavailable()
    principal = keyring.verify(token)
    if principal is None:
        return _unauthorized("the API key is unknown, revoked or expired", "invalid_token")
    scope = scope_needed(request)
    if scope is not None and scope not in principal.scopes:
        return _missing_scope(principal, scope)
    setattr(request, ATTRIBUTE, principal)
    note_used(principal.public_id)
    return None


def _bad_host(request: HttpRequest) -> HttpResponse | None:
    try:
        request.get_host()
    except DisallowedHost:
        host = request.META.get("HTTP_HOST", "")[:255]
        return error_response(
            400,
            "INVALID_REQUEST",
            "the Host header names no host this service answers for (ALLOWED_HOSTS)",
            {"host": host},
        )
    return None


def access_middleware(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """The data plane's gate: the Host header (when ``ALLOWED_HOSTS`` names hosts; Django checks it
    only where something reads it, and nothing else on `/v1/` does), then the key."""
    mode = settings.BIRB.api_auth
    check_host = "*" not in settings.ALLOWED_HOSTS
    if mode == "off" and not check_host:
        raise MiddlewareNotUsed("API_AUTH=off: /v1/ is open to every client")

    def middleware(request: HttpRequest) -> HttpResponse:
        if not request.path_info.startswith(DATA_PLANE_PREFIX) or request.path_info.startswith(SCHEMA_PREFIX):
            return get_response(request)
        refused = _bad_host(request) if check_host else None
        if refused is None and mode != "off":
            refused = check_request(request, mode)
        return refused if refused is not None else get_response(request)

    return middleware
