"""Request and cache metrics, summed over every API process.

prometheus_client's multiprocess mode keeps each process's values in files under
``PROMETHEUS_MULTIPROC_DIR`` (set by `manage.py runapi` before the server forks); both the JSON
view and the Prometheus text view read all of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

HTTP_REQUESTS = Counter("http_requests", "HTTP requests served", ["method", "status"])
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CACHE_HITS = Counter("cache_hits", "Reads answered from Redis")
CACHE_MISSES = Counter("cache_misses", "Reads that went to PostgreSQL")


def metrics_middleware(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    # The labelled children, looked up once per (method, status) instead of on every request.
    durations: dict[Any, Any] = {}
    requests: dict[Any, Any] = {}

    def middleware(request: HttpRequest) -> HttpResponse:
        start = time.perf_counter()
        response = get_response(request)
        method, status = request.method, response.status_code
        duration = durations.get(method) or durations.setdefault(method, HTTP_DURATION.labels(method))
        duration.observe(time.perf_counter() - start)
        counter = requests.get((method, status)) or requests.setdefault(
            (method, status), HTTP_REQUESTS.labels(method, str(status))
        )
        counter.inc()
        return response

    return middleware


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
