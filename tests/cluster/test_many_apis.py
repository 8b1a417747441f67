"""Many APIs, many workers on the clusters: what each process keeps for itself (the API keys, the
rate-limit configuration, the limiter's counters) stays one state across them.

Two APIs and two workers on the session's Redis Cluster and NATS cluster (PostgreSQL is the
session's). Keys are created and revoked with `manage.py apikey` pointed at the clusters, as an
operator on a third host would; the rate limit is changed through one API and enforced by both.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.conftest import BASE_DIR, clear_of_window_edge, service_env, unique_key, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def cluster_env(redis_cluster: Any, nats_cluster: Any) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:6]
    redis_cluster.wait_healthy()
    nats_cluster.wait_healthy()
    return {
        "REDIS_URL": redis_cluster.url,
        "NATS_URL": nats_cluster.url,
        "JETSTREAM_REPLICAS": "3",
        "BIRB_STREAM": f"MANY_{suffix.upper()}",
        "BIRB_DLQ_STREAM": f"MANY_{suffix.upper()}_DLQ",
        "BIRB_SUBJECT_PREFIX": f"many{suffix}",
        "REDIS_KEY_PREFIX": f"many{suffix}:",
    }


def _apikey(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", "apikey", *args],
        cwd=BASE_DIR, env=service_env(**env), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def _status(base: str, path: str, token: str | None = None, method: str = "GET", body: str | None = None) -> int:
    """One request on a new connection (granian hands connections to its workers in turn)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_keys_and_rate_limits_are_one_state_across_two_apis(
    cluster_env: dict[str, str], api_factory: Any, worker_factory: Any, api_keys_removed: None
) -> None:
    workers = [worker_factory(WORKER_BATCH_TIMEOUT="100ms", **cluster_env).start() for _ in range(2)]
    apis = [api_factory(**cluster_env).start() for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    bases = [api.url for api in apis]
    key = unique_key("many")

    # a write through one API is read through the other (and persisted by one of the workers)
    assert _status(bases[0], f"/v1/cache/{key}", method="PUT", body='{"value": 1}') in (200, 201)
    assert _status(bases[1], f"/v1/cache/{key}") == 200

    # an API key created on a third host applies on both within a second
    name = unique_key("ops")
    token = _apikey(cluster_env, "create", name, "--scopes", "read,write,delete,admin")
    created = time.monotonic()
    wait_for(
        lambda: all(_status(base, f"/v1/cache/{key}") == 401 for base in bases for _ in range(6)),
        timeout=3, interval=0.02, message="401 without a key from every API process",
    )  # fmt: skip
    print(f"key creation applied on both APIs after {(time.monotonic() - created) * 1000:.0f} ms")
    assert all(_status(base, f"/v1/cache/{key}", token) == 200 for base in bases for _ in range(6))

    # a rate limit set through API 1 is enforced by both, with one counter per client
    response = httpx.post(
        f"{bases[0]}/admin/ratelimit",
        json={"enabled": True, "limit": 1000, "window": 60},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    time.sleep(1.0)  # every process has read the new configuration
    small = httpx.post(
        f"{bases[1]}/admin/ratelimit",
        json={"enabled": True, "limit": 5, "window": 60, "algorithm": "fixed"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert small.status_code == 200, small.text
    time.sleep(1.0)
    clear_of_window_edge(60)  # all twelve in one fixed window
    statuses = Counter(_status(bases[i % 2], f"/v1/cache/{key}", token) for i in range(12))
    print(f"12 reads alternating over both APIs with a limit of 5: {dict(statuses)}")
    assert statuses == {200: 5, 429: 7}, statuses
    httpx.post(
        f"{bases[0]}/admin/ratelimit",
        json={"enabled": False},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )

    # a revocation on a third host applies on both within a second
    time.sleep(1.0)
    assert all(_status(base, f"/v1/cache/{key}", token) == 200 for base in bases)
    _apikey(cluster_env, "revoke", name)
    revoked = time.monotonic()
    wait_for(
        lambda: all(_status(base, f"/v1/cache/{key}", token) == 401 for base in bases for _ in range(6)),
        timeout=3, interval=0.02, message="401 with the revoked key from every API process",
    )  # fmt: skip
    elapsed = time.monotonic() - revoked
    print(f"revocation applied on both APIs after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.5
