"""A real API in production mode: the Prometheus endpoint's own token, and HTTPS behind a proxy.

One API for the module, started as docs/OPERATIONS.md ("Production settings") says: behind a
TLS proxy (HTTPS_ONLY, TRUST_X_FORWARDED_PROTO), for one host name, with METRICS_TOKEN.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Api, unique_key

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "mt-" + secrets.token_urlsafe(24)
HTTPS = {"X-Forwarded-Proto": "https"}


@pytest.fixture(scope="module")
def prod_api(tmp_path_factory: pytest.TempPathFactory, django_db_setup: Any) -> Iterator[Api]:
    api = Api(
        tmp_path_factory.mktemp("prod-api") / "api.log",
        METRICS_TOKEN=TOKEN,
        HTTPS_ONLY="true",
        TRUST_X_FORWARDED_PROTO="true",
        ALLOWED_HOSTS="127.0.0.1,birb.example.com",
    ).start()
    yield api
    api.stop()


def _unauthorized(response: httpx.Response, *, invalid_token: bool) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == "UNAUTHORIZED" and set(body) == {"error", "code", "details"}
    assert "METRICS_TOKEN" in body["error"]
    expected = 'Bearer realm="birb-nest-metrics"' + (', error="invalid_token"' if invalid_token else "")
    assert response.headers["WWW-Authenticate"] == expected
    assert TOKEN not in response.text


def test_prometheus_text_needs_the_metrics_token(prod_api: Api) -> None:
    # given an API with METRICS_TOKEN set
    with httpx.Client(base_url=prod_api.url) as http:
        # when a scraper asks without a token, with another scheme, or with a wrong token
        missing = http.get("/metrics/prometheus")
        basic = http.get("/metrics/prometheus", headers={"Authorization": f"Basic {TOKEN}"})
        wrong = http.get("/metrics/prometheus", headers={"Authorization": f"Bearer {TOKEN}x"})
        # the same text by the Accept header on /metrics is covered as well
        by_accept = http.get("/metrics", headers={"Accept": "text/plain;version=0.0.4"})
        right = http.get("/metrics/prometheus", headers={"Authorization": f"Bearer {TOKEN}"})
        right_by_accept = http.get(
            "/metrics", headers={"Accept": "text/plain;version=0.0.4", "Authorization": f"bearer {TOKEN}"}
        )
    # then only the right token gets the text
    _unauthorized(missing, invalid_token=False)
    _unauthorized(basic, invalid_token=False)
    _unauthorized(wrong, invalid_token=True)
    _unauthorized(by_accept, invalid_token=False)
    assert right.status_code == 200 and "http_requests_total" in right.text
    assert right_by_accept.status_code == 200 and "http_requests_total" in right_by_accept.text
    assert right.headers["content-type"].startswith("text/plain")


def test_health_and_json_metrics_stay_open_over_plain_http(prod_api: Api) -> None:
    """A probe on loopback speaks plain HTTP without a token: no redirect, no 401."""
    with httpx.Client(base_url=prod_api.url) as http:
        health = http.get("/health")
        summary = http.get("/metrics")
        root = http.get("/")
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert summary.status_code == 200 and "cache_hit_rate" in summary.json()
    assert root.status_code == 200


def test_plain_http_is_redirected_and_https_gets_hsts(prod_api: Api) -> None:
    key = unique_key("prod")
    with httpx.Client(base_url=prod_api.url) as http:
        plain = http.get(f"/v1/cache/{key}")
        console = http.get("/admin/login/")
        secure = http.get(f"/v1/cache/{key}", headers=HTTPS)
        login = http.get("/admin/login/", headers=HTTPS)
    assert plain.status_code == 301 and plain.headers["Location"] == f"https://127.0.0.1:{prod_api.port}/v1/cache/{key}"
    assert console.status_code == 301 and console.headers["Location"].startswith("https://")
    assert secure.status_code == 404 and secure.json()["code"] == "NOT_FOUND"
    assert secure.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    assert login.status_code == 200
    cookie = login.headers["Set-Cookie"]
    assert "csrftoken=" in cookie and "Secure" in cookie


def test_an_unknown_host_name_is_refused(prod_api: Api) -> None:
    """ALLOWED_HOSTS: the redirect would otherwise send the client to a host of the caller's choosing."""
    response = httpx.get(f"{prod_api.url}/v1/cache/{unique_key()}", headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert "evil.example" not in response.headers.get("Location", "")


def test_the_metrics_token_never_reaches_the_log(prod_api: Api) -> None:
    with httpx.Client(base_url=prod_api.url) as http:
        http.get("/metrics/prometheus", headers={"Authorization": f"Bearer {TOKEN}"})
        http.get("/metrics/prometheus", headers={"Authorization": f"Bearer {TOKEN}-wrong"})
    log = prod_api.log_path.read_text(errors="replace")
    assert log, "the API wrote nothing: the test would prove nothing"
    assert TOKEN not in log
