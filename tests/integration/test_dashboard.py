"""The live dashboard: its page, its sampler on the real servers, its websocket, its server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import replace
from typing import Any

import httpx
import pytest
from asgiref.testing import ApplicationCommunicator
from django.contrib.auth.models import Permission
from django.test import Client

from ops.console import dashboard
from ops.console.dashboard import Hub, Sampler
from tests.conftest import free_port, manage, service_env, unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

EVERY_FIELD = {
    "time",
    "health",
    "requests_per_second",
    "hit_rate",
    "error_rate",
    "p99_ms",
    "stream_depth",
    "stream_messages",
    "consumer",
    "persist_lag_seconds",
    "dlq_depth",
    "errors",
}


def make_user(django_user_model: Any, *, staff: bool = True, may_view: bool = True) -> Any:
    user = django_user_model.objects.create_user(unique_key("user"), password="pw", is_staff=staff)
    if may_view:
        user.user_permissions.add(Permission.objects.get(content_type__app_label="ops", codename="view_dashboard"))
    return user


def session_cookie(user: Any) -> str:
    """A real session of ``user`` in the database, as the admin login would leave it."""
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def sample(sampler: Sampler) -> dict[str, Any]:
    return asyncio.run(sampler.sample())


# --- the page -------------------------------------------------------------------------------------


def test_page_needs_a_login(client) -> None:
    response = client.get("/admin/dashboard/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_page_refuses_staff_without_the_permission(client, django_user_model) -> None:
    client.force_login(make_user(django_user_model, may_view=False))
    assert client.get("/admin/dashboard/").status_code == 403


def test_page_refuses_non_staff_even_with_the_permission(client, django_user_model) -> None:
    client.force_login(make_user(django_user_model, staff=False))
    assert client.get("/admin/dashboard/").status_code == 302


def test_page_for_a_viewer_points_at_the_dashboard_server(client, django_user_model, settings) -> None:
    settings.BIRB = replace(settings.BIRB, api_port=8080, dashboard_port=0)
    client.force_login(make_user(django_user_model))
    response = client.get("/admin/dashboard/", HTTP_HOST="birb.example:8080")
    assert response.status_code == 200
    page = response.content.decode()
    config = response.context["dashboard_config"]
    assert config["websocket_url"] == "ws://birb.example:8081/ws/dashboard/"
    assert '"websocket_url": "ws://birb.example:8081/ws/dashboard/"' in page
    for hook in ('id="connection-state"', 'id="health-redis" data-status="unknown"', 'id="tile-rps"', "chart-p99"):
        assert hook in page


# --- the sampler on the real servers ---------------------------------------------------------------


def test_a_snapshot_has_every_figure(worker) -> None:
    worker.wait_ready()
    sampler = Sampler()
    sample(sampler)
    snapshot = sample(sampler)
    assert set(snapshot) == EVERY_FIELD
    running = ("worker", "database", "redis", "nats")
    statuses = {name: check["status"] for name, check in snapshot["health"].items()}
    assert {name: statuses[name] for name in running} == dict.fromkeys(running, "healthy"), snapshot["health"]
    assert set(statuses) == set(dashboard.HEALTH_NAMES)
    assert "jetstream" not in snapshot["errors"], snapshot["errors"]
    assert set(snapshot["consumer"]) == {"pending", "ack_pending", "redelivered"}
    assert all(isinstance(value, int) for value in snapshot["consumer"].values())
    assert isinstance(snapshot["stream_depth"], int) and isinstance(snapshot["dlq_depth"], int)
    assert isinstance(snapshot["persist_lag_seconds"], float)
    assert len(sampler.history) == 2


def test_no_api_shows_as_down_and_the_rest_still_updates(tmp_path) -> None:
    snapshot = sample(Sampler(api_port=free_port(), metrics_dir=tmp_path / "absent"))
    assert snapshot["health"]["api"]["status"] == "unhealthy"
    assert "is the API running" in snapshot["errors"]["metrics"]
    assert snapshot["requests_per_second"] is None
    assert snapshot["health"]["redis"]["status"] == "healthy"
    assert isinstance(snapshot["dlq_depth"], int)


def test_rates_come_from_the_api_processes(api) -> None:
    sampler = Sampler(api_port=api.port)
    first = sample(sampler)
    assert first["health"]["api"]["status"] == "healthy"
    keys = [unique_key("dash") for _ in range(10)]
    with httpx.Client(base_url=api.url) as http:
        for key in keys:
            assert http.post(f"/v1/cache/{key}", json={"value": key}).status_code == 201
        for key in keys * 3:
            assert http.get(f"/v1/cache/{key}").status_code == 200
        assert http.get(f"/v1/cache/{unique_key('absent')}").status_code == 404
    snapshot = sample(sampler)
    assert "metrics" not in snapshot["errors"], snapshot["errors"]
    assert snapshot["requests_per_second"] > 0
    assert 0.9 < snapshot["hit_rate"] < 1  # 30 hits, 1 miss
    assert snapshot["p99_ms"] > 0
    assert snapshot["error_rate"] == 0
    # Nothing in the next interval: a rate of zero, no hit rate or latency to speak of.
    quiet = sample(sampler)
    assert quiet["requests_per_second"] == 0 and quiet["hit_rate"] is None and quiet["p99_ms"] is None


def test_backlog_and_persist_lag_until_a_worker_catches_up(api, worker_factory) -> None:
    from persistence import streams_admin

    streams_admin.streams_ensure()  # the consumer exists even before a worker ever ran
    sampler = Sampler(api_port=api.port)
    with httpx.Client(base_url=api.url) as http:
        for _ in range(5):
            assert http.post(f"/v1/cache/{unique_key('lag')}", json={"value": 1}).status_code == 201
    time.sleep(0.3)
    backlog = sample(sampler)
    assert backlog["stream_depth"] >= 5
    assert backlog["consumer"]["pending"] + backlog["consumer"]["ack_pending"] == backlog["stream_depth"]
    assert backlog["stream_messages"] >= 5
    assert backlog["persist_lag_seconds"] >= 0.3

    worker_factory(WORKER_BATCH_TIMEOUT="100ms").start()
    # Messages other tests left behind are redelivered after the ack wait (10 s).
    caught_up = wait_for(
        lambda: (s := sample(sampler))["stream_depth"] == 0 and s, timeout=40, interval=0.5, message="no backlog"
    )
    assert caught_up["persist_lag_seconds"] == 0


def test_a_stopped_redis_shows_in_the_next_snapshot(servers) -> None:
    if not servers.owns("redis"):
        pytest.skip("Redis is an external server here; this test stops it")
    sampler = Sampler()
    assert sample(sampler)["health"]["redis"]["status"] == "healthy"
    servers.stop("redis")
    try:
        started = time.monotonic()
        snapshot = sample(sampler)
        assert time.monotonic() - started < 2 * dashboard.PROBE_TIMEOUT
        assert snapshot["health"]["redis"]["status"] == "unhealthy"
        assert snapshot["health"]["redis"]["error"]
        assert snapshot["health"]["database"]["status"] == "healthy"
        assert snapshot["health"]["nats"]["status"] == "healthy"
    finally:
        servers.start("redis")
    wait_for(lambda: sample(sampler)["health"]["redis"]["status"] == "healthy", timeout=10, message="redis back")


# --- the websocket ---------------------------------------------------------------------------------


class Websocket(ApplicationCommunicator):
    """channels.testing.WebsocketCommunicator, trimmed: `channels.testing` cannot be imported
    without daphne, which this project does not install (granian serves the websocket)."""

    def __init__(self, cookie: str | None = None) -> None:
        from birbnest.asgi import application

        headers = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
        if cookie:
            headers.append((b"cookie", f"sessionid={cookie}".encode()))
        scope = {"type": "websocket", "path": "/ws/dashboard/", "query_string": b"", "headers": headers}
        super().__init__(application, scope)

    async def connect(self) -> bool:
        await self.send_input({"type": "websocket.connect"})
        response = await self.receive_output(5)
        assert response["type"] in ("websocket.accept", "websocket.close"), response
        return bool(response["type"] == "websocket.accept")

    async def receive_json(self, timeout: float = 5) -> Any:
        response = await self.receive_output(timeout)
        assert response["type"] == "websocket.send", response
        return json.loads(response["text"])

    async def disconnect(self) -> None:
        await self.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.wait(2)


def http_get(path: str) -> dict[str, Any]:
    from birbnest.asgi import application

    async def get() -> dict[str, Any]:
        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "http.request", "body": b""})
        start = await communicator.receive_output(5)
        body = await communicator.receive_output(5)
        return {"status": start["status"], "body": body["body"]}

    return asyncio.run(get())


@pytest.fixture
def fast_hub(monkeypatch: pytest.MonkeyPatch) -> Any:
    hub = Hub(lambda: Sampler(interval=0.3))
    monkeypatch.setattr(dashboard, "hub", hub)
    yield hub
    hub.stop()


def test_websocket_sends_the_history_then_each_snapshot(django_user_model, fast_hub) -> None:
    cookie = session_cookie(make_user(django_user_model))

    async def scenario() -> list[dict[str, Any]]:
        first, second = Websocket(cookie), Websocket(cookie)
        assert await first.connect()
        received = [await first.receive_json() for _ in range(3)]
        # A page that connects later gets what the first one has seen so far.
        assert await second.connect()
        received.append(await second.receive_json())
        await first.disconnect()
        await second.disconnect()
        return received

    history, *updates, late_history = asyncio.run(scenario())
    assert history["type"] == "history" and history["interval"] == dashboard.SAMPLE_INTERVAL
    assert [message["type"] for message in updates] == ["snapshot", "snapshot"]
    assert set(updates[0]["snapshot"]) == EVERY_FIELD
    assert updates[0]["snapshot"]["health"]["redis"]["status"] == "healthy"
    assert updates[1]["snapshot"]["time"] > updates[0]["snapshot"]["time"]
    assert late_history["type"] == "history" and len(late_history["snapshots"]) >= 2


@pytest.mark.parametrize("who", ["anonymous", "staff without the permission", "not staff"])
def test_websocket_refuses_who_may_not_see_the_dashboard(who, django_user_model, fast_hub) -> None:
    users = {
        "anonymous": None,
        "staff without the permission": lambda: make_user(django_user_model, may_view=False),
        "not staff": lambda: make_user(django_user_model, staff=False),
    }
    make = users[who]
    cookie = session_cookie(make()) if make else None

    async def scenario() -> bool:
        communicator = Websocket(cookie)
        connected = await communicator.connect()
        await communicator.disconnect()
        return connected

    assert asyncio.run(scenario()) is False
    assert fast_hub.sampler is None, "a refused connection starts no sampling"


def test_plain_http_gets_a_one_line_answer() -> None:
    root, other = http_get("/"), http_get("/admin/")
    assert root["status"] == 200 and root["body"] == b"dashboard websocket server\n"
    assert other["status"] == 404


# --- the server: manage.py rundashboard ------------------------------------------------------------


def upgrade(port: int, cookie: str | None) -> tuple[str, socket.socket]:
    """A raw websocket handshake; the status line, and the socket to read frames from."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws/dashboard/ HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Origin: http://127.0.0.1:8080",
    ]
    if cookie:
        lines.append(f"Cookie: sessionid={cookie}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head.split(b"\r\n", 1)[0].decode(), sock


def read_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "connection closed mid-frame"
            data += chunk
        return data

    first, second = exactly(2)
    assert first & 0x0F == 0x1, f"expected a text frame, got opcode {first & 0x0F}"
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    elif length == 127:
        length = int.from_bytes(exactly(8), "big")
    return exactly(length)


def test_rundashboard_serves_the_websocket_and_exits_0_on_sigterm(django_user_model, tmp_path) -> None:
    cookie = session_cookie(make_user(django_user_model))
    port = free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = manage("rundashboard", "--port", str(port), env=service_env(), stdout=out, stderr=subprocess.STDOUT)
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).text == "dashboard websocket server\n"
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()
                return False

        wait_for(answers, timeout=10, interval=0.1, message="rundashboard listening")
        assert f"ws://127.0.0.1:{port}/ws/dashboard/" in log.read_text()

        status, refused = upgrade(port, cookie=None)
        refused.close()
        assert " 403 " in status + " ", status

        status, sock = upgrade(port, cookie)
        with sock:
            assert " 101 " in status, status
            message = json.loads(read_frame(sock))
            assert message["type"] == "history"
            message = json.loads(read_frame(sock))
            assert message["type"] == "snapshot" and set(message["snapshot"]) == EVERY_FIELD

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_p99_is_read_from_the_buckets_of_the_interval_only() -> None:
    from ops.console.dashboard import MetricTotals, interval_rates

    bounds = (0.001, 0.01, 0.1, float("inf"))
    before = MetricTotals(0.0, 1000, 0, 0, 0, dict(zip(bounds, (1000, 1000, 1000, 1000), strict=True)))
    # 100 requests in 2 s: 90 under 1 ms, 9 under 10 ms, one under 100 ms.
    after = MetricTotals(2.0, 1100, 1, 90, 10, dict(zip(bounds, (1090, 1099, 1100, 1100), strict=True)))
    rates = interval_rates(before, after)
    assert rates == {"requests_per_second": 50.0, "hit_rate": 0.9, "error_rate": 0.01, "p99_ms": 10.0}
    restarted = MetricTotals(3.0, 5, 0, 0, 0, dict(zip(bounds, (5, 5, 5, 5), strict=True)))
    assert set(interval_rates(after, restarted).values()) == {None}, "counters went back: the API restarted"
