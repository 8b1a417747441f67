"""Birb Nest on a three-node NATS cluster with R3 JetStream streams (tools/nats_cluster.py).

One API and one worker for the module, against the session's cluster (NATS_URL lists the three
nodes, JETSTREAM_REPLICAS=3) with streams of their own, and the session's single Redis and
PostgreSQL. What is proven here:

- JetStream's PubAck on an R3 stream comes only once a quorum (2 of 3) stored the message: with
  both followers frozen there is no PubAck, with one frozen there is;
- both streams have three replicas, the consumer follows its stream, an existing R1 stream is
  brought to R3 in place, and `manage.py jetstream` shows replicas, leader and peers;
- kill -9 of the node leading the stream, and of the node the worker is connected to, while
  writing: every acknowledged write is in PostgreSQL afterwards; the API's publisher moves to
  another node when its own dies, and a connection closed for good is replaced;
- with 2 of 3 nodes dead, writes answer 503 (never 2xx) within the publish timeout, and 2xx
  again once one node is back.

The figures (seconds without an acknowledgement, 503s) are printed with ``-s``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import nats
import nats.errors
import pytest
from nats.js import api as js_api

from tests.conftest import BASE_DIR, Api, Worker, service_env, wait_for
from tests.faults.harness import FaultWriter, Verdict, settle
from tools.nats_cluster import NatsCluster

pytestmark = [pytest.mark.cluster, pytest.mark.django_db(transaction=True)]

PUBLISH_TIMEOUT = 5.0  # the default, so the figures are the ones an operator would see
CONSUMER = "birb-worker"


def names(suffix: str) -> dict[str, str]:
    return {
        "BIRB_STREAM": f"NC_{suffix}",
        "BIRB_DLQ_STREAM": f"NC_{suffix}_DLQ",
        "BIRB_SUBJECT_PREFIX": f"nc{suffix.lower()}",
    }


@dataclass
class Deployment:
    cluster: NatsCluster
    env: dict[str, str]
    api: Api
    worker: Worker
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def stream(self) -> str:
        return self.env["BIRB_STREAM"]

    @property
    def dlq_stream(self) -> str:
        return self.env["BIRB_DLQ_STREAM"]


def ask(cluster: NatsCluster, call: Callable[[Any, Any], Any], *, servers: list[str] | None = None) -> Any:
    """``call(nc, js)`` on a connection of this test process to the cluster's live nodes."""

    async def go() -> Any:
        live = servers or [node.url for node in cluster.nodes if node.running]
        nc = await asyncio.wait_for(
            nats.connect(servers=live, connect_timeout=1, max_reconnect_attempts=1, reconnect_time_wait=0.1), 10
        )
        try:
            return await call(nc, nc.jetstream(timeout=5))
        finally:
            await nc.close()

    return asyncio.run(go())


def stream_info(cluster: NatsCluster, stream: str) -> Any:
    return ask(cluster, lambda nc, js: js.stream_info(stream))


def consumer_info(cluster: NatsCluster, stream: str, consumer: str = CONSUMER) -> Any:
    return ask(cluster, lambda nc, js: js.consumer_info(stream, consumer))


def delete_streams(cluster: NatsCluster, *streams: str) -> None:
    async def call(nc: Any, js: Any) -> None:
        for stream in streams:
            await js.delete_stream(stream)

    ask(cluster, call)


def group(info: Any) -> set[str]:
    """The nodes holding a stream's or consumer's replicas: its leader and its peers."""
    cluster = info.cluster
    return {peer.name for peer in cluster.replicas or []} | ({cluster.leader} if cluster.leader else set())


def heal(cluster: NatsCluster) -> None:
    """Every node running (and none frozen), the cluster healthy: the state each test starts in."""
    for node in cluster.nodes:
        if node.running:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGCONT)
        else:
            cluster.start(node.index)
    cluster.wait_healthy(60)


def leader_of(cluster: NatsCluster, stream: str) -> int:
    def probe() -> list[int] | None:
        leader = cluster.stream_leader(stream)
        return None if leader is None else [leader]  # node 0 leads: a list, not a falsy 0

    return int(wait_for(probe, timeout=20, message=f"a leader for {stream}")[0])


def api_write(url: str, key: str, value: Any, timeout: float = 30) -> httpx.Response:
    return httpx.put(f"{url}/v1/cache/{key}", json={"value": value}, timeout=timeout)


def persisted_versions(prefix: str) -> dict[str, int]:
    from persistence.models import CacheEntry

    return dict(CacheEntry.objects.filter(key__startswith=prefix).values_list("key", "version"))


class Sampler:
    """Every 20 ms: (time, acknowledged writes, 503 answers) of a writer, to measure an outage."""

    def __init__(self, writer: FaultWriter) -> None:
        self.writer = writer
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.writer.lock:
                sample = (time.monotonic(), self.writer.acknowledged, self.writer.statuses[503])
            self.samples.append(sample)
            time.sleep(0.02)

    def outage(self, since: float) -> dict[str, float]:
        """After ``since``: the longest stretch without an acknowledged write, and the 503s."""
        after = [s for s in self.samples if s[0] >= since]
        longest, last_ack_at, last_acks = 0.0, since, after[0][1] if after else 0
        for t, acks, _ in after:
            if acks > last_acks:
                longest = max(longest, t - last_ack_at)
                last_ack_at, last_acks = t, acks
        return {
            "seconds_without_ack": round(longest, 2),
            "answers_503": (after[-1][2] - after[0][2]) if after else 0,
        }


# --- the deployment ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(
    nats_cluster: NatsCluster, django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    heal(nats_cluster)
    env = {
        "NATS_URL": nats_cluster.url,
        "JETSTREAM_REPLICAS": "3",
        "PUBLISH_TIMEOUT": f"{PUBLISH_TIMEOUT:g}s",
        **names(uuid.uuid4().hex[:6].upper()),
    }
    logs = tmp_path_factory.mktemp("nats-cluster")
    worker = Worker(logs / "worker.log", WORKER_BATCH_TIMEOUT="100ms", **env).start().wait_ready()
    api = Api(logs / "api.log", **env).start()
    d = Deployment(cluster=nats_cluster, env=env, api=api, worker=worker)
    try:
        yield d
    finally:
        api.stop()
        try:
            worker.stop()
        except subprocess.TimeoutExpired:
            worker.kill()
        heal(nats_cluster)
        delete_streams(nats_cluster, d.stream, d.dlq_stream)
        if d.figures:
            print(f"\nNATS cluster figures: {json.dumps(d.figures)}")


@pytest.fixture(autouse=True)
def healed(nats_cluster: NatsCluster) -> Iterator[None]:
    """A test that kills or freezes nodes leaves them running again for the next one."""
    yield
    heal(nats_cluster)


def drain(d: Deployment, writer: FaultWriter, fault: str) -> Verdict:
    """Wait for the worker to catch up, then compare PostgreSQL with every acknowledged write."""

    def idle() -> bool:
        info = consumer_info(d.cluster, d.stream)
        return info.num_pending == 0 and info.num_ack_pending == 0

    def dlq_seq() -> int:
        return int(stream_info(d.cluster, d.dlq_stream).state.last_seq)

    verdict = settle(writer, fault=fault, dlq_before=0, timeout=90, idle=idle, dlq_seq=dlq_seq)
    print(f"\n{verdict.summary_line()} 503={verdict.documented_503} uncertain={verdict.uncertain}")
    assert not writer.crashed, writer.crashed
    problems = "\n".join(str(p) for p in verdict.problems[:20])
    assert verdict.lost == 0 and verdict.resurrected == 0, f"{verdict.summary_line()}\n{problems}"
    assert verdict.dlq == 0 and verdict.unexpected_5xx == 0, (verdict.summary_line(), writer.unexpected[:10])
    assert verdict.acknowledged > 0
    return verdict


# --- the PubAck ------------------------------------------------------------------------------------


def test_a_pub_ack_on_an_r3_stream_waits_for_a_quorum_of_replicas(nats_cluster: NatsCluster) -> None:
    cluster = nats_cluster
    suffix = uuid.uuid4().hex[:6].upper()
    stream, subject = f"NCQ_{suffix}", f"ncq{suffix.lower()}.x"
    config = js_api.StreamConfig(name=stream, subjects=[subject], num_replicas=3, storage=js_api.StorageType.FILE)
    ask(cluster, lambda nc, js: js.add_stream(config))
    try:
        leader = leader_of(cluster, stream)
        followers = [node for node in cluster.nodes if node.index != leader]
        to_leader = [cluster.nodes[leader].url]  # the test's own connection stays up throughout

        def publish(timeout: float) -> tuple[str, float]:
            async def call(nc: Any, js: Any) -> tuple[str, float]:
                began = time.monotonic()
                try:
                    ack = await js.publish(subject, b"m", timeout=timeout)
                    return f"ack seq {ack.seq}", time.monotonic() - began
                except (TimeoutError, nats.errors.Error) as error:
                    return f"no ack: {type(error).__name__}", time.monotonic() - began

            return ask(cluster, call, servers=to_leader)  # type: ignore[no-any-return,unused-ignore]

        assert publish(5)[0].startswith("ack"), "all three replicas up"
        try:
            # given one follower frozen (SIGSTOP: its connections stay open, it just does not
            # answer), the leader and the other follower are a quorum
            followers[0].proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            with_quorum, took = publish(5)
            assert with_quorum.startswith("ack"), f"2 of 3 replicas up: {with_quorum}"
            # when the second follower is frozen too, the leader alone stores the message but
            # cannot commit it: no PubAck, however long the publisher waits
            followers[1].proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            without_quorum, waited = publish(3)
        finally:
            for node in followers:
                node.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        print(f"\nR3 PubAck: one follower frozen: {with_quorum} in {took:.3f}s; both: {without_quorum} ({waited:.1f}s)")
        assert without_quorum.startswith("no ack"), f"a PubAck with 1 of 3 replicas: {without_quorum}"
        assert waited >= 2.9
        cluster.wait_healthy(60)
        assert wait_for(lambda: publish(5)[0].startswith("ack"), timeout=30, message="a PubAck with the quorum back")
    finally:
        ask(cluster, lambda nc, js: js.delete_stream(stream))


# --- streams, replicas, the operator's view --------------------------------------------------------


def test_both_streams_have_three_replicas_and_writes_are_persisted(deployment: Deployment) -> None:
    d = deployment
    prefix = f"nc3-{uuid.uuid4().hex[:8]}"
    keys = [f"{prefix}-{i}" for i in range(30)]
    for i, key in enumerate(keys):
        response = api_write(d.api.url, key, {"i": i})
        assert response.status_code in (200, 201), response.text
    node_names = {node.name for node in d.cluster.nodes}
    for stream in (d.stream, d.dlq_stream):
        info = stream_info(d.cluster, stream)
        assert info.config.num_replicas == 3, stream
        assert group(info) == node_names, f"{stream}: a replica on each node"
    consumer = consumer_info(d.cluster, d.stream)
    assert consumer.config.num_replicas in (0, None, 3), "the consumer follows its stream"
    assert group(consumer) == node_names, "the consumer is replicated on each node too"
    wait_for(lambda: len(persisted_versions(prefix)) == len(keys), timeout=30, message="every write in PostgreSQL")


def run_manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"manage.py {' '.join(args)}: {result.stderr}"
    return result


def test_jetstream_command_shows_replicas_leader_and_peers(deployment: Deployment) -> None:
    d = deployment
    env = service_env(**d.env)
    leader = d.cluster.nodes[leader_of(d.cluster, d.stream)].name
    others = {node.name for node in d.cluster.nodes} - {leader}

    detail = json.loads(run_manage("jetstream", "info", "--json", env=env).stdout)
    assert detail["config"]["replicas"] == 3
    cluster = detail["state"]["cluster"]
    assert cluster["name"] == "birb-nest" and cluster["leader"] == leader
    assert {peer["name"] for peer in cluster["replicas"]} == others
    assert all(peer["current"] and not peer["offline"] for peer in cluster["replicas"])

    text = run_manage("jetstream", "info", env=env).stdout
    pairs = [line.strip().split(":", 1) for line in text.split("Cluster:", 1)[1].splitlines() if ":" in line]
    values = [(label, value.strip()) for label, value in pairs]
    assert ("Replicas", "3") in values, text
    assert any(label == "Leader" and value.startswith(leader) for label, value in values), text
    assert {value.split(":")[0] for label, value in values if label == "Replica"} == others, text

    ls = run_manage("jetstream", "ls", env=env).stdout
    row = next(line for line in ls.splitlines() if line.startswith(d.stream + " ")).split()
    assert "REPLICAS" in ls and "LEADER" in ls
    assert row[-4:-2] == ["3", leader], row  # ... REPLICAS LEADER OTHER-REPLICAS (two names)

    consumer = json.loads(run_manage("jetstream", "consumer-info", "--json", env=env).stdout)
    assert consumer["replicas"] == 3 and consumer["cluster"]["leader"] in {node.name for node in d.cluster.nodes}


def test_an_existing_stream_is_brought_to_jetstream_replicas_in_place(deployment: Deployment) -> None:
    d = deployment
    own = names(uuid.uuid4().hex[:6].upper())
    stream = own["BIRB_STREAM"]
    try:
        # given both streams and the consumer created with one replica
        run_manage("jetstream", "ensure", env=service_env(NATS_URL=d.cluster.url, JETSTREAM_REPLICAS="1", **own))
        assert stream_info(d.cluster, stream).config.num_replicas == 1
        assert len(group(consumer_info(d.cluster, stream))) == 1
        ask(d.cluster, lambda nc, js: js.publish(f"{own['BIRB_SUBJECT_PREFIX']}.persist.set", b"kept"))
        # when a process starts with JETSTREAM_REPLICAS=3
        second = run_manage(
            "jetstream", "ensure", env=service_env(NATS_URL=d.cluster.url, JETSTREAM_REPLICAS="3", **own)
        )
        # then the streams are updated, not recreated: the message is still there; the consumer follows
        assert "has 1 replica(s), JETSTREAM_REPLICAS is 3: updating it in place" in second.stderr + second.stdout
        for name in (stream, own["BIRB_DLQ_STREAM"]):
            assert stream_info(d.cluster, name).config.num_replicas == 3
        assert stream_info(d.cluster, stream).state.messages == 1
        wait_for(lambda: len(group(consumer_info(d.cluster, stream))) == 3, timeout=20, message="an R3 consumer")
    finally:
        delete_streams(d.cluster, stream, own["BIRB_DLQ_STREAM"])


# --- nodes killed while writing --------------------------------------------------------------------


def test_stream_leader_killed_while_writing_loses_no_acknowledged_write(deployment: Deployment) -> None:
    d = deployment
    with FaultWriter(d.api.url, threads=6, keys_per_thread=20) as writer, Sampler(writer) as sampler:
        writer.wait_acknowledged(300)
        leader = leader_of(d.cluster, d.stream)
        killed_at = time.monotonic()
        d.cluster.kill(leader)
        writer.wait_acknowledged(300, timeout=60, what="writes after the stream leader died")
        new_leader = leader_of(d.cluster, d.stream)
        d.cluster.start(leader)
        d.cluster.wait_healthy(60)
        writer.wait_acknowledged(100, timeout=60, what="writes after the node is back")
    figures = sampler.outage(killed_at)
    d.figures["stream_leader_sigkill"] = figures
    print(f"\nstream leader {d.cluster.nodes[leader].name} killed, {d.cluster.nodes[new_leader].name} leads: {figures}")
    assert new_leader != leader
    drain(d, writer, "nats-stream-leader-sigkill")


def test_node_of_the_worker_killed_while_writing_loses_no_acknowledged_write(deployment: Deployment) -> None:
    d = deployment
    assert d.worker.proc is not None
    worker_client = f"birb-nest-worker-{d.worker.proc.pid}"
    node = wait_for(lambda: _some(d.cluster.client_node(worker_client)), timeout=10, message="the worker's node")[0]
    # The stream leader elsewhere, so that this is the loss of the worker's connection only.
    for _ in range(5):
        if leader_of(d.cluster, d.stream) != node:
            break
        ask(d.cluster, lambda nc, js: nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{d.stream}", b"", timeout=5))
        time.sleep(0.5)
    log_before = len(d.worker.log())
    with FaultWriter(d.api.url, threads=6, keys_per_thread=20) as writer, Sampler(writer) as sampler:
        writer.wait_acknowledged(300)
        killed_at = time.monotonic()
        d.cluster.kill(node)
        writer.wait_acknowledged(300, timeout=60, what="writes after the worker's node died")
        moved = wait_for(lambda: _some(d.cluster.client_node(worker_client)), timeout=20, message="worker reconnected")
        d.cluster.start(node)
        d.cluster.wait_healthy(60)
        writer.wait_acknowledged(100, timeout=60, what="writes after the node is back")
    figures = sampler.outage(killed_at)
    d.figures["worker_node_sigkill"] = figures
    print(f"\nthe worker's node {d.cluster.nodes[node].name} killed; it moved to {moved[0]}: {figures}")
    assert moved[0] != node
    assert "NATS: reconnected" in d.worker.log()[log_before:]
    assert d.worker.proc.poll() is None, "the worker kept running"
    drain(d, writer, "nats-worker-node-sigkill")


def _some(value: int | None) -> list[int] | None:
    return None if value is None else [value]


def test_with_two_of_three_nodes_dead_writes_answer_503_then_resume_when_one_is_back(
    deployment: Deployment,
) -> None:
    d = deployment
    prefix = f"ncm-{uuid.uuid4().hex[:8]}"
    assert api_write(d.api.url, f"{prefix}-before", 0).status_code in (200, 201)
    leader = leader_of(d.cluster, d.stream)
    follower = next(node.index for node in d.cluster.nodes if node.index != leader)
    answers: list[tuple[float, float, int, str]] = []  # (sent at, seconds, status, key)
    stop = threading.Event()

    def write(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key, began = f"{prefix}-{n}-{i}", time.monotonic()
            try:
                status = api_write(d.api.url, key, i, timeout=PUBLISH_TIMEOUT + 10).status_code
            except httpx.HTTPError:
                status = 0
            answers.append((began, time.monotonic() - began, status, key))
            time.sleep(0.05)

    # when the stream leader and a follower die
    d.cluster.kill(leader)
    d.cluster.kill(follower)
    killed_at = time.monotonic()
    threads = [threading.Thread(target=write, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2 * PUBLISH_TIMEOUT + 1)
        outage = list(answers)
        # and one comes back
        back_at = time.monotonic()
        d.cluster.start(follower)
        resumed = wait_for(
            lambda: next((a for a in answers if a[0] >= back_at and a[2] in (200, 201)), None),
            timeout=60,
            message="a write acknowledged with 2 of 3 nodes",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(PUBLISH_TIMEOUT + 15)
    statuses = [status for _, _, status, _ in outage]
    slowest = max(seconds for _, seconds, _, _ in outage)
    resumed_after = resumed[0] + resumed[1] - back_at
    d.figures["majority_lost"] = {
        "answers": len(outage),
        "statuses": sorted(set(statuses)),
        "slowest_503_seconds": round(slowest, 2),
        "first_2xx_after_node_back_seconds": round(resumed_after, 2),
    }
    print(f"\n2 of 3 nodes dead: {d.figures['majority_lost']}")
    # then every write answered 503, within the publish timeout (and the API's own overhead)
    assert outage, "no write was answered while the majority was down"
    assert set(statuses) == {503}, f"answers with 2 of 3 nodes dead: {statuses}"
    assert slowest <= PUBLISH_TIMEOUT + 1.5, f"a 503 took {slowest:.1f}s"
    assert killed_at < resumed[0]
    # and every write acknowledged (before the outage, after the quorum came back) is persisted
    acknowledged = {f"{prefix}-before"} | {key for _, _, status, key in answers if status in (200, 201)}
    wait_for(
        lambda: acknowledged <= persisted_versions(prefix).keys(),
        timeout=60,
        message="the acknowledged writes persisted",
    )


# --- the API's publisher moves to another node ------------------------------------------------------


def test_the_publisher_moves_to_another_node_when_its_node_dies(nats_cluster: NatsCluster) -> None:
    """SyncJetStream (what the API publishes with) on the whole server list: its node is killed,
    the next publishes go through another one; a connection closed for good is replaced."""
    from django.conf import settings
    from django.test import override_settings

    from persistence import jetstream

    cluster = nats_cluster
    own = names(uuid.uuid4().hex[:6].upper())
    config = replace(
        settings.BIRB,
        nats_url=cluster.url,
        jetstream_replicas=3,
        birb_stream=own["BIRB_STREAM"],
        birb_dlq_stream=own["BIRB_DLQ_STREAM"],
        birb_subject_prefix=own["BIRB_SUBJECT_PREFIX"],
    )
    subject = f"{own['BIRB_SUBJECT_PREFIX']}.persist.set"
    publisher = jetstream.SyncJetStream()
    try:
        with override_settings(BIRB=config):

            def publish(i: int) -> int:
                return publisher.publish(subject, b"{}", headers={"Nats-Msg-Id": f"m{i}"}, timeout=PUBLISH_TIMEOUT)

            assert publish(0) > 0
            node = next(n.index for n in cluster.nodes if n.port == publisher.client().nc.connected_url.port)
            for _ in range(5):  # the stream's leader elsewhere: this is about the connection only
                if leader_of(cluster, own["BIRB_STREAM"]) != node:
                    break
                ask(cluster, lambda nc, js: nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{own['BIRB_STREAM']}", b""))
                time.sleep(0.5)

            # when the node the publisher is connected to dies
            killed_at = time.monotonic()
            cluster.kill(node)
            failures: list[str] = []

            def published_again() -> bool:
                try:
                    publish(len(failures) + 1)
                    return True
                except jetstream.PublishError as error:
                    failures.append(error.reason)
                    time.sleep(0.02)
                    return False

            wait_for(published_again, timeout=15, message="a publish through another node")
            took = time.monotonic() - killed_at
            moved_to = publisher.client().nc.connected_url.port
            print(f"\npublisher's node killed: publishing again after {took:.2f}s; meanwhile {failures}")
            # then it is connected to another node of the list, without a new connection
            assert moved_to != cluster.nodes[node].port
            assert moved_to in {n.port for n in cluster.nodes}
            assert took < 5, f"{took:.1f}s to publish again"

            # and a connection NATS closed for good is replaced by one to a node of the list (on
            # a healthy cluster: the replacement first checks both streams, and one whose leader
            # was on the dead node answers only once it has a new one)
            heal(cluster)
            first = publisher.client()
            publisher.run(first.nc.close(), 5)
            assert publish(10_000) > 0
            assert publisher.client() is not first and publisher.client().nc.is_connected
    finally:
        publisher.close()
        heal(cluster)
        delete_streams(cluster, own["BIRB_STREAM"], own["BIRB_DLQ_STREAM"])
