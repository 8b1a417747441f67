"""Fault injection on real processes: nothing acknowledged is lost, nothing deleted comes back.

Each scenario writes through the real API (tests/faults/harness.py records every 2xx), injects a
fault while writes flow, heals it, waits for the worker to drain and checks PostgreSQL. It prints
``fault=<name> acknowledged=N persisted=N lost=0 resurrected=0 dlq=0 5xx=0`` and fails on any
lost or resurrected write, unexpected 5xx or dead letter.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import wait_for
from tests.faults.harness import FaultWriter, consumer_busy, report, settle

pytestmark = [pytest.mark.django_db(transaction=True)]


def _need(servers, name: str) -> None:
    if not servers.owns(name):
        pytest.skip(f"{name} is an external server (BIRB_TEST_*_URL): this scenario must stop it")


def _finish(writer: FaultWriter, scenario, fault: str, *, dlq: int = 0) -> None:
    verdict = settle(writer, fault=fault, dlq_before=scenario.dlq_before)
    report(verdict, writer, started=scenario.started)
    assert verdict.dlq == dlq, f"{verdict.summary_line()}: expected {dlq} dead letters"


def _kill_mid_batch(worker) -> None:
    """SIGKILL a worker that holds a fetched, unacknowledged batch.

    A batch normally takes milliseconds, so the table is locked against writes (reads go on):
    the worker fetches a batch, blocks in its upsert, and dies there. Its messages come back to
    the other workers after the consumer's ack wait (30 s)."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("LOCK TABLE cache_entries IN SHARE ROW EXCLUSIVE MODE")
        wait_for(consumer_busy, timeout=15, interval=0.02, message="a worker holding a batch")
        time.sleep(0.3)
        worker.kill()


def test_worker_sigkilled_mid_batch_twice_then_restarted(api, worker_factory, scenario) -> None:
    worker = scenario.track(worker_factory().start().wait_ready())
    with FaultWriter(api.url) as writer:
        writer.wait_acknowledged(1000)
        _kill_mid_batch(worker)
        writer.wait_acknowledged(500)  # writes while no worker runs
        worker = scenario.track(worker_factory().start().wait_ready())
        writer.wait_acknowledged(500)
        _kill_mid_batch(worker)
        writer.wait_acknowledged(500)
        scenario.track(worker_factory().start().wait_ready())
        writer.wait_acknowledged(1500)
    _finish(writer, scenario, "worker-sigkill-twice")


def test_two_workers_one_sigkilled(api, worker_factory, scenario) -> None:
    first = scenario.track(worker_factory().start().wait_ready())
    scenario.track(worker_factory().start().wait_ready())
    with FaultWriter(api.url) as writer:
        writer.wait_acknowledged(1000)
        _kill_mid_batch(first)
        writer.wait_acknowledged(3000)  # the other worker carries on alone
    _finish(writer, scenario, "two-workers-one-sigkill")


def test_postgresql_stopped_20s(servers, api, worker_factory, scenario) -> None:
    _need(servers, "postgres")
    scenario.track(worker_factory().start().wait_ready())
    with FaultWriter(api.url) as writer:
        writer.wait_acknowledged(1000)
        servers.stop("postgres")
        try:
            down = time.monotonic()
            writer.wait_acknowledged(500, what="writes accepted while PostgreSQL is down")
            time.sleep(max(0.0, 20 - (time.monotonic() - down)))
        finally:
            servers.start("postgres")
        writer.wait_acknowledged(1000, what="writes after PostgreSQL is back")
    _finish(writer, scenario, "pg-outage")


def test_nats_restarted(servers, api, worker_factory, scenario) -> None:
    _need(servers, "nats")
    scenario.track(worker_factory().start().wait_ready())
    with FaultWriter(api.url) as writer:
        writer.wait_acknowledged(1500)
        servers.stop("nats")
        try:
            writer.wait_status(503, 20)
        finally:
            servers.start("nats")
        writer.wait_acknowledged(1500, timeout=60, what="writes after NATS is back")
    _finish(writer, scenario, "nats-restart")


def test_redis_restarted_empty(servers, api, worker_factory, scenario) -> None:
    _need(servers, "redis")
    scenario.track(worker_factory().start().wait_ready())
    with FaultWriter(api.url) as writer:
        writer.wait_acknowledged(1500)
        servers.stop("redis")
        try:
            writer.wait_status(503, 20)
        finally:
            servers.start("redis")
        writer.wait_acknowledged(1500, timeout=60, what="writes after Redis is back")
    _finish(writer, scenario, "redis-restart")


def test_api_sigkilled_with_requests_in_flight(api_factory, worker_factory, scenario) -> None:
    scenario.track(worker_factory().start().wait_ready())
    first = api_factory().start()
    with FaultWriter(first.url, threads=12) as writer:
        writer.wait_acknowledged(1500)
        first.kill()  # SIGKILL to the process group: granian and its workers, mid-request
        second = api_factory().start()
        writer.base_url = second.url
        writer.wait_acknowledged(1500, what="writes through the new API")
    assert writer.statuses[0] > 0, "no request was in flight when the API died"
    _finish(writer, scenario, "api-sigkill")


def test_redis_restarted_empty_while_the_worker_lags(servers, api, worker_factory, scenario) -> None:
    _need(servers, "redis")
    worker = scenario.track(worker_factory().start().wait_ready())
    with FaultWriter(api.url) as writer:
        writer.wait_acknowledged(1000)
        worker.stop()  # a backlog builds up in JetStream: PostgreSQL is behind the acknowledged versions
        writer.wait_acknowledged(1000)
        servers.stop("redis")
        try:
            writer.wait_status(503, 20)
        finally:
            servers.start("redis")
        time.sleep(4)  # writes on an empty Redis while PostgreSQL is still behind JetStream
        scenario.track(worker_factory().start().wait_ready())
        writer.wait_acknowledged(1500, timeout=60, what="writes after Redis is back and the worker caught up")
    _finish(writer, scenario, "redis-restart-worker-behind")
