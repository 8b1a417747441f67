"""The operator console as an operator uses it, in a real headless Chromium."""

from __future__ import annotations

import pytest

from tests.browser.conftest import log_in, shot
from tests.conftest import clear_of_window_edge, wait_for

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
    clear_of_window_edge(60)  # the count must not start afresh halfway through
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist")
    try:
        statuses: list[int] = []
        deadline = time.monotonic() + 5
        while 429 not in statuses and time.monotonic() < deadline:
            statuses = [httpx.get(f"{api.url}/v1/cache/{key}").status_code for _ in range(5)]
        assert 429 in statuses, statuses
        limited = httpx.get(f"{api.url}/v1/cache/{key}")
        assert limited.status_code == 429 and limited.json()["code"] == "RATE_LIMITED"
        assert limited.headers["X-RateLimit-Limit"] == "3" and "Retry-After" in limited.headers
    finally:
        ratelimit.ratelimit_settings_update(enabled=False)
        ratelimit.ratelimit_client_clear(client="127.0.0.1")  # counted by address: leave it fresh


def test_find_an_entry_by_prefix_edit_it_and_see_the_new_version_in_postgresql(page, api, operator, worker) -> None:
    import time

    import httpx

    from persistence.models import CacheEntry

    prefix = f"browser-{time.time_ns()}"
    for n in range(3):
        httpx.post(f"{api.url}/v1/cache/{prefix}:{n}", json={"value": {"n": n}})
    target = f"{prefix}:1"
    wait_for(lambda: CacheEntry.objects.filter(key=target, version=1).exists(), message="entry persisted")
    log_in(page, api.url, operator.username)
    page.goto(f"{api.url}/admin/persistence/cacheentry/")
    page.fill("#searchbar", prefix)
    page.press("#searchbar", "Enter")
    page.wait_for_selector(f"text={target}")
    assert page.locator("#result_list tbody tr").count() == 3
    shot(page, "02-entries-search-by-prefix")
    page.click(f"text={target}")
    page.wait_for_selector("#id_value_json")
    page.fill("#id_value_json", '{"n": 1, "edited": "in the browser"}')
    shot(page, "03-entry-edit")
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist")
    row = wait_for(lambda: CacheEntry.objects.filter(key=target, version=2).first(), message="new version persisted")
    assert row.value == {"n": 1, "edited": "in the browser"}
    assert httpx.get(f"{api.url}/v1/cache/{target}").json()["version"] == 2


def test_retry_a_dead_letter_from_the_console_and_see_it_persisted(page, api, operator, worker) -> None:
    import time

    import httpx
    from django.db import connection

    from persistence.models import CacheEntry

    key = f"poison-{time.time_ns()}"
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE OR REPLACE FUNCTION birb_browser_reject() RETURNS trigger AS $$ BEGIN "
            f"IF NEW.key = '{key}' THEN RAISE EXCEPTION 'refused by a test trigger'; END IF; RETURN NEW; END $$ "
            "LANGUAGE plpgsql"
        )
        cursor.execute(
            "CREATE TRIGGER birb_browser_reject BEFORE INSERT OR UPDATE ON cache_entries "
            "FOR EACH ROW EXECUTE FUNCTION birb_browser_reject()"
        )
    try:
        assert httpx.post(f"{api.url}/v1/cache/{key}", json={"value": "poison"}).status_code == 201
        log_in(page, api.url, operator.username)

        def listed() -> bool:
            page.goto(f"{api.url}/admin/deadletters/")
            return page.locator(f"#result_list >> text={key}").count() > 0

        wait_for(listed, timeout=30, interval=1, message="the dead letter in the console")
        shot(page, "07-dead-letters")
    finally:
        with connection.cursor() as cursor:  # the cause, fixed
            cursor.execute("DROP TRIGGER IF EXISTS birb_browser_reject ON cache_entries")
            cursor.execute("DROP FUNCTION IF EXISTS birb_browser_reject()")
    row = page.locator("#result_list tr", has_text=key)
    row.locator("input.action-select").check()
    page.click("button[value=retry_selected]")
    page.wait_for_selector(".messagelist")
    shot(page, "08-dead-letter-retried")
    persisted = wait_for(lambda: CacheEntry.objects.filter(key=key).first(), message="retried write persisted")
    assert persisted.value == "poison" and persisted.version == 1
