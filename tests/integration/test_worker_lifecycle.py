"""Worker signals, liveness, start-up with a server down, and the delivery policy under outages."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from persistence import dead_letters, jetstream, streams_admin
from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for
from tests.integration.test_durability import Writer, wait_until_persisted

pytestmark = pytest.mark.django_db(transaction=True)


def test_sigusr1_reloads_batch_settings_without_losing_or_duplicating(api, worker_factory, tmp_path) -> None:
    env_file = tmp_path / "reload.env"
    env_file.write_text("WORKER_BATCH_SIZE=100\n")
    worker = worker_factory(BIRB_ENV_FILE=str(env_file)).start().wait_ready()
    with Writer(api.url, threads=4) as writer:
        wait_for(lambda: writer.count > 300, timeout=30)
        env_file.write_text("WORKER_BATCH_SIZE=7\nWORKER_BATCH_TIMEOUT=250ms\nLOG_LEVEL=debug\n")
        worker.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "configuration reloaded" in worker.log(), timeout=10, message="reload logged")
        wait_for(lambda: writer.count > 900, timeout=30)
    assert worker.proc.poll() is None, "SIGUSR1 must not stop the worker"
    line = next(line for line in worker.log().splitlines() if "configuration reloaded" in line)
    assert "batch size 100 -> 7" in line and "batch timeout 1s -> 0.25s" in line and "log level info -> debug" in line
    wait_until_persisted(writer)
    env_file.write_text("WORKER_BATCH_SIZE=lots\n")
    worker.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "configuration not reloaded" in worker.log(), timeout=10, message="bad value refused")
    assert 'invalid value for WORKER_BATCH_SIZE: \\"lots\\" is not an integer' in worker.log()
    assert worker.proc.poll() is None


def test_the_worker_touches_its_liveness_file(worker_factory, tmp_path) -> None:
    alive = tmp_path / "alive"
    worker_factory(WORKER_LIVENESS_FILE=str(alive)).start().wait_ready()
    wait_for(alive.exists, timeout=10)
    first = alive.stat().st_mtime
    wait_for(lambda: alive.stat().st_mtime > first, timeout=10, message="liveness file touched again")


def test_a_postgresql_outage_longer_than_the_ack_wait_uses_up_no_deliveries(servers, api, worker_factory) -> None:
    if not servers.owns("postgres"):
        pytest.skip("PostgreSQL is a shared server (BIRB_TEST_DATABASE_URL): this test must stop it")
    worker_factory().start().wait_ready()
    n = jetstream.names()
    redelivered_before = streams_admin.consumer_info(stream=n.stream, consumer=n.consumer).num_redelivered
    servers.stop("postgres")
    try:
        keys = [unique_key("held") for _ in range(20)]
        for key in keys:
            assert httpx.post(f"{api.url}/v1/cache/{key}", json={"value": key}).status_code == 201
        time.sleep(jetstream.ACK_WAIT + 3)  # the worker holds the batch past one ack wait
        info = streams_admin.consumer_info(stream=n.stream, consumer=n.consumer)
    finally:
        servers.start("postgres")
    assert info.num_redelivered == redelivered_before, "held with in_progress, never redelivered"
    wait_for(lambda: CacheEntry.objects.filter(key__in=keys).count() == 20, timeout=30, message="backlog drained")
    assert not [d for d in dead_letters.dead_letters_list(limit=1000) if d.key in keys]


def test_api_and_worker_started_while_nats_is_down_recover_by_themselves(servers, api_factory, worker_factory) -> None:
    if not servers.owns("nats"):
        pytest.skip("NATS is a shared server (BIRB_TEST_NATS_URL): this test must stop it")
    servers.stop("nats")
    try:
        api = api_factory().start()
        worker = worker_factory().start()
        health = httpx.get(f"{api.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["checks"]["nats"]["status"] == "unhealthy"
        assert health.json()["checks"]["database"]["status"] == "healthy"
        assert httpx.post(f"{api.url}/v1/cache/{unique_key()}", json={"value": 1}).status_code == 503
        wait_for(lambda: "NATS JetStream not ready" in worker.log(), timeout=15, message="worker retrying")
        assert worker.proc.poll() is None
    finally:
        servers.start("nats")
    worker.wait_ready(timeout=30)
    wait_for(lambda: httpx.get(f"{api.url}/health").status_code == 200, timeout=20, message="API healthy again")
    key = unique_key()
    # Each API process reconnects on its own: a write succeeds once the one it lands on has.
    wait_for(
        lambda: httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 1}).status_code in (200, 201),
        timeout=20,
        interval=0.5,
        message="writes accepted again",
    )
    wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), timeout=20)


def test_write_fallback_postgres_keeps_writes_available_while_nats_is_down(servers, api_factory) -> None:
    if not servers.owns("nats"):
        pytest.skip("NATS is a shared server (BIRB_TEST_NATS_URL): this test must stop it")
    api = api_factory(WRITE_FALLBACK="postgres").start()
    first = httpx.post(f"{api.url}/v1/cache/{(key := unique_key('fallback'))}", json={"value": 1})
    assert first.status_code == 201
    servers.stop("nats")
    try:
        second = httpx.put(f"{api.url}/v1/cache/{key}", json={"value": 2}, timeout=10)
        fresh = httpx.post(f"{api.url}/v1/cache/{(other := unique_key('fallback'))}", json={"value": 3}, timeout=10)
        row = CacheEntry.objects.get(key=key)
    finally:
        servers.start("nats")
    assert second.status_code == 200 and second.json()["version"] == 2
    assert fresh.status_code == 201
    assert (row.version, row.value) == (2, 2), "committed to PostgreSQL before the answer"
    assert CacheEntry.objects.get(key=other).value == 3
    assert httpx.get(f"{api.url}/v1/cache/{key}").json()["value"] == 2


def test_liveness_default_is_under_the_data_dir() -> None:
    from persistence.worker import WorkerConfig

    assert WorkerConfig.from_settings().liveness_file.endswith(os.sep + "worker.alive")
