"""`/`, `/health`, `/metrics` on a real API, and the commands that are ours."""

from __future__ import annotations

import httpx
import pytest
from django.core.management import get_commands

from tests.conftest import unique_key

pytestmark = pytest.mark.django_db(transaction=True)


def test_root_lists_the_endpoints(api) -> None:
    body = httpx.get(api.url + "/").json()
    assert body["service"] == "birb-nest" and body["version"]
    assert "GET /v1/cache/{key}" in body["endpoints"]
    assert "GET /v1/schema/" in body["endpoints"]


def test_health_checks_all_three_servers(api) -> None:
    response = httpx.get(api.url + "/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy" and body["service"] == "birb-nest" and body["uptime"] >= 0
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "database": "healthy",
        "redis": "healthy",
        "nats": "healthy",
    }


def test_metrics_are_summed_over_every_api_process(api) -> None:
    key = unique_key()
    with httpx.Client(base_url=api.url) as http:
        http.post(f"/v1/cache/{key}", json={"value": 1})
        for _ in range(200):  # new connections land on both granian processes
            httpx.get(f"{api.url}/v1/cache/{key}")
            httpx.get(f"{api.url}/v1/cache/{unique_key('absent')}")
        body = http.get("/metrics").json()
    assert set(body) >= {
        "cache_hits",
        "cache_misses",
        "cache_hit_rate",
        "total_requests",
        "total_errors",
        "average_latency_ms",
    }
    assert body["cache_hits"] >= 200 and body["cache_misses"] >= 200
    assert body["total_requests"] >= 401
    assert 0 < body["cache_hit_rate"] < 1
    assert body["average_latency_ms"] > 0
    pids = {line.split("pid=")[1].split('"')[0] for line in _prometheus(api).splitlines() if "pid=" in line}
    assert not pids, "multiprocess values are aggregated, not one series per process"


def _prometheus(api) -> str:
    response = httpx.get(api.url + "/metrics", headers={"Accept": "text/plain;version=0.0.4"})
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def test_prometheus_text_at_the_fixed_path_and_by_accept_header(api) -> None:
    httpx.get(f"{api.url}/v1/cache/{unique_key()}")
    text = _prometheus(api)
    assert "http_requests_total" in text and "http_request_duration_seconds_bucket" in text
    assert "cache_misses_total" in text
    assert "http_requests_total" in httpx.get(api.url + "/metrics/prometheus").text


def test_runworker_is_ours_not_channels() -> None:
    assert get_commands()["runworker"] == "persistence"
    assert get_commands()["rehydrate"] == "persistence"


def test_the_data_plane_handler_under_the_real_server(api) -> None:
    """`/v1/` runs its own short handler (birbnest/wsgi.py): same answers, headers and errors."""
    key = unique_key("dp")
    with httpx.Client(base_url=api.url) as http:
        created = http.post(f"/v1/cache/{key}", json={"value": {"n": 1}})
        hit = http.get(f"/v1/cache/{key}")
        unknown = http.get("/v1/nothing-here")
        bad = http.get("/v1/cache/" + "x" * 300)
        deleted = http.delete(f"/v1/cache/{key}")
        # misses read through PostgreSQL and give the connection back: more than the pool holds
        misses = [http.get(f"/v1/cache/{unique_key('absent')}").status_code for _ in range(60)]
    assert created.status_code == 201 and hit.status_code == 200 and hit.json()["value"] == {"n": 1}
    assert hit.headers["ETag"] == f'"{hit.json()["version"]}"'
    assert hit.headers["Content-Length"] == str(len(hit.content)) and "chunked" not in hit.headers.get(
        "Transfer-Encoding", ""
    )
    assert hit.headers["X-Content-Type-Options"] == "nosniff"
    assert unknown.status_code == 404 and unknown.json()["code"] == "NOT_FOUND"
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_REQUEST"
    assert deleted.status_code == 204 and "Content-Length" not in deleted.headers
    assert set(misses) == {404}
    # the admin still runs the full stack (sessions, CSRF)
    assert "csrftoken" in httpx.get(api.url + "/admin/login/").cookies
