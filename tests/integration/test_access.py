"""API keys on `/v1/` (issue #10): the protected default, each error, scopes, key prefixes,
revocation on every API process within a second, expiry, per-key limits, and no secret in logs.

In-process cases use Django's test client (its ``REMOTE_ADDR`` stands in for a client that is
not on loopback, without sending traffic anywhere); the others run real ``manage.py runapi``
processes over the session's real PostgreSQL, Redis and NATS.
"""

from __future__ import annotations

import http.client
import time
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest
from django.conf import settings
from django.test import Client, override_settings
from django.utils import timezone

from ops.access.keyring import flush_used, key_digest
from ops.access.keys import apikey_list, apikey_revoke
from ops.models import ApiKey
from ops.ratelimit import ratelimit_settings_update
from persistence import redis_store
from tests.conftest import unique_key, wait_for, wait_published

pytestmark = pytest.mark.django_db(transaction=True)

NOT_LOOPBACK = "203.0.113.7"  # TEST-NET-3: only ever a REMOTE_ADDR here, never a destination


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.content[:300])
    body = orjson.loads(response.content)
    assert set(body) == {"error", "code", "details"} and body["code"] == code, body
    return body


def _get(client: Client, key: str | None = None, token: str | None = None, **extra: Any) -> Any:
    if token is not None:
        extra["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client.get(f"/v1/cache/{key or unique_key('absent')}", **extra)


def _client_for(mode: str, **overrides: Any) -> Client:
    """A test client whose handler was built with ``API_AUTH=mode`` (middleware reads it at load)."""
    with override_settings(BIRB=replace(settings.BIRB, api_auth=mode), **overrides):
        client = Client()
        client.get("/v1/cache/warm-up", REMOTE_ADDR="127.0.0.1")  # loads the middleware now
    return client


# --- the protected default ---------------------------------------------------------------------------


def test_with_no_key_only_loopback_clients_are_served(client: Client, api_keys_removed: None) -> None:
    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert _get(client, REMOTE_ADDR=address).status_code == 404, address
    for address in (NOT_LOOPBACK, "10.1.2.3", "::ffff:10.0.0.1", "2001:db8::1", ""):
        body = _error(_get(client, REMOTE_ADDR=address), 401, "UNAUTHORIZED")
        assert "manage.py apikey create" in body["error"], body
    # /health and /metrics stay open to everyone
    for path in ("/health", "/metrics"):
        assert client.get(path, REMOTE_ADDR=NOT_LOOPBACK).status_code in (200, 503)


def test_once_a_key_exists_every_request_needs_one(client: Client, make_api_key: Any) -> None:
    token = make_api_key()
    response = _get(client)
    _error(response, 401, "UNAUTHORIZED")
    assert response["WWW-Authenticate"] == 'Bearer realm="birb-nest"'
    assert _get(client, token=token).status_code == 404
    assert _get(client, HTTP_X_API_KEY=token).status_code == 404
    assert _get(client, token=token, REMOTE_ADDR=NOT_LOOPBACK).status_code == 404
    # a revoked key still counts as "a key exists": revoking the last one does not open /v1/ again
    apikey_revoke(name=ApiKey.objects.get().name)
    _error(_get(client), 401, "UNAUTHORIZED")


def test_with_no_key_a_loopback_request_naming_another_host_is_refused(client: Client, api_keys_removed: None) -> None:
    # DNS rebinding: a page on evil.example, its name pointed at 127.0.0.1, reaches the API from loopback
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil.example"):
        _error(_get(client, HTTP_HOST=host), 401, "UNAUTHORIZED")
    for host in ("localhost", "localhost:8080", "127.0.0.1:8080", "[::1]:8080", "127.9.9.9", "api.localhost"):
        assert _get(client, HTTP_HOST=host).status_code == 404, host


def test_a_host_allowed_hosts_does_not_name_is_400_in_the_contracts_format(make_api_key: Any) -> None:
    token = make_api_key()
    with override_settings(ALLOWED_HOSTS=["birb.example"]):
        strict = Client()  # its middleware is loaded with these settings
        assert _get(strict, token=token, HTTP_HOST="birb.example").status_code == 404
        body = _error(_get(strict, token=token, HTTP_HOST="evil.example"), 400, "INVALID_REQUEST")
        assert body["details"] == {"host": "evil.example"}
        _error(strict.get("/admin/login/", HTTP_HOST="evil.example"), 400, "INVALID_REQUEST")


def test_required_needs_a_key_even_before_one_exists_and_off_needs_none(api_keys_removed: None) -> None:
    required = _client_for("required")
    _error(_get(required), 401, "UNAUTHORIZED")
    off = _client_for("off")
    assert _get(off, REMOTE_ADDR=NOT_LOOPBACK).status_code == 404
    assert _get(off, token="bn_00000000_made-up").status_code == 404  # off: headers are not even read


# --- the errors ------------------------------------------------------------------------------------------


def test_unknown_malformed_revoked_and_expired_keys_are_401(client: Client, make_api_key: Any) -> None:
    good = make_api_key()
    expiring_name = unique_key("expiring")
    expiring = make_api_key(expiring_name, expires_in=timedelta(seconds=1))
    revoked_name = unique_key("revoked")
    revoked = make_api_key(revoked_name)
    apikey_revoke(name=revoked_name)
    assert _get(client, token=expiring).status_code == 404
    time.sleep(1.1)
    for token in (
        good[:-1] + ("A" if good[-1] != "A" else "B"),  # right public id, wrong secret
        good[:11],
        "bn_ffffffff_" + good[12:],
        "x" * 5000,
        revoked,
        expiring,
    ):
        response = _get(client, token=token)
        body = _error(response, 401, "UNAUTHORIZED")
        assert body["error"] == "the API key is unknown, revoked or expired"
        assert response["WWW-Authenticate"] == 'Bearer realm="birb-nest", error="invalid_token"'
    for header in ("Basic dXNlcjpwdw==", f"Token {good}", "Bearer"):
        _error(_get(client, HTTP_AUTHORIZATION=header), 401, "UNAUTHORIZED")
    assert _get(client, token=good).status_code == 404


def test_each_method_needs_its_scope(client: Client, make_api_key: Any) -> None:
    reader, writer, deleter = (make_api_key(scopes=[scope]) for scope in ("read", "write", "delete"))
    key = unique_key("scoped")
    body = b'{"value": 1}'
    auth = {"HTTP_AUTHORIZATION": f"Bearer {writer}"}
    assert client.put(f"/v1/cache/{key}", body, content_type="application/json", **auth).status_code == 201
    cases = [
        (reader, "PUT", "write"),
        (reader, "POST", "write"),
        (reader, "DELETE", "delete"),
        (writer, "GET", "read"),
        (writer, "DELETE", "delete"),
        (deleter, "GET", "read"),
        (deleter, "PUT", "write"),
        (make_api_key(scopes=["admin"]), "GET", "read"),
    ]
    for token, method, scope in cases:
        response = client.generic(
            method, f"/v1/cache/{key}", body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
        )
        details = _error(response, 403, "FORBIDDEN")["details"]
        assert details["missing"] == "scope" and details["scope"] == scope, (method, details)
        assert scope in _error(response, 403, "FORBIDDEN")["error"]
    batch = client.post(
        "/v1/cache/batch/get",
        b'{"keys": ["a"]}',
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {writer}",
    )
    assert _error(batch, 403, "FORBIDDEN")["details"]["scope"] == "read"
    assert _get(client, key, token=reader).status_code == 200
    assert client.delete(f"/v1/cache/{key}", HTTP_AUTHORIZATION=f"Bearer {deleter}").status_code == 204


def test_a_key_is_confined_to_its_prefixes_at_their_edges(client: Client, make_api_key: Any) -> None:
    token = make_api_key(key_prefixes=["billing:", "tmp."])
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    inside = ["billing:", "billing:1", "billing::x", "tmp.", "tmp.a.b"]
    outside = ["billing", "billing.1", "Billing:1", "xbilling:1", "tmp", "tmp-a", "tmp:a"]
    for key in inside:
        assert _get(client, key, **auth).status_code == 404, key
    for key in outside:
        details = _error(_get(client, key, **auth), 403, "FORBIDDEN")["details"]
        assert details == {"missing": "key_prefix", "key_prefixes": ["billing:", "tmp."], "keys": [key]}
        put = client.put(f"/v1/cache/{key}", b'{"value": 1}', content_type="application/json", **auth)
        _error(put, 403, "FORBIDDEN")
        _error(client.delete(f"/v1/cache/{key}", **auth), 403, "FORBIDDEN")
    assert redis_store.read_many(outside) == [None] * len(outside)  # nothing written outside
    written = client.put("/v1/cache/billing:7", b'{"value": 7}', content_type="application/json", **auth)
    assert written.status_code == 201


def test_a_batch_get_with_any_key_outside_the_prefixes_is_refused_whole(client: Client, make_api_key: Any) -> None:
    full = make_api_key(scopes=["read", "write"])
    confined = make_api_key(scopes=["read"], key_prefixes=["team-a:"])
    for key in ("team-a:1", "team-b:1"):
        response = client.put(
            f"/v1/cache/{key}",
            b'{"value": "secret"}',
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {full}",
        )
        assert response.status_code == 201

    def batch(keys: list[str]) -> Any:
        return client.post(
            "/v1/cache/batch/get",
            orjson.dumps({"keys": keys}),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {confined}",
        )

    refused = batch(["team-a:1", "team-b:1"])
    body = _error(refused, 403, "FORBIDDEN")
    assert body["details"]["keys"] == ["team-b:1"]
    assert b"secret" not in refused.content  # no partial answer
    allowed = batch(["team-a:1", "team-a:2"])
    assert allowed.status_code == 200
    assert allowed.json() == {"entries": {"team-a:1": allowed.json()["entries"]["team-a:1"]}, "missing": ["team-a:2"]}


# --- every API process, within a second ----------------------------------------------------------------


def _status(base: str, token: str) -> int:
    """One GET on a new connection (granian hands connections to its workers in turn)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", f"/v1/cache/{unique_key('absent')}", headers={"Authorization": f"Bearer {token}"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_revocation_reaches_every_process_of_a_second_api_within_a_second(api, api_factory, make_api_key) -> None:
    second = api_factory().start()
    name = unique_key("leaving")
    token = make_api_key(name)
    wait_published()
    bases = (api.url, second.url)
    assert all(Counter(_status(base, token) for _ in range(20)) == {404: 20} for base in bases)
    apikey_revoke(name=name)
    revoked_at = time.monotonic()
    # Each poll: 20 new connections to each API (the kernel spreads them over both granian workers
    # of each); done when all say 401.
    wait_for(
        lambda: all(_status(base, token) == 401 for base in bases for _ in range(20)),
        timeout=3,
        interval=0.01,
        message="401 from every process",
    )
    elapsed = time.monotonic() - revoked_at
    print(f"revocation applied on both APIs {elapsed * 1000:.0f} ms after apikey_revoke returned")
    assert elapsed < 1.0
    time.sleep(max(0.0, 1.0 - elapsed))  # a second after: every process, however unlucky the polls were
    assert all(Counter(_status(base, token) for _ in range(40)) == {401: 40} for base in bases)


def test_a_key_with_its_own_rate_limit_is_counted_by_key(api, make_api_key: Any) -> None:
    try:
        ratelimit_settings_update(enabled=True, limit=100, window=60, algorithm="fixed", by="tests")
        token = make_api_key(rate_limit=2)
        wait_published()
        responses = [
            httpx.get(f"{api.url}/v1/cache/{unique_key('absent')}", headers={"Authorization": f"Bearer {token}"})
            for _ in range(3)
        ]
        assert [response.status_code for response in responses] == [404, 404, 429]
        assert responses[0].headers["X-RateLimit-Limit"] == "2"
        # the key is the client, whichever address sends it (in process: another REMOTE_ADDR)
        _error(_get(Client(), token=token, REMOTE_ADDR=NOT_LOOPBACK), 429, "RATE_LIMITED")
    finally:
        ratelimit_settings_update(enabled=False, limit=100, window=60, algorithm="fixed", by="tests")
        wait_published()


def test_last_used_is_recorded_without_a_database_write_per_request(client: Client, make_api_key: Any) -> None:
    name = unique_key("used")
    token = make_api_key(name)
    assert ApiKey.objects.get(name=name).last_used_at is None
    before = timezone.now().replace(microsecond=0)
    assert _get(client, token=token).status_code == 404
    assert ApiKey.objects.get(name=name).last_used_at is None  # the request wrote nothing
    flush_used()  # what the process's background thread does every 2 s
    listed = {row.name: row for row in apikey_list()}
    assert listed[name].last_used_at is not None and listed[name].last_used_at >= before


def test_the_stored_hash_is_djangos_salted_hmac(make_api_key: Any) -> None:
    from django.utils.crypto import salted_hmac

    token = make_api_key()
    row = ApiKey.objects.get(public_id=token[:11])
    assert row.key_hash == key_digest(token) == salted_hmac("birbnest.apikey", token, algorithm="sha256").hexdigest()


# --- no secret in any log line or error body -------------------------------------------------------------


def test_no_key_appears_in_logs_or_error_bodies(api_factory, make_api_key: Any, capfd: Any) -> None:
    from django.core.management import call_command

    server = api_factory(LOG_LEVEL="debug").start()
    token = make_api_key(scopes=["read"], key_prefixes=["p:"])
    call_command("apikey", "create", unique_key("cli"), "--scopes", "admin")
    cli_key = capfd.readouterr().out.strip().splitlines()[-1]
    assert cli_key.startswith("bn_")
    wait_published()
    bodies = []
    with httpx.Client(base_url=server.url) as http:
        for headers in (
            {"Authorization": f"Bearer {token}"},
            {"X-API-Key": token},
            {"Authorization": f"Bearer {token}x"},
            {"Authorization": f"Token {token}"},
            {"Authorization": f"Bearer {cli_key}"},
        ):
            for path in ("/v1/cache/p:1", "/v1/cache/q:1"):
                bodies.append(http.get(path, headers=headers).text)
            bodies.append(http.put("/v1/cache/p:1", json={"value": 1}, headers=headers).text)
            bodies.append(http.get("/admin/ratelimit", headers=headers).text)
    flush_used()
    call_command("apikey", "list")
    server.stop()
    secrets = (token[12:], cli_key[12:])
    logged = server.log_path.read_text() + capfd.readouterr().err
    for secret in secrets:
        assert secret not in logged
        assert not any(secret in body for body in bodies)
    assert token[:11] in "".join(bodies)  # the public id may be shown: it names the key


# --- audit -----------------------------------------------------------------------------------------------


def test_key_changes_and_an_admin_keys_rate_limit_change_are_audited(client: Client, api_keys_removed: None) -> None:
    import getpass
    import io

    from django.core.management import call_command

    from ops.models import AuditEntry

    name = unique_key("audited")
    out = io.StringIO()
    call_command("apikey", "create", name, "--scopes", "admin", stdout=out, stderr=io.StringIO())
    token = out.getvalue().strip().splitlines()[-1]
    call_command("apikey", "rotate", name, stdout=out, stderr=io.StringIO())
    rotated = out.getvalue().strip().splitlines()[-1]
    try:
        response = client.post(
            "/admin/ratelimit",
            b'{"limit": 50}',
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {rotated}",
            REMOTE_ADDR="127.0.0.5",
        )
        assert response.status_code == 200, response.content
    finally:
        ratelimit_settings_update(enabled=False, limit=100, window=60, algorithm="fixed", by="tests")
    call_command("apikey", "revoke", name, stdout=io.StringIO(), stderr=io.StringIO())
    entries = list(AuditEntry.objects.order_by("at", "pk").values("action", "actor", "address", "target", "details"))
    by_action = {entry["action"]: entry for entry in entries}
    cli = f"cli:{getpass.getuser()}"
    assert by_action["apikey.create"] | {"details": None} == {
        "action": "apikey.create",
        "actor": cli,
        "address": "cli",
        "target": name,
        "details": None,
    }
    assert by_action["apikey.rotate"]["details"]["previous_public_id"] == token[:11]
    assert by_action["apikey.revoke"]["actor"] == cli and by_action["apikey.revoke"]["target"] == name
    change = by_action["ratelimit.change"]
    assert (change["actor"], change["address"], change["details"]) == (
        f"key:{rotated[:11]}",
        "127.0.0.5",
        {"limit": 50},
    )
    stored = orjson.dumps(entries).decode()
    assert token[12:] not in stored and rotated[12:] not in stored  # never a secret


def test_a_block_names_a_key_or_an_address_and_a_valid_key_does_not_lift_an_address_block(
    make_api_key: Any,
) -> None:
    from ops.models import RateLimitClient
    from ops.ratelimit import ratelimit_client_block

    token, other = make_api_key(), make_api_key()
    client = Client()
    try:
        ratelimit_client_block(client=token[:11])
        ratelimit_client_block(client=NOT_LOOPBACK)
        _error(_get(client, token=token), 403, "FORBIDDEN")  # the key, from anywhere
        assert _get(client, token=other).status_code == 404
        _error(_get(client, token=other, REMOTE_ADDR=NOT_LOOPBACK), 403, "FORBIDDEN")  # the address, any key
    finally:
        RateLimitClient.objects.all().delete()
