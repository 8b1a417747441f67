"""The operator console as an operator uses it, in a real headless Chromium."""

from __future__ import annotations

import pytest

from tests.browser.conftest import log_in, shot
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_log_in_and_see_the_console(page, api, operator) -> None:
    log_in(page, api.url, operator.username)
    assert page.is_visible("text=Cache entries")
    shot(page, "01-admin-index")


def test_the_dashboard_shows_a_stopped_redis_within_seconds(
    page, api, dashboard_server, operator, servers, worker
) -> None:
    if not servers.owns("redis"):
        pytest.skip("Redis is a shared server (BIRB_TEST_REDIS_URL): this test must stop it")
    log_in(page, api.url, operator.username)
    page.goto(f"{api.url}/admin/dashboard/")
    page.wait_for_selector('#connection-state[data-state="live"]')
    page.wait_for_selector('#health-redis[data-status="healthy"]')
    shot(page, "05-dashboard")
    servers.stop("redis")
    try:
        page.wait_for_selector('#health-redis[data-status="unhealthy"]', timeout=10_000)
        shot(page, "06-dashboard-redis-down")
    finally:
        servers.start("redis")
    page.wait_for_selector('#health-redis[data-status="healthy"]', timeout=20_000)
    assert wait_for(lambda: page.get_attribute("#health-database", "data-status") == "healthy", timeout=5)


def test_enable_rate_limiting_in_the_console_and_a_client_gets_429(page, api, operator) -> None:
    import time

    import httpx

    from ops import ratelimit

    key = f"rl-{time.time_ns()}"
    httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 1})
    log_in(page, api.url, operator.username)
    page.goto(f"{api.url}/admin/ops/ratelimitsettings/")
    page.wait_for_selector("#id_limit")
    page.check("#id_enabled")
    page.fill("#id_limit", "3")
    page.fill("#id_window", "60")
    shot(page, "04-rate-limit-settings")
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist")
    try:
        statuses: list[int] = []
        deadline = time.monotonic() + 5
        while 429 not in statuses and time.monotonic() < deadline:
            statuses = [
                httpx.get(f"{api.url}/v1/cache/{key}", headers={"X-API-Key": "browser"}).status_code for _ in range(5)
            ]
        assert 429 in statuses, statuses
        limited = httpx.get(f"{api.url}/v1/cache/{key}", headers={"X-API-Key": "browser"})
        assert limited.status_code == 429 and limited.json()["code"] == "RATE_LIMITED"
        assert limited.headers["X-RateLimit-Limit"] == "3" and "Retry-After" in limited.headers
    finally:
        ratelimit.ratelimit_settings_update(enabled=False)
