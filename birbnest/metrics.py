"""Request and cache metrics, summed over every API process.

prometheus_client's multiprocess mode keeps each process's values in files under
``PROMETHEUS_MULTIPROC_DIR`` (set by `manage.py runapi` before the server forks); both the JSON
view and the Prometheus text view read all of them.

``http_requests_total{method,status}`` and ``http_request_duration_seconds{method}`` by default;
with ``FEATURE_METRICS_DETAILED`` both are labelled ``{method,route,status}``. Every label value
comes from a fixed set: ``route`` is the URL pattern's name (``cache-entry``, ``health``,
``admin:index``), never the path, ``unmatched`` for a path no named pattern serves, and a method
outside HTTP's own is counted as ``other``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import resolve
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
UNMATCHED = "unmatched"
CACHE_HITS = Counter("cache_hits", "Reads answered from Redis")
CACHE_MISSES = Counter("cache_misses", "Reads that went to PostgreSQL")
_http: tuple[Counter, Histogram, bool] | None = None


def http_metrics() -> tuple[Counter, Histogram, bool]:
    """The two HTTP metrics, labelled as ``FEATURE_METRICS_DETAILED`` says (made once per process)."""
    global _http
    if _http is None:
        detailed = settings.BIRB.feature_metrics_detailed
        labels = ["method", "route", "status"] if detailed else ["method", "status"]
        _http = (
            Counter("http_requests", "HTTP requests served", labels),
            Histogram(
                "http_request_duration_seconds",
                "Time to answer an HTTP request",
                labels if detailed else ["method"],
                buckets=DURATION_BUCKETS,
            ),
            detailed,
        )
    return _http


def route_of(request: HttpRequest) -> str:
    """The name of the URL pattern that served ``request`` (a bounded set), or ``unmatched``."""
    match = getattr(request, "resolver_match", None)
    if match is None:  # answered before the view (429, 401, 408): resolve the path for the label
        try:
            match = resolve(request.path_info)
        except Exception:  # Resolver404, or a path the resolver cannot take: still just a label
            return UNMATCHED
    return match.view_name if match.url_name else UNMATCHED


def metrics_middleware(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    http_requests, http_duration, detailed = http_metrics()
    # The labelled children, looked up once per label set instead of on every request.
    durations: dict[Any, Any] = {}
    requests: dict[Any, Any] = {}

    def middleware(request: HttpRequest) -> HttpResponse:
        start = time.perf_counter()
        response = get_response(request)
        method = request.method if request.method in METHODS else "other"
        status = response.status_code
        duration = durations.get(method) or durations.setdefault(method, http_duration.labels(method))
        duration.observe(time.perf_counter() - start)
        counter = requests.get((method, status)) or requests.setdefault(
            (method, status), http_requests.labels(method, str(status))
        )
        counter.inc()
        return response

    def detailed_middleware(request: HttpRequest) -> HttpResponse:
        start = time.perf_counter()
        response = get_response(request)
        elapsed = time.perf_counter() - start
        labels = (request.method if request.method in METHODS else "other", route_of(request), response.status_code)
        children = requests.get(labels)
        if children is None:
            method, route, status = labels
            children = requests.setdefault(
                labels,
                (http_requests.labels(method, route, str(status)), http_duration.labels(method, route, str(status))),
            )
        children[0].inc()
        children[1].observe(elapsed)
        return response

    return detailed_middleware if detailed else middleware


def registry() -> Any:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        aggregated = CollectorRegistry()
        MultiProcessCollector(aggregated)
        return aggregated
    return DEFAULT_REGISTRY


def prometheus_text() -> bytes:
    return generate_latest(registry())


def summary() -> dict[str, Any]:
    """The JSON of `GET /metrics` (the runbook's `jq` queries read these names)."""
    totals = {"hits": 0.0, "misses": 0.0, "requests": 0.0, "errors": 0.0, "latency_sum": 0.0, "latency_count": 0.0}
    for family in registry().collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "cache_hits_total":
                totals["hits"] += value
            elif name == "cache_misses_total":
                totals["misses"] += value
            elif name == "http_requests_total":
                totals["requests"] += value
                if labels.get("status", "").startswith("5"):
                    totals["errors"] += value
            elif name == "http_request_duration_seconds_sum":
                totals["latency_sum"] += value
            elif name == "http_request_duration_seconds_count":
                totals["latency_count"] += value
    reads = totals["hits"] + totals["misses"]
    return {
        "cache_hits": int(totals["hits"]),
        "cache_misses": int(totals["misses"]),
        "cache_hit_rate": round(totals["hits"] / reads, 4) if reads else 0.0,
        "total_requests": int(totals["requests"]),
        "total_errors": int(totals["errors"]),
        "average_latency_ms": round(totals["latency_sum"] / totals["latency_count"] * 1000, 3)
        if totals["latency_count"]
        else 0.0,
    }
