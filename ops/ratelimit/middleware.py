"""The limiter on the data plane (`/v1/`): a thin middleware over the config cache and the counter."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from birbnest.errors import error_response
from birbnest.principal import principal_of
from ops.ratelimit.config import RateLimitConfig, _cache
from ops.ratelimit.limiter import Decision, ratelimit_check
from persistence import redis_store

logger = logging.getLogger(__name__)


DATA_PLANE_PREFIX = "/v1/"


ENTRY_PREFIX = "/v1/cache/"


NOT_AN_ENTRY = ("batch/get",)


def _entry_read_by(request: HttpRequest) -> str | None:
    """The key a ``GET /v1/cache/<key>`` will read (the view validates it), else None."""
    if request.method != "GET":
        return None
    path = request.path_info
    if not path.startswith(ENTRY_PREFIX):
        return None
    key = path[len(ENTRY_PREFIX) :]
    return key if key and key not in NOT_AN_ENTRY else None


def client_identity(request: HttpRequest) -> tuple[str, int | None]:
    """Who is counted, and the limit of their own if they have one.

    A request with an API key the access middleware verified is counted by the key's public id
    (its own rate limit, if it has one, overrides the global one and the operator's rules). Any
    other is counted by the peer's address: a key only becomes an identity once it is verified
    (counted by whatever a header said, a client escaped its limit and an operator's block by
    sending a new made-up key with every request).
    """
    principal = principal_of(request)
    if principal is not None:
        return principal.public_id, principal.rate_limit
    return request.META.get("REMOTE_ADDR") or "unknown", None


def _blocked_response() -> HttpResponse:
    return error_response(
        403,
        "FORBIDDEN",
        "this client is blocked by an operator; ask them to unblock it",
        {"blocked": True},
    )


def _limited_response(decision: Decision, config: RateLimitConfig) -> HttpResponse:
    return error_response(
        429,
        "RATE_LIMITED",
        f"rate limit of {decision.limit} requests per {config.window}s exceeded; retry in {decision.retry_after}s",
        {
            "limit": decision.limit,
            "window": config.window,
            "algorithm": config.algorithm,
            "remaining": 0,
            "reset": decision.reset,
            "retry_after": decision.retry_after,
        },
        headers=decision.headers(),
    )


def ratelimit_middleware(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    def middleware(request: HttpRequest) -> HttpResponse:
        if not request.path_info.startswith(DATA_PLANE_PREFIX):
            return get_response(request)
        config = _cache.get()
        if not config.active:  # the default: a prefix test and a clock read
            return get_response(request)
        client, own_limit = client_identity(request)
        # A block names a key's public id or an address: an address stays blocked whatever key it sends.
        if client in config.blocked or request.META.get("REMOTE_ADDR") in config.blocked:
            return _blocked_response()
        if not config.enabled:
            return get_response(request)
        decision = ratelimit_check(client=client, config=config, read_key=_entry_read_by(request), limit=own_limit)
        if decision is None:
            return get_response(request)
        if not decision.allowed:
            redis_store.prefetched_clear()
            return _limited_response(decision, config)
        try:
            response = get_response(request)
        finally:
            redis_store.prefetched_clear()
        for name, value in decision.headers().items():
            response[name] = value
        return response

    return middleware
