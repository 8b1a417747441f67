"""The fault suite on real local clusters: a Redis Cluster (3 masters + 3 replicas), a three-node
NATS JetStream with R3 streams, two APIs and two workers (PostgreSQL is the session's).

A writer runs against both APIs (each key has one writer thread, so its order is known) while a
node or a process is killed with SIGKILL. Each scenario heals the fault, waits for the workers to
drain, checks PostgreSQL against every acknowledged write, and prints
``fault=cluster-… acknowledged=N persisted=N lost=0 resurrected=0 …``. Versions of every key only
grow, across API processes and a Redis failover. One scenario loses a majority of the NATS nodes:
writes answer 503 (never a 2xx that is not durable) and resume when the quorum is back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.faults.harness import SET, FaultWriter, report, settle

pytestmark = [pytest.mark.cluster, pytest.mark.django_db(transaction=True)]


@dataclass
class ClusterDeployment:
    """Two APIs and two workers on the session's clusters, with streams and a Redis prefix of
    their own."""

    redis: Any
    nats: Any
    env: dict[str, str]
    apis: list[Any] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)
    dlq_before: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def urls(self) -> list[str]:
        return [api.url for api in self.apis]

    # -- JetStream state, asked of the cluster (the test process's own settings point elsewhere) --

    def _ask(self, call: Any) -> Any:
        import nats

        async def go() -> Any:
            nc = await nats.connect(servers=self.nats.url.split(","), connect_timeout=2, max_reconnect_attempts=1)
            try:
                return await call(nc.jetstream(timeout=5))
            finally:
                await nc.close()

        return asyncio.run(go())

    def consumer_idle(self) -> bool:
        async def call(js: Any) -> bool:
            info = await js.consumer_info(self.env["BIRB_STREAM"], "birb-worker")
            return info.num_pending == 0 and info.num_ack_pending == 0

        return bool(self._ask(call))

    def dlq_last_seq(self) -> int:
        async def call(js: Any) -> int:
            return int((await js.stream_info(self.env["BIRB_DLQ_STREAM"])).state.last_seq)

        return int(self._ask(call))

    def stream_replicas(self) -> int:
        async def call(js: Any) -> int:
            return int((await js.stream_info(self.env["BIRB_STREAM"])).config.num_replicas)

        return int(self._ask(call))


@pytest.fixture
def deployment(redis_cluster: Any, nats_cluster: Any, api_factory: Any, worker_factory: Any) -> Iterator[Any]:
    suffix = uuid.uuid4().hex[:6].upper()
    env = {
        "REDIS_URL": redis_cluster.url,
        "NATS_URL": nats_cluster.url,
        "JETSTREAM_REPLICAS": "3",
        "BIRB_STREAM": f"CF_{suffix}",
        "BIRB_DLQ_STREAM": f"CF_{suffix}_DLQ",
        "BIRB_SUBJECT_PREFIX": f"cf{suffix.lower()}",
        "REDIS_KEY_PREFIX": f"cf{suffix.lower()}:",
    }
    redis_cluster.wait_healthy()
    nats_cluster.wait_healthy()
    d = ClusterDeployment(redis=redis_cluster, nats=nats_cluster, env=env)
    d.workers = [worker_factory(WORKER_BATCH_TIMEOUT="100ms", **env).start().wait_ready() for _ in range(2)]
    d.apis = [api_factory(**env).start() for _ in range(2)]
    assert d.stream_replicas() == 3
    d.dlq_before = d.dlq_last_seq()
    d.started = time.monotonic()
    yield d
    for worker in d.workers:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop()
    # Whatever a scenario killed is running again for the next one.
    for index, node in enumerate(nats_cluster.nodes):
        if node.proc is None or node.proc.poll() is not None:
            nats_cluster.start(index)
    for node in redis_cluster.nodes:
        if node.proc is None or node.proc.poll() is not None:
            redis_cluster.start(node.port)
    nats_cluster.wait_healthy(60)
    redis_cluster.wait_healthy(60)


def _finish(writer: FaultWriter, d: ClusterDeployment, fault: str) -> None:
    verdict = settle(
        writer, fault=fault, dlq_before=d.dlq_before, timeout=120, idle=d.consumer_idle, dlq_seq=d.dlq_last_seq
    )
    report(verdict, writer, started=d.started)
    assert verdict.dlq == 0, f"{verdict.summary_line()}: dead letters"
    _assert_versions_only_grow(writer)


def _assert_versions_only_grow(writer: FaultWriter) -> None:
    """Every key's acknowledged versions, in the order its one writer got them, strictly grow."""
    with writer.lock:
        logs = list(writer.keys.values())
    for log in logs:
        versions = [op.version for op in log.acked if op.kind == SET and op.version is not None]
        assert versions == sorted(set(versions)), f"{log.key}: versions went back or repeated: {versions}"


def _stream_leader(d: ClusterDeployment) -> int:
    def probe() -> list[int] | None:
        leader = d.nats.stream_leader(d.env["BIRB_STREAM"])
        return None if leader is None else [leader]  # node 0 leads: a list, not a falsy 0

    return int(wait_for(probe, timeout=15, message="a stream leader")[0])


def _writer(d: ClusterDeployment, **kwargs: Any) -> FaultWriter:
    return FaultWriter(d.urls[0], base_urls=d.urls, threads=8, **kwargs)


def test_nats_stream_leader_sigkilled(deployment: ClusterDeployment) -> None:
    d = deployment
    with _writer(d) as writer:
        writer.wait_acknowledged(800)
        leader = _stream_leader(d)
        d.nats.kill(leader)
        writer.wait_acknowledged(800, timeout=60, what="writes after the stream leader died")
        d.nats.start(leader)
        d.nats.wait_healthy(60)
        writer.wait_acknowledged(400, timeout=60, what="writes after the node is back")
    _finish(writer, d, "cluster-nats-leader-sigkill")


def test_nats_follower_sigkilled(deployment: ClusterDeployment) -> None:
    d = deployment
    with _writer(d) as writer:
        writer.wait_acknowledged(800)
        leader = _stream_leader(d)
        follower = next(i for i in range(len(d.nats.nodes)) if i != leader)
        d.nats.kill(follower)
        writer.wait_acknowledged(800, timeout=60, what="writes while a follower is down")
        d.nats.start(follower)
        d.nats.wait_healthy(60)
        writer.wait_acknowledged(400, timeout=60, what="writes after the node is back")
    _finish(writer, d, "cluster-nats-follower-sigkill")


def test_nats_majority_lost_writes_answer_503_then_resume(deployment: ClusterDeployment) -> None:
    d = deployment
    with _writer(d) as writer:
        writer.wait_acknowledged(800)
        killed = [1, 2]
        for index in killed:
            d.nats.kill(index)
        # Writes already sent may still be acknowledged by the quorum that was; then none can be.
        time.sleep(2)
        acked_before = writer.count
        writer.wait_status(503, 16, timeout=60)
        time.sleep(3)
        acked_without_quorum = writer.count - acked_before
        for index in killed:
            d.nats.start(index)
        d.nats.wait_healthy(60)
        writer.wait_acknowledged(800, timeout=90, what="writes after the quorum is back")
    print(f"acknowledged while 2 of 3 NATS nodes were down: {acked_without_quorum}")
    assert acked_without_quorum == 0, "a write was acknowledged without a JetStream quorum"
    _finish(writer, d, "cluster-nats-majority-lost")


def test_redis_master_sigkilled_replica_promoted(deployment: ClusterDeployment) -> None:
    d = deployment
    with _writer(d) as writer:
        writer.wait_acknowledged(800)
        victim = d.redis.master_ports()[0]
        d.redis.kill(victim)
        # Its replica is promoted after the node timeout; writes to its slots answer 503 until then
        # (and, with REDIS_CLUSTER_WAIT_REPLICAS=1, until the old master is back as its replica).
        wait_for(lambda: victim not in d.redis.master_ports(), timeout=30, message="the replica promoted")
        writer.wait_acknowledged(400, timeout=60, what="writes after the failover")
        d.redis.start(victim)
        d.redis.wait_healthy(60)
        writer.wait_acknowledged(800, timeout=60, what="writes after the old master rejoined")
    _finish(writer, d, "cluster-redis-master-sigkill")


def test_one_api_sigkilled(deployment: ClusterDeployment) -> None:
    d = deployment
    with _writer(d, timeout=15) as writer:
        writer.wait_acknowledged(800)
        d.apis[0].kill()
        writer.base_urls = [d.apis[1].url]  # a load balancer takes the dead one out
        writer.wait_acknowledged(800, what="writes through the other API")
    _finish(writer, d, "cluster-api-sigkill")


def test_one_worker_sigkilled(deployment: ClusterDeployment) -> None:
    d = deployment
    with _writer(d) as writer:
        writer.wait_acknowledged(800)
        d.workers[0].kill()
        writer.wait_acknowledged(1200, what="writes while one worker carries on")
    _finish(writer, d, "cluster-worker-sigkill")
