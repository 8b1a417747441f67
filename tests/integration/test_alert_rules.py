"""deploy/prometheus/alerts.yml and deploy/grafana/birb-nest.json: promtool accepts the rules (when
installed: `make tools`), and every metric they use exists in a real scrape of the API and the worker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BASE_DIR, free_port, unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
RULES = BASE_DIR / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = BASE_DIR / "deploy" / "grafana" / "birb-nest.json"
# Series Prometheus makes itself, not any target's.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (functions, keywords, labels and strings removed)."""
    expr = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub(" ", expr))))
    return {name for name in _IDENT.findall(expr) if name.lower() not in PROMQL_WORDS}


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    def panels(items: list[dict]) -> list[dict]:
        return [p for item in items for p in [item, *panels(item.get("panels", []))]]

    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in panels(dashboard["panels"]) for target in panel.get("targets", [])]


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; `make tools` installs it as root)")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in result.stdout


def test_the_alerts_fire_on_their_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; `make tools` installs it as root)")
    tests = RULES.with_name("alerts_test.yml")
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_name_extraction_finds_names_and_only_names() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{job=~"a|b",status="5.."}[$__rate_interval]))) > 30'
    ) == {"x_bucket"}
    assert metric_names("time() - max by (instance) (y) > 120 and z offset 5m") == {"y", "z"}


def test_every_metric_of_the_rules_and_the_dashboard_exists_in_a_real_scrape(api, worker_factory) -> None:
    # given: an API that served a hit and a miss, and a worker that persisted a write
    port = free_port()
    worker = worker_factory(WORKER_METRICS_PORT=str(port), WORKER_BATCH_TIMEOUT="100ms").start().wait_ready()
    key = unique_key("scraped")
    with httpx.Client(base_url=api.url, timeout=10) as http:
        assert http.post(f"/v1/cache/{key}", json={"value": 1}).status_code == 201
        assert http.get(f"/v1/cache/{key}").status_code == 200
        assert http.get(f"/v1/cache/{unique_key('absent')}").status_code == 404
    worker_url = f"http://127.0.0.1:{port}/metrics"
    wait_for(
        lambda: 'birb_worker_messages_total{outcome="persisted"} 0.0' not in httpx.get(worker_url).text,
        message="the worker persisted the write",
    )
    # when
    scraped: set[str] = set()
    for text in (httpx.get(api.url + "/metrics/prometheus", timeout=10).text, httpx.get(worker_url, timeout=10).text):
        scraped |= {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    used = set().union(*map(metric_names, rule_exprs() + dashboard_exprs()))
    # then
    assert used, "no metric names found in the rules and the dashboard"
    assert used - PROMETHEUS_OWN <= scraped, sorted(used - PROMETHEUS_OWN - scraped)
    worker.stop()
