"""Service endpoints: `/`, `/health`, `/metrics`."""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import Callable

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from birbnest import metrics
from birbnest.errors import error_response, method_not_allowed
from ops import health

STARTED = time.time()

ENDPOINTS = [
    "POST /v1/cache/{key}",
    "PUT /v1/cache/{key}",
    "GET /v1/cache/{key}",
    "DELETE /v1/cache/{key}",
    "POST /v1/cache/batch/get",
    "POST /v1/cache/batch/set",
    "POST /v1/cache/batch/delete",
    "POST /v1/cache/{key}/touch",
    "GET /v1/cache?prefix=&cursor=&limit=",
    "GET /v1/schema/",
    "GET /v1/schema/docs/",
    "GET /health",
    "GET /metrics",
    "GET /metrics/prometheus",
    "GET|POST /admin/ratelimit",
    "GET /admin/",
]


def get_only(view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """GET (and HEAD) only; anything else gets the contract's 405 body."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return method_not_allowed(request, ["GET", "HEAD"])
        return view(request)

    return csrf_exempt(wrapper)


def json_response(body: object, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(body), status=status, content_type="application/json")


@get_only
def root(request: HttpRequest) -> HttpResponse:
    return json_response({"service": settings.SERVICE_NAME, "version": settings.VERSION, "endpoints": ENDPOINTS})


@get_only
def health_view(request: HttpRequest) -> HttpResponse:
    checks = health.run_checks()
    healthy = all(check["status"] == "healthy" for check in checks.values())
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "service": settings.SERVICE_NAME,
        "version": settings.VERSION,
        "uptime": round(time.time() - STARTED, 1),
        "checks": checks,
    }
    return json_response(body, status=200 if healthy else 503)


def _wants_prometheus(request: HttpRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept or "openmetrics" in accept


@get_only
def metrics_view(request: HttpRequest) -> HttpResponse:
    """JSON for humans and jq (always open); Prometheus text when the scraper asks for it."""
    if _wants_prometheus(request):
        return _prometheus(request)
    return json_response(metrics.summary())


@get_only
def prometheus_view(request: HttpRequest) -> HttpResponse:
    return _prometheus(request)


METRICS_REALM = 'Bearer realm="birb-nest-metrics"'


def _prometheus(request: HttpRequest) -> HttpResponse:
    """The Prometheus text, behind METRICS_TOKEN when one is set (by either route to it)."""
    token = settings.BIRB.metrics_token
    if token:
        scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not sent.strip():
            return error_response(
                401,
                "UNAUTHORIZED",
                "the Prometheus metrics need a bearer token: send Authorization: Bearer <METRICS_TOKEN>",
                headers={"WWW-Authenticate": METRICS_REALM},
            )
        # Constant time: a byte-by-byte compare would tell a prober how much of its guess was right.
        if not hmac.compare_digest(sent.strip().encode(), token.encode()):
            return error_response(
                401,
                "UNAUTHORIZED",
                "the bearer token is not METRICS_TOKEN",
                headers={"WWW-Authenticate": METRICS_REALM + ', error="invalid_token"'},
            )
    return HttpResponse(metrics.prometheus_text(), content_type="text/plain; version=0.0.4; charset=utf-8")
