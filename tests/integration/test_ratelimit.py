"""Rate limiting on real servers: the limiter, `GET|POST /admin/ratelimit`, the admin pages.

The limiter counts by the client's address (a key the client sends is not an identity until the
service has verified it), so data-plane requests come from a fresh loopback address each: the
Django test client sets ``REMOTE_ADDR``, httpx binds its connections to the address. Tests never
share counters; requests to a missing key answer 404 when they are let through.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import httpx
import orjson
import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client

from ops import ratelimit
from ops.models import RateLimitClient, RateLimitSettings
from ops.ratelimit import (
    REFRESH_SECONDS,
    config_key,
    ratelimit_client_clear,
    ratelimit_config_publish,
    ratelimit_settings_update,
)
from ops.ratelimit import config as ratelimit_config
from tests.conftest import clear_of_window_edge, unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After")


@pytest.fixture(autouse=True)
def limiter_reset(transactional_db: Any) -> Any:
    """Each test starts and ends with rate limiting off, published to every API process."""
    ratelimit_config_publish()
    yield
    RateLimitClient.objects.all().delete()
    ratelimit_settings_update(enabled=False, limit=100, window=60, algorithm="fixed", by="tests")
    ratelimit_client_clear(client="127.0.0.1")
    time.sleep(REFRESH_SECONDS + 0.1)  # the session's API processes have re-read it before the next test


def _user(django_user_model: Any, *codenames: str, staff: bool = False) -> Any:
    user = django_user_model.objects.create_user(username=unique_key("user"), password="x-Pass-9731", is_staff=staff)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="ops", codename__in=codenames))
    return user


@pytest.fixture
def operator(django_user_model: Any) -> Client:
    """The console session of a staff user who may change the settings."""
    session = Client()
    session.force_login(_user(django_user_model, "view_ratelimitsettings", "change_ratelimitsettings", staff=True))
    return session


def _post_settings(operator: Client, body: Any, **extra: Any) -> Any:
    return operator.post(
        "/admin/ratelimit",
        body if isinstance(body, (str, bytes)) else orjson.dumps(body),
        content_type="application/json",
        **extra,
    )


def _enable(operator: Client, **settings: Any) -> dict[str, Any]:
    response = _post_settings(operator, {"enabled": True, **settings})
    assert response.status_code == 200, response.content
    body = response.json()
    if body["algorithm"] == "fixed":
        clear_of_window_edge(body["window"])
    return body


def fresh_address() -> str:
    """A loopback address of its own (all of 127.0.0.0/8 reaches this host): a client of its own."""
    number = random.randrange(1, 256**3 - 1)
    return "127." + ".".join(str(number >> shift & 255 or 1) for shift in (16, 8, 0))


def _get(client: Client, address: str | None = None, path: str | None = None) -> Any:
    extra = {"REMOTE_ADDR": address} if address else {}
    return client.get(path or f"/v1/cache/{unique_key('absent')}", **extra)


def _http_get(url: str, address: str, **kwargs: Any) -> httpx.Response:
    """A GET to the real API over a connection from ``address``."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10) as http:
        return http.get(url, **kwargs)


def _live_config(redis_client: Any) -> dict[str, Any] | None:
    raw = redis_client.get(config_key())
    return None if raw is None else orjson.loads(raw)


# --- off by default ---------------------------------------------------------------------------------


def test_off_by_default_no_headers_and_never_429(client: Client, api, operator: Client) -> None:
    body = operator.get("/admin/ratelimit").json()
    assert body["enabled"] is False and body["overrides"] == {} and body["blocked"] == []
    key = fresh_address()
    responses = [_get(client, key) for _ in range(30)] + [_get(client) for _ in range(30)]
    responses += [_http_get(f"{api.url}/v1/cache/{unique_key('absent')}", key) for _ in range(30)]
    assert {response.status_code for response in responses} == {404}
    assert not any(name in response.headers for response in responses for name in HEADERS)


# --- the limit, its answer and headers ---------------------------------------------------------------


def test_sixth_request_gets_429_with_the_contract_body_and_headers(
    client: Client, operator: Client, redis_client: Any
) -> None:
    # given rate limiting enabled by an operator token, 5 per 60 s
    body = _enable(operator, limit=5, window=60)
    assert (body["enabled"], body["limit"], body["window"], body["algorithm"]) == (True, 5, 60, "fixed")
    assert _live_config(redis_client)["limit"] == 5
    key = fresh_address()
    # when one client makes 6 requests
    allowed = [_get(client, key) for _ in range(5)]
    limited = _get(client, key)
    # then the first 5 pass and count down
    assert [response.status_code for response in allowed] == [404] * 5
    assert [response["X-RateLimit-Remaining"] for response in allowed] == ["4", "3", "2", "1", "0"]
    assert {response["X-RateLimit-Limit"] for response in allowed} == {"5"}
    assert all(1 <= int(response["X-RateLimit-Reset"]) <= 60 for response in allowed)
    assert not any(response.has_header("Retry-After") for response in allowed)
    # and the 6th is refused with the contract's body and all four headers
    assert limited.status_code == 429
    error = limited.json()
    assert error["code"] == "RATE_LIMITED" and "rate limit" in error["error"]
    assert error["details"]["limit"] == 5 and error["details"]["window"] == 60
    assert limited["X-RateLimit-Limit"] == "5" and limited["X-RateLimit-Remaining"] == "0"
    reset = int(limited["X-RateLimit-Reset"])
    assert 1 <= reset <= 60
    assert int(limited["Retry-After"]) == reset  # fixed window: free again when it resets
    # another client still passes; keys the same client makes up do not make it another one (they
    # are refused before they are counted: 401)
    other = _get(client, fresh_address())
    assert other.status_code == 404 and other["X-RateLimit-Remaining"] == "4"
    for headers in ({"HTTP_X_API_KEY": unique_key("made-up")}, {"HTTP_AUTHORIZATION": f"Bearer {unique_key()}"}):
        assert client.get(f"/v1/cache/{unique_key('absent')}", REMOTE_ADDR=key, **headers).status_code == 401
    assert _get(client, key).status_code == 429
    # and nothing outside /v1/ is limited, whoever asks
    for path in ("/health", "/metrics", "/"):
        response = _get(client, key, path)
        assert response.status_code != 429 and not response.has_header("X-RateLimit-Limit")


def test_clients_without_api_key_are_limited_by_address(client: Client, operator: Client) -> None:
    ratelimit_client_clear(client="127.0.0.1")
    _enable(operator, limit=2)
    statuses = [_get(client).status_code for _ in range(3)]
    forwarded = client.get(f"/v1/cache/{unique_key('absent')}", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert statuses == [404, 404, 429]
    assert forwarded.status_code == 429  # X-Forwarded-For is not trusted


# --- POST /admin/ratelimit ---------------------------------------------------------------------------


def test_runbook_command_works_with_an_admin_key(client: Client, make_api_key: Any) -> None:
    # curl -X POST $H/admin/ratelimit -H "Authorization: Bearer $KEY" -d '{"enabled": true, "limit": 10}'
    # (curl sends a form type)
    name = unique_key("ops")
    key = make_api_key(name, scopes=["admin"])
    response = client.post(
        "/admin/ratelimit",
        b'{"enabled": true, "limit": 10}',
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )
    assert response.status_code == 200
    assert response.json() | {"updated_at": None} == {
        "enabled": True,
        "limit": 10,
        "window": 60,
        "algorithm": "fixed",
        "overrides": {},
        "blocked": [],
        "updated_at": None,
        "updated_by": f"key {name} ({key[:11]})",
    }
    # partial update: only the window changes (X-API-Key works too)
    assert _post_settings(client, {"window": 30}, HTTP_X_API_KEY=key).json()["limit"] == 10
    row = RateLimitSettings.objects.get(pk=1)
    assert (row.enabled, row.limit, row.window) == (True, 10, 30)


def test_staff_session_needs_the_permission_and_a_csrf_token(django_user_model: Any) -> None:
    staff = _user(django_user_model, "change_ratelimitsettings", staff=True)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff)
    # without the CSRF token: refused
    response = browser.post("/admin/ratelimit", b'{"enabled": true}', content_type="application/json")
    assert response.status_code == 403 and response.json()["code"] == "FORBIDDEN"
    assert "CSRF" in response.json()["error"]
    # with the token the admin's pages hand out: accepted
    browser.get("/admin/")
    csrf = browser.cookies["csrftoken"].value
    response = browser.post(
        "/admin/ratelimit", b'{"enabled": true, "limit": 7}', content_type="application/json", HTTP_X_CSRFTOKEN=csrf
    )
    assert response.status_code == 200
    assert response.json()["limit"] == 7 and response.json()["updated_by"] == staff.username
    assert browser.get("/admin/ratelimit").json()["enabled"] is True


def test_who_may_read_and_change_the_settings(client: Client, django_user_model: Any, make_api_key: Any) -> None:
    body = b'{"enabled": true}'

    def post(c: Client = client, **headers: Any) -> Any:
        return c.post("/admin/ratelimit", body, content_type="application/json", **headers)

    admin_key, data_key = make_api_key(scopes=["admin"]), make_api_key(scopes=["read", "write", "delete"])
    # no credentials, a wrong key, an old DRF-style token, another scheme: 401
    for headers in (
        {},
        {"HTTP_AUTHORIZATION": "Bearer nope"},
        {"HTTP_X_API_KEY": admin_key[:-2]},
        {"HTTP_AUTHORIZATION": f"Token {admin_key}"},
        {"HTTP_AUTHORIZATION": "Basic dXNlcjpwdw=="},
    ):
        response = post(**headers)
        assert response.status_code == 401 and response.json()["code"] == "UNAUTHORIZED"
        assert response["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/admin/ratelimit").status_code == 401
    # a key without the admin scope: 403, naming it
    response = post(HTTP_AUTHORIZATION=f"Bearer {data_key}")
    assert response.status_code == 403 and response.json()["details"]["scope"] == "admin"
    assert client.get("/admin/ratelimit", HTTP_AUTHORIZATION=f"Bearer {data_key}").status_code == 403
    # the admin key may read
    assert client.get("/admin/ratelimit", HTTP_AUTHORIZATION=f"Bearer {admin_key}").status_code == 200
    # sessions: a viewer may read, not change; staff without the permission, or a non-staff user with it: 403
    viewer = Client()
    viewer.force_login(_user(django_user_model, "view_ratelimitsettings", staff=True))
    assert viewer.get("/admin/ratelimit").status_code == 200
    assert post(viewer).status_code == 403
    for user in (_user(django_user_model, staff=True), _user(django_user_model, "change_ratelimitsettings")):
        session = Client()
        session.force_login(user)
        assert post(session).status_code == 403
    # a revoked admin key no longer works
    from ops.access.keys import apikey_revoke
    from ops.models import ApiKey

    apikey_revoke(name=ApiKey.objects.get(public_id=admin_key[:11]).name)
    assert post(HTTP_AUTHORIZATION=f"Bearer {admin_key}").status_code == 401
    assert RateLimitSettings.objects.get(pk=1).enabled is False


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"limit": 0}',
        b'{"limit": "10"}',
        b'{"limit": 2.5}',
        b'{"limit": true}',
        b'{"limit": null}',
        b'{"window": 0}',
        b'{"enabled": "yes"}',
        b'{"enabled": 1}',
        b'{"algorithm": "token-bucket"}',
        b'{"enabled": true, "burst": 5}',
    ],
)
def test_invalid_settings_are_400_and_change_nothing(client: Client, operator: Client, body: bytes) -> None:
    response = _post_settings(operator, body)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "INVALID_REQUEST"
    assert RateLimitSettings.objects.get(pk=1).enabled is False


def test_other_methods_are_405(client: Client, operator: Client) -> None:
    response = operator.put("/admin/ratelimit", b"{}")
    assert response.status_code == 405 and response["Allow"] == "GET, POST"


# --- every API process, within a second -------------------------------------------------------------


def test_the_api_processes_apply_new_settings_within_a_second(api, operator: Client) -> None:
    key = fresh_address()

    def probe() -> int:  # a new connection each time, so both granian processes answer
        return _http_get(f"{api.url}/v1/cache/{unique_key('absent')}", key).status_code

    assert {probe() for _ in range(20)} == {404}  # both processes hold "disabled", freshly read
    clear_of_window_edge(60)
    response = _post_settings(operator, {"enabled": True, "limit": 1, "window": 60})
    returned = time.monotonic()
    assert response.status_code == 200 and response.json()["limit"] == 1
    wait_for(lambda: probe() == 429, timeout=3, interval=0.005, message="a 429 from the API")
    first_429 = time.monotonic() - returned
    print(f"first 429 from the API subprocess {first_429 * 1000:.0f} ms after the POST returned")
    assert first_429 < 1.5
    time.sleep(max(0.0, 1.0 - (time.monotonic() - returned)))
    assert Counter(probe() for _ in range(40)) == {429: 40}  # by now every process applies it


def test_concurrent_requests_are_counted_exactly(api, operator: Client) -> None:
    _enable(operator, limit=20, window=60)
    time.sleep(REFRESH_SECONDS + 0.1)
    key = fresh_address()
    start = threading.Barrier(50)
    responses: list[httpx.Response] = []

    def request() -> None:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=key), timeout=10) as http:
            start.wait()
            responses.append(http.get(f"{api.url}/v1/cache/{unique_key('absent')}"))

    threads = [threading.Thread(target=request) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = Counter(response.status_code for response in responses)
    assert statuses == {404: 20, 429: 30}
    remaining = sorted(int(r.headers["X-RateLimit-Remaining"]) for r in responses if r.status_code == 404)
    assert remaining == list(range(20))  # each allowed request saw its own count: no lost update


# --- per-client rules and the admin ------------------------------------------------------------------


def test_a_per_client_override_saved_in_the_admin(
    admin_client: Client, client: Client, operator: Client, redis_client: Any
) -> None:
    _enable(operator, limit=5)
    special = fresh_address()
    response = admin_client.post(
        "/admin/ops/ratelimitclient/add/", {"client": special, "limit": "2", "note": "batch importer"}
    )
    assert response.status_code == 302, response.content
    assert _live_config(redis_client)["overrides"] == {special: 2}
    assert [_get(client, special).status_code for _ in range(3)] == [404, 404, 429]
    assert _get(client, special)["X-RateLimit-Limit"] == "2"
    assert _get(client, fresh_address())["X-RateLimit-Limit"] == "5"


def test_block_and_unblock_with_the_admin_actions(admin_client: Client, client: Client) -> None:
    bad, good = fresh_address(), fresh_address()
    rule = RateLimitClient.objects.create(client=bad, note="abuse")
    RateLimitClient.objects.create(client=good)
    # when an operator blocks one client (rate limiting itself is off)
    response = admin_client.post(
        "/admin/ops/ratelimitclient/", {"action": "block_selected", "_selected_action": [rule.pk]}, follow=True
    )
    assert "Blocked 1 client(s)" in response.content.decode()
    # then it is refused with 403, and only it
    refused = _get(client, bad)
    assert refused.status_code == 403
    assert refused.json()["code"] == "FORBIDDEN" and "blocked" in refused.json()["error"]
    assert _get(client, good).status_code == 404
    # when it is unblocked, it passes again
    response = admin_client.post(
        "/admin/ops/ratelimitclient/", {"action": "unblock_selected", "_selected_action": [rule.pk]}, follow=True
    )
    assert "Unblocked 1 client(s)" in response.content.decode()
    assert _get(client, bad).status_code == 404


def test_clear_counters_lets_a_limited_client_in_again(admin_client: Client, client: Client, operator: Client) -> None:
    _enable(operator, limit=2)
    key = fresh_address()
    rule = RateLimitClient.objects.create(client=key)
    assert [_get(client, key).status_code for _ in range(3)] == [404, 404, 429]
    page = admin_client.get("/admin/ops/ratelimitclient/").content.decode()
    assert "Requests in this window" in page and '<td class="field-current_count">2</td>' in page
    response = admin_client.post(
        "/admin/ops/ratelimitclient/", {"action": "clear_counters", "_selected_action": [rule.pk]}, follow=True
    )
    assert "Cleared the counters of 1 client(s) (1 had requests" in response.content.decode()
    assert _get(client, key).status_code == 404


def test_settings_admin_is_one_row_and_publishes_on_save(
    admin_client: Client, admin_user: Any, redis_client: Any
) -> None:
    with connection.cursor() as cursor:  # no signals: a delete would publish, which recreates the row
        cursor.execute(f"DELETE FROM {RateLimitSettings._meta.db_table}")
    response = admin_client.get("/admin/ops/ratelimitsettings/")
    assert response.status_code == 302 and response["Location"] == "/admin/ops/ratelimitsettings/1/change/"
    assert RateLimitSettings.objects.filter(pk=1).exists()
    assert admin_client.get("/admin/ops/ratelimitsettings/add/").status_code == 403
    assert admin_client.get("/admin/ops/ratelimitsettings/1/delete/").status_code == 403
    page = admin_client.get("/admin/ops/ratelimitsettings/1/change/").content.decode()
    assert "Applied by the API processes" in page and "rate limiting off" in page
    response = admin_client.post(
        "/admin/ops/ratelimitsettings/1/change/",
        {"enabled": "on", "limit": "7", "window": "30", "algorithm": "sliding"},
    )
    assert response.status_code == 302, response.content
    live = _live_config(redis_client)
    assert (live["enabled"], live["limit"], live["window"], live["algorithm"]) == (True, 7, 30, "sliding")
    assert live["updated_by"] == admin_user.username


# --- Redis and PostgreSQL losing things --------------------------------------------------------------


def test_config_is_rebuilt_from_postgresql_when_redis_comes_back_empty(
    api, client: Client, operator: Client, flush_redis: Any, redis_client: Any
) -> None:
    _enable(operator, limit=3)
    flush_redis()
    assert _live_config(redis_client) is None
    time.sleep(REFRESH_SECONDS + 0.1)
    key = fresh_address()
    statuses = [_http_get(f"{api.url}/v1/cache/{unique_key('absent')}", key).status_code for _ in range(4)]
    live = _live_config(redis_client)
    assert live is not None and (live["enabled"], live["limit"]) == (True, 3)
    assert statuses == [404, 404, 404, 429]


def _wait_until_healthy(api: Any) -> None:
    """After a server restart: both API processes have reconnected (later tests expect a healthy API)."""

    def healthy() -> bool:
        return all(httpx.get(api.url + "/health", timeout=5).status_code == 200 for _ in range(6))

    wait_for(healthy, timeout=30, interval=0.2, message="a healthy API after the restart")


def test_postgresql_down_while_the_config_is_missing_keeps_the_last_one(
    servers, api, client: Client, operator: Client, flush_redis: Any
) -> None:
    if not servers.owns("postgres"):
        pytest.skip("PostgreSQL is an external server (BIRB_TEST_DATABASE_URL): this test must stop it")
    _enable(operator, limit=1)
    key = fresh_address()
    servers.stop("postgres")
    try:
        flush_redis()
        time.sleep(REFRESH_SECONDS + 0.1)
        first, second = _get(client, key), _get(client, key)
    finally:
        servers.start("postgres")
        _wait_until_healthy(api)
    assert first.status_code == 503  # let through; a miss needs PostgreSQL
    assert second.status_code == 429  # still limited by the config this process knew


def test_redis_down_fails_open(servers, api, client: Client, operator: Client) -> None:
    if not servers.owns("redis"):
        pytest.skip("Redis is an external server (BIRB_TEST_REDIS_URL): this test must stop it")
    _enable(operator, limit=1)
    key = fresh_address()
    assert _get(client, key).status_code == 404
    servers.stop("redis")
    try:
        through = [_get(client, key) for _ in range(3)]
    finally:
        servers.start("redis")
        _wait_until_healthy(api)
    assert [response.status_code for response in through] == [404] * 3  # read from PostgreSQL, not limited
    assert not any(response.has_header("X-RateLimit-Limit") for response in through)
    # back: the config is rebuilt from PostgreSQL and applies again
    time.sleep(REFRESH_SECONDS + 0.1)
    assert [_get(client, key).status_code for _ in range(2)] == [404, 429]


# --- sliding window ----------------------------------------------------------------------------------


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def test_sliding_window_weighs_the_previous_window(client: Client, operator: Client) -> None:
    _enable(operator, limit=4, window=2, algorithm="sliding")
    key = fresh_address()
    a = (time.time() // 2 + 1) * 2  # windows are aligned on the epoch: window A starts at a, B at a + 2
    # window A: 4 allowed, the 5th not
    _sleep_until(a + 0.05)
    assert [_get(client, key).status_code for _ in range(5)] == [404] * 4 + [429]
    # window B begins: a fixed window would start afresh, the sliding one still counts ~4 from A
    _sleep_until(a + 2.1)
    refused = _get(client, key)
    assert refused.status_code == 429
    assert refused["Retry-After"] == "1"  # A weighs 4 * (2 - e) / 2: down to 3, room for one, at e = 0.5 s
    # 1.2 s into B, A weighs 4 * 0.4 = 1.6: two more requests fit under 4, not three
    _sleep_until(a + 3.2)
    assert [_get(client, key).status_code for _ in range(3)] == [404, 404, 429]


def test_requests_arriving_during_a_refresh_wait_for_it_instead_of_applying_the_old_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The race test_concurrent_requests_are_counted_exactly once hit: a burst reaches a process
    # whose copy is stale; one request re-reads it, and the others must not go on with the old one.
    cache = ratelimit_config.new_cache()
    old, new = ratelimit.RateLimitConfig(enabled=True, limit=1), ratelimit.RateLimitConfig(enabled=True, limit=20)
    cache.value = old
    refreshing = threading.Event()

    def slow_refresh() -> None:
        refreshing.set()
        time.sleep(0.1)  # the GET, slowed down
        cache.value, cache.fresh_until = new, time.monotonic() + ratelimit.REFRESH_SECONDS

    monkeypatch.setattr(cache, "_refresh", slow_refresh)
    seen: list[ratelimit.RateLimitConfig] = []
    refresher = threading.Thread(target=lambda: seen.append(cache.get()))
    refresher.start()
    refreshing.wait(5)
    assert cache.get() == new, "a request during the refresh got the old config"
    refresher.join()
    assert seen == [new]


def test_requests_arriving_during_the_refreshs_redis_get_wait_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same race one level down, in the real refresh: while its GET was on the way, the copy
    # being replaced already counted as fresh, and a request then applied the previous limit.
    ratelimit_settings_update(enabled=True, limit=20, window=60, algorithm="fixed", by="tests")
    from persistence import redis_store

    real_client = redis_store.client()
    in_get = threading.Event()

    class SlowGet:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_client, name)

        def get(self, name: str) -> Any:
            in_get.set()
            time.sleep(0.2)  # the GET, slowed down (a busy machine)
            return real_client.get(name)

    monkeypatch.setattr(redis_store, "client", SlowGet)
    cache = ratelimit_config.new_cache()
    cache.value = ratelimit.RateLimitConfig(enabled=True, limit=1)  # the previous config
    seen: list[ratelimit.RateLimitConfig] = []
    refresher = threading.Thread(target=lambda: seen.append(cache.get()))
    refresher.start()
    in_get.wait(5)
    assert cache.get().limit == 20, "a request during the GET applied the previous config"
    refresher.join()
    assert seen[0].limit == 20


def test_the_compiled_config_survives_its_json_round_trip() -> None:
    config = ratelimit.RateLimitConfig(
        enabled=True, limit=3, window=9, algorithm="sliding", overrides={"k": 1}, blocked=frozenset({"b"})
    )
    assert ratelimit.RateLimitConfig.from_json(config.to_json()) == config


# --- cost on the hot path -----------------------------------------------------------------------------


def test_a_limited_cache_hit_is_still_one_round_trip_to_redis(
    client: Client, operator: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from persistence import redis_store

    key = unique_key("hit")
    # straight into Redis: no version to assign (Redis may just have restarted empty, see above)
    redis_store.store(redis_store.StoredEntry(key, 1, b'{"n":1}', b"{}", "2026-11-30T00:00:00Z", "x", None))
    sent: list[tuple[Any, ...]] = []
    real_send = redis_store._send

    def counting_send(commands: tuple[tuple[Any, ...], ...]) -> list[Any]:
        sent.append(commands)
        return real_send(commands)

    monkeypatch.setattr(redis_store, "_send", counting_send)
    # limiter off: one HGETALL
    assert client.get(f"/v1/cache/{key}").status_code == 200
    assert [[command[0] for command in commands] for commands in sent] == [["HGETALL"]]
    # limiter on: the script and the HGETALL in one write, one reply each
    _enable(operator, limit=5)
    sent.clear()
    response = client.get(f"/v1/cache/{key}", REMOTE_ADDR=fresh_address())
    assert response.status_code == 200 and response.json()["value"] == {"n": 1}
    assert response["X-RateLimit-Remaining"] == "4"
    assert [[command[0] for command in commands] for commands in sent] == [["EVALSHA", "HGETALL"]]
    # a refused request reads nothing for the next one to pick up by mistake
    limited = fresh_address()
    for _ in range(6):
        client.get(f"/v1/cache/{key}", REMOTE_ADDR=limited)
    assert redis_store._pinned.prefetched is None
    # a miss still reads through to PostgreSQL after the prefetched (empty) reply
    absent = client.get(f"/v1/cache/{unique_key('absent')}", REMOTE_ADDR=fresh_address())
    assert absent.status_code == 404
