"""Nothing acknowledged is lost: real API (granian), real worker, servers stopped mid-flow.

The full fault matrix (workers SIGKILLed, API SIGKILLed, each server restarted) is tests/faults/.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass
class Writer:
    """Threads that write while a fault happens, recording every 2xx (key -> version, value)."""

    base_url: str
    threads: int = 8
    keys_per_thread: int = 40
    acknowledged: dict[str, tuple[int, int]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.prefix = unique_key("w")
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.threads)]

    def _run(self, n: int) -> None:
        i = 0
        with httpx.Client(base_url=self.base_url, timeout=10) as http:
            while not self.stop.is_set():
                key = f"{self.prefix}-{n}-{i % self.keys_per_thread}"
                try:
                    response = http.post(f"/v1/cache/{key}", json={"value": i})
                except httpx.HTTPError:
                    status = 0
                else:
                    status = response.status_code
                    if status in (200, 201):
                        version = response.json()["version"]
                        with self.lock:
                            if version > self.acknowledged.get(key, (0, 0))[0]:
                                self.acknowledged[key] = (version, i)
                with self.lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                i += 1

    def __enter__(self) -> Writer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)

    @property
    def count(self) -> int:
        return sum(n for status, n in self.statuses.items() if status in (200, 201))

    def missing_in_postgresql(self) -> dict[str, tuple[int, int | None]]:
        rows = dict(CacheEntry.objects.filter(key__startswith=self.prefix).values_list("key", "version"))
        return {k: (v, rows.get(k)) for k, (v, _) in self.acknowledged.items() if rows.get(k, 0) < v}


def wait_until_persisted(writer: Writer, timeout: float = 60) -> None:
    wait_for(
        lambda: not writer.missing_in_postgresql(),
        timeout=timeout,
        interval=0.25,
        message="every acknowledged write in PostgreSQL",
    )


def test_jetstream_outage_answers_503_and_loses_no_acknowledged_write(servers, api, worker) -> None:
    if not servers.owns("nats"):
        pytest.skip("NATS is a shared server (BIRB_TEST_NATS_URL): this test must stop it")
    with Writer(api.url) as writer:
        wait_for(lambda: writer.count > 300, timeout=30, message="writes flowing")
        servers.stop("nats")
        wait_for(lambda: writer.statuses.get(503, 0) > 20, timeout=30, message="503 during the outage")
        before_restart = writer.count
        servers.start("nats")
        wait_for(lambda: writer.count > before_restart + 300, timeout=60, message="writes accepted again")
    assert writer.statuses.keys() <= {200, 201, 503}, writer.statuses
    wait_until_persisted(writer)
    print(f"fault=nats-outage acknowledged={writer.count} 503={writer.statuses.get(503, 0)} lost=0")


def test_a_503_during_the_outage_has_the_contract_body(servers, api) -> None:
    if not servers.owns("nats"):
        pytest.skip("NATS is a shared server (BIRB_TEST_NATS_URL): this test must stop it")
    servers.stop("nats")
    try:
        response = httpx.post(f"{api.url}/v1/cache/{unique_key()}", json={"value": 1}, timeout=30)
        health = httpx.get(f"{api.url}/health", timeout=30)
    finally:
        servers.start("nats")
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "SERVICE_UNAVAILABLE" and body["details"]["dependency"] == "nats"
    assert health.status_code == 503
    assert health.json()["checks"]["nats"]["status"] == "unhealthy"
    assert health.json()["checks"]["database"]["status"] == "healthy"


def test_redis_down_reads_fall_back_to_postgresql_writes_503_health_names_it(servers, api, worker) -> None:
    if not servers.owns("redis"):
        pytest.skip("Redis is a shared server (BIRB_TEST_REDIS_URL): this test must stop it")
    wait_for(lambda: httpx.get(f"{api.url}/health").status_code == 200, timeout=20, message="healthy API")
    key = unique_key("persisted")
    assert httpx.post(f"{api.url}/v1/cache/{key}", json={"value": {"from": "pg"}}).status_code == 201
    wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), message="persisted")
    servers.stop("redis")
    try:
        read = httpx.get(f"{api.url}/v1/cache/{key}", timeout=30)
        write = httpx.post(f"{api.url}/v1/cache/{unique_key()}", json={"value": 1}, timeout=30)
        health = httpx.get(f"{api.url}/health", timeout=30)
    finally:
        servers.start("redis")
    assert read.status_code == 200 and read.json()["value"] == {"from": "pg"}
    assert write.status_code == 503 and write.json()["details"]["dependency"] == "redis"
    assert health.status_code == 503
    assert health.json()["checks"]["redis"]["status"] == "unhealthy"
    assert health.json()["status"] == "unhealthy"
    wait_for(lambda: httpx.get(f"{api.url}/health").status_code == 200, timeout=20, message="health back to 200")


def test_worker_sigterm_finishes_acknowledges_and_exits_0(api, worker_factory) -> None:
    worker = worker_factory().start().wait_ready()
    with Writer(api.url, threads=4) as writer:
        wait_for(lambda: writer.count > 500, timeout=30)
        worker.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.proc.wait(20) == 0, worker.log()
        assert time.monotonic() - started < 10
    assert "worker stopped" in worker.log()
    worker_factory().start()
    wait_until_persisted(writer)


def test_an_idle_worker_stops_at_once_on_sigterm_and_sigint(worker_factory) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        worker = worker_factory().start().wait_ready()
        time.sleep(1.5)  # idle: a fetch is waiting on the server
        started = time.monotonic()
        worker.proc.send_signal(sig)
        assert worker.proc.wait(10) == 0, worker.log()
        assert time.monotonic() - started < 5, "no drain timeout"


def test_postgresql_down_serves_hits_accepts_writes_and_503s_misses(servers, api, worker) -> None:
    if not servers.owns("postgres"):
        pytest.skip("PostgreSQL is a shared server (BIRB_TEST_DATABASE_URL): this test must stop it")
    cached = unique_key("cached")
    assert httpx.post(f"{api.url}/v1/cache/{cached}", json={"value": 1}).status_code == 201
    servers.stop("postgres")
    try:
        hit = httpx.get(f"{api.url}/v1/cache/{cached}", timeout=30)
        written = httpx.post(f"{api.url}/v1/cache/{unique_key('during')}", json={"value": 2}, timeout=30)
        miss = httpx.get(f"{api.url}/v1/cache/{unique_key('absent')}", timeout=30)
        misses = [httpx.get(f"{api.url}/v1/cache/{unique_key('absent')}", timeout=30) for _ in range(12)]
        health = httpx.get(f"{api.url}/health", timeout=30)
    finally:
        servers.start("postgres")
    assert hit.status_code == 200
    assert written.status_code == 201, written.text
    assert miss.status_code == 503 and miss.json()["code"] == "SERVICE_UNAVAILABLE"
    assert miss.json()["details"]["dependency"] == "database"
    assert {m.status_code for m in misses} == {503}
    assert any("circuit breaker is open" in m.json()["error"] for m in misses), "the breaker stops hammering PostgreSQL"
    assert health.status_code == 503 and health.json()["checks"]["database"]["status"] == "unhealthy"
    key = written.json()["key"]
    wait_for(
        lambda: CacheEntry.objects.filter(key=key).exists(), timeout=60, message="the write persisted after recovery"
    )
