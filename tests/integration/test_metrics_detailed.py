"""FEATURE_METRICS_DETAILED: per-route and per-status labels on the HTTP metrics, bounded values."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import unique_key

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(url: str) -> dict[str, list]:
    """Samples by sample name (``http_requests_total``, ``..._bucket``) from the Prometheus text."""
    text = httpx.get(url + "/metrics/prometheus", timeout=10).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def traffic(url: str, key: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get(f"/v1/cache/{key}").status_code == 404
        assert http.post(f"/v1/cache/{key}", json={"value": 1}).status_code == 201
        assert http.get(f"/v1/cache/{key}").status_code == 200
        assert http.get("/health").status_code == 200
        assert http.get(f"/no/such/{key}").status_code == 404
        assert http.request("BREW", f"/v1/cache/{key}").status_code < 500


def test_detailed_metrics_label_route_and_status(api_factory) -> None:
    api = api_factory(FEATURE_METRICS_DETAILED="true").start()
    key = unique_key("detailed")
    # when
    traffic(api.url, key)
    samples = scrape(api.url)
    # then
    requests = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value for s in samples["http_requests_total"]
    }
    assert requests[("GET", "cache-entry", "404")] >= 1
    assert requests[("POST", "cache-entry", "201")] >= 1
    assert requests[("GET", "cache-entry", "200")] >= 1
    assert requests[("GET", "health", "200")] >= 1
    assert requests[("GET", "unmatched", "404")] >= 1
    assert any(method == "other" for method, _, _ in requests)  # BREW: not a label value of its own
    durations = samples["http_request_duration_seconds_count"]
    assert {tuple(sorted(s.labels)) for s in durations} == {("method", "route", "status")}
    assert any(s.labels["route"] == "cache-entry" and s.labels["status"] == "201" for s in durations)
    # bounded: no key, no path, no client-chosen method in any label value
    values = {
        v for name, group in samples.items() if name.startswith("http_") for s in group for v in s.labels.values()
    }
    assert not any(key in value or "/" in value or value == "BREW" for value in values), values


def test_default_keeps_todays_series(api) -> None:
    traffic(api.url, unique_key("plain"))
    samples = scrape(api.url)
    assert {tuple(sorted(s.labels)) for s in samples["http_requests_total"]} == {("method", "status")}
    assert {tuple(sorted(s.labels)) for s in samples["http_request_duration_seconds_count"]} == {("method",)}
    assert all(s.labels["method"] != "BREW" for s in samples["http_requests_total"])
    # the JSON view sums the same series either way
    body = httpx.get(api.url + "/metrics", timeout=10).json()
    assert body["total_requests"] >= 6
