"""Birb Nest on a Redis Cluster (3 masters + 3 replicas, tools/redis_cluster.py): an API and a worker
with ``REDIS_URL=redis+cluster://…``, on the session's single NATS and PostgreSQL, with streams and
a Redis key prefix of their own (issue #13, Redis part).

- every route of the data plane, rate limiting on;
- the Redis names of one cache key share a hash slot, and keys spread over every master;
- rehydration (``manage.py rehydrate``) and the namespace flush;
- ``REDIS_CLUSTER_WAIT_REPLICAS=1``: a master without its replica refuses writes (503, nothing
  published), and a master SIGKILLed right after acknowledged writes loses none of them: after
  its replica takes over, the next versions of its keys are higher and PostgreSQL has them all.

Plus the slot arithmetic without a cluster (key names, per-slot markers, grouping by node).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import orjson
import pytest
from django.conf import settings
from redis.crc import key_slot as redis_key_slot

from ops.ratelimit.config import RateLimitConfig
from persistence import redis_store
from persistence.keys import (
    SLOTS,
    counters_marker_key,
    counters_marker_key_of_slot,
    counters_marker_keys,
    entry_key,
    key_slot,
    reservation_key,
    strip_entry_prefix,
    version_key,
)
from persistence.models import CacheEntry
from tests.cluster.redis_fixtures import restored
from tests.conftest import Api, Worker, manage, service_env, unique_key, wait_for
from tools.redis_cluster import RedisCluster

RUN = uuid.uuid4().hex[:6]
PREFIX = f"rc{RUN}:"


@contextmanager
def cluster_settings(cluster: RedisCluster | None = None, **changes: Any) -> Iterator[None]:
    """This process's settings pointed at the cluster (with the module's key prefix), for the
    duration; the session's own Redis again afterwards."""
    old = settings.BIRB
    values: dict[str, Any] = {"redis_cluster": True, "redis_key_prefix": PREFIX, **changes}
    if cluster is not None:
        values["redis_url"] = cluster.url
    settings.BIRB = replace(old, **values)
    try:
        yield
    finally:
        settings.BIRB = old


# --- without a cluster: names and slots ----------------------------------------------------------


def test_a_keys_names_share_its_slot_and_each_slot_has_its_marker() -> None:
    with cluster_settings():
        for key in ("a", "user:42", "x" * 255, "dots.and-dashes_:"):
            names = [entry_key(key), version_key(key), reservation_key(key), counters_marker_key(key)]
            assert {key_slot(name) for name in names} == {redis_key_slot(key.encode())}, names
            assert entry_key(key) == f"{PREFIX}e:{{{key}}}" and strip_entry_prefix(entry_key(key)) == key
        markers = counters_marker_keys()
        assert len(set(markers)) == SLOTS
        assert [key_slot(name) for name in markers] == list(range(SLOTS))
        assert [redis_key_slot(name.encode()) for name in markers[::97]] == list(range(SLOTS))[::97]
        assert counters_marker_key_of_slot(7) == markers[7]


def test_on_a_single_redis_the_names_are_as_they_always_were() -> None:
    prefix = settings.BIRB.redis_key_prefix
    assert (entry_key("k:1"), version_key("k:1"), reservation_key("k:1")) == (
        f"{prefix}e:k:1",
        f"{prefix}n:k:1",
        f"{prefix}c:k:1",
    )
    assert counters_marker_key("k:1") == counters_marker_key() == f"{prefix}meta:counters-complete"
    assert counters_marker_keys() == [counters_marker_key()]
    assert strip_entry_prefix(entry_key("k:1")) == "k:1"


def test_commands_are_grouped_by_the_node_serving_their_slot_in_order() -> None:
    with cluster_settings():
        commands = [
            redis_store.read_command("a"),
            redis_store.assign_command("b", floor=None, if_match=None, counter_ttl_ms=1),
            ("GET", "plain"),
            redis_store.read_command("c"),
            ("PING",),
            redis_store.STORE_ENTRY.command([entry_key("a")], [1]),
        ]
        slots = [redis_store.command_slot(c) for c in commands]
        assert slots == [key_slot(b"a"), key_slot(b"b"), key_slot(b"plain"), key_slot(b"c"), None, key_slot(b"a")]

        def node_of(slot: int) -> str:
            return "low" if slot < SLOTS // 2 else "high"

        groups = redis_store.group_by_node(commands, node_of, default="any")
        assert sorted(i for indices in groups.values() for i in indices) == list(range(len(commands)))
        for node, indices in groups.items():
            assert indices == sorted(indices)  # each node gets its commands in the callers' order
            for index in indices:
                assert node == ("any" if slots[index] is None else node_of(slots[index]))  # type: ignore[arg-type]
        # a version script's keys (counter, marker) are in one slot: the command is routable
        assert len({key_slot(name) for name in commands[1][3:5]}) == 1


# --- on the cluster ------------------------------------------------------------------------------


@dataclass
class ClusterStack:
    cluster: RedisCluster
    env: dict[str, str]
    api: Api
    worker: Worker

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, timeout=10)

    def redis(self) -> Any:
        """A cluster client of this process (not the app's)."""
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.cluster.nodes[:3]])

    def slots_of(self, port: int) -> list[tuple[int, int]]:
        return next(n["slots"] for n in self.cluster.cluster_nodes() if n["port"] == port)

    def keys_on(self, port: int, count: int, name: str = "k") -> list[str]:
        ranges = self.slots_of(port)
        keys: list[str] = []
        while len(keys) < count:
            key = unique_key(name)
            slot = key_slot(key)
            if any(first <= slot <= last for first, last in ranges):
                keys.append(key)
        return keys


@pytest.fixture(scope="module")
def stack(
    redis_cluster: RedisCluster, django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterStack]:
    redis_cluster.wait_healthy()
    suffix = RUN.upper()
    env = {
        "REDIS_URL": redis_cluster.url,
        "REDIS_KEY_PREFIX": PREFIX,
        "REDIS_CLUSTER_WAIT_REPLICAS": "1",
        "BIRB_STREAM": f"RC_{suffix}",
        "BIRB_DLQ_STREAM": f"RC_{suffix}_DLQ",
        "BIRB_SUBJECT_PREFIX": f"rc{RUN}",
    }
    logs = tmp_path_factory.mktemp("redis-cluster")
    _rate_limit(redis_cluster, 100_000)
    worker = Worker(logs / "worker.log", WORKER_BATCH_TIMEOUT="100ms", **env).start()
    api = Api(logs / "api.log", **env)
    try:
        worker.wait_ready()
        api.start()
        yield ClusterStack(redis_cluster, env, api, worker)
    finally:
        api.stop()
        worker.stop()
        _delete_streams(env)
        restored(redis_cluster)


def _rate_limit(cluster: RedisCluster, limit: int) -> None:
    """Rate limiting on, with this limit per minute: the document every API process applies
    (within half a second), written where the module's API reads it."""
    with cluster_settings(cluster):
        redis_store.cluster_client().set(
            f"{PREFIX}ratelimit:config", RateLimitConfig(enabled=True, limit=limit, window=60).to_json()
        )


def _delete_streams(env: dict[str, str]) -> None:
    import asyncio

    import nats

    async def go() -> None:
        nc = await nats.connect(settings.BIRB.nats_url, connect_timeout=5, allow_reconnect=False)
        try:
            js = nc.jetstream()
            for stream in (env["BIRB_STREAM"], env["BIRB_DLQ_STREAM"]):
                try:
                    await js.delete_stream(stream)
                except Exception as error:  # gone already: nothing to clean
                    print(f"stream {stream} not deleted: {error}")
        finally:
            await nc.close()

    asyncio.run(go())


def _persisted(key: str) -> int | None:
    row = CacheEntry.objects.filter(key=key).values_list("version", flat=True).first()
    return None if row is None else int(row)


def _wait_persisted(versions: dict[str, int], timeout: float = 30) -> None:
    wait_for(
        lambda: all(_persisted(key) == version for key, version in versions.items()),
        timeout=timeout,
        message=f"the worker persisting {len(versions)} writes",
    )


pytestmark_db = pytest.mark.django_db(transaction=True)


@pytest.mark.cluster
@pytestmark_db
def test_every_route_works_on_the_cluster_with_rate_limiting_on(stack: ClusterStack) -> None:
    base = unique_key("route")
    key, other = f"{base}:a", f"{base}:b"
    with stack.http() as http:
        health = http.get("/health").json()
        assert health["checks"]["redis"]["status"] == "healthy", health
        # GET of a key nobody wrote: a miss, PostgreSQL says 404
        missing = http.get(f"/v1/cache/{key}")
        assert missing.status_code == 404 and "X-RateLimit-Limit" in missing.headers
        # create-only, create, read back (a hit), replace with If-Match, refuse a stale If-Match
        created = http.put(f"/v1/cache/{key}", json={"value": {"n": 1}}, headers={"If-None-Match": "*"})
        assert created.status_code == 201 and created.json()["version"] == 1, created.text
        again = http.post(f"/v1/cache/{key}", json={"value": 0}, headers={"If-None-Match": "*"})
        assert again.status_code == 412, again.text
        hit = http.get(f"/v1/cache/{key}")
        assert hit.status_code == 200 and hit.json()["value"] == {"n": 1}
        replaced = http.put(f"/v1/cache/{key}", json={"value": 2, "ttl": 600}, headers={"If-Match": "1"})
        assert replaced.status_code == 200 and replaced.json()["version"] == 2, replaced.text
        stale = http.put(f"/v1/cache/{key}", json={"value": 3}, headers={"If-Match": "1"})
        assert stale.status_code == 409, stale.text
        assert http.post(f"/v1/cache/{other}", json={"value": "b"}).status_code == 201
        # touch: a versioned write of the TTL
        touched = http.post(f"/v1/cache/{key}/touch", json={"ttl": 1200})
        assert touched.status_code == 200 and touched.json()["version"] == 3 and touched.json()["value"] == 2
        # batches span the masters
        many = [f"{base}:m{n}" for n in range(12)]
        results = http.post(
            "/v1/cache/batch/set", json={"entries": [{"key": k, "value": n} for n, k in enumerate(many)]}
        ).json()["results"]
        assert [r["status"] for r in results] == [201] * len(many)
        got = http.post("/v1/cache/batch/get", json={"keys": [*many, key, f"{base}:none"]}).json()
        assert {k: e["value"] for k, e in got["entries"].items()} == {**{k: n for n, k in enumerate(many)}, key: 2}
        assert got["missing"] == [f"{base}:none"]
        deleted = http.post("/v1/cache/batch/delete", json={"keys": many[:4]}).json()["results"]
        assert [r["status"] for r in deleted] == [204] * 4, deleted
        # listing: from PostgreSQL, once the worker has persisted what came before
        listing = http.get("/v1/cache", params={"prefix": base + ":", "limit": 100})
        assert listing.status_code == 200, listing.text
        assert listing.json()["keys"] == sorted([key, other, *many[4:]])
        # read-through: the entry gone from Redis is loaded from PostgreSQL and put back
        redis = stack.redis()
        with cluster_settings(stack.cluster):
            assert redis.delete(entry_key(other)) == 1
            reread = http.get(f"/v1/cache/{other}")
            assert reread.status_code == 200 and reread.json()["value"] == "b"
            assert redis.hget(entry_key(other), "v") == b"1"
        # DELETE, then the key reads as gone
        assert http.delete(f"/v1/cache/{key}").status_code == 204
        assert http.get(f"/v1/cache/{key}").status_code == 404
        assert http.delete(f"/v1/cache/{key}").status_code == 404
        # every request above was counted, in one slot for this client (its hash tag)
        counters = list(redis.scan_iter(match=f"{PREFIX}ratelimit:c:*", count=1000))
        assert counters and len({key_slot(name) for name in counters}) == 1
        # and a low limit applies: 429 with the headers
        _rate_limit(stack.cluster, 1)
        try:
            time.sleep(0.7)
            limited = http.get(f"/v1/cache/{other}")
            assert limited.status_code == 429 and limited.headers["Retry-After"], limited.text
        finally:
            _rate_limit(stack.cluster, 100_000)
            time.sleep(0.7)
        redis.close()


@pytest.mark.cluster
@pytestmark_db
def test_a_keys_names_share_a_slot_and_keys_spread_over_every_master(stack: ClusterStack) -> None:
    keys = [unique_key("spread") for _ in range(30)]
    with stack.http() as http:
        create_only = keys[0]
        assert (
            http.put(f"/v1/cache/{create_only}", json={"value": 1}, headers={"If-None-Match": "*"}).status_code == 201
        )
        results = http.post("/v1/cache/batch/set", json={"entries": [{"key": k, "value": k} for k in keys[1:]]})
        assert all(r["status"] == 201 for r in results.json()["results"])
    redis = stack.redis()
    masters: set[int] = set()
    with cluster_settings(stack.cluster):
        for key in keys:
            names = [entry_key(key), version_key(key), counters_marker_key(key)]
            slots = {int(redis.cluster_keyslot(name)) for name in names}  # CLUSTER KEYSLOT, asked of Redis
            assert slots == {key_slot(key)}, (key, names, slots)
            assert redis.exists(*names) == 3
            masters.add(stack.cluster.master_of_slot(slots.pop()))
        # the create-only write's reservation was in the same slot too, and is gone once stored
        assert int(redis.cluster_keyslot(reservation_key(create_only))) == key_slot(create_only)
        assert not redis.exists(reservation_key(create_only))
    assert masters == set(stack.cluster.master_ports()) and len(masters) == 3
    redis.close()


@pytest.mark.cluster
@pytestmark_db
def test_rehydrate_and_the_namespace_flush_work_on_the_cluster(stack: ClusterStack) -> None:
    keys = [unique_key("rehy") for _ in range(40)]
    with stack.http() as http:
        results = http.post("/v1/cache/batch/set", json={"entries": [{"key": k, "value": [k]} for k in keys]})
        assert all(r["status"] == 201 for r in results.json()["results"])
    _wait_persisted(dict.fromkeys(keys, 1))
    with cluster_settings(stack.cluster):
        redis = redis_store.cluster_client()
        before = len(list(redis.scan_iter(match=f"{PREFIX}*", count=1000)))
        assert redis_store.namespace_flush() == before
        assert not list(redis.scan_iter(match=f"{PREFIX}*", count=1000))
        assert redis_store.read_many(keys) == [None] * len(keys)
        _rate_limit(stack.cluster, 100_000)  # its document went with the rest
        rehydrate = manage(
            "rehydrate", "--all", "--no-progress", env=service_env(**stack.env), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        output = rehydrate.communicate(timeout=120)[0].decode(errors="replace")
        assert rehydrate.returncode == 0, output
        entries = redis_store.read_many(keys)
        assert [(e.key, orjson.loads(e.value_json)) for e in entries] == [(k, [k]) for k in keys]  # type: ignore[union-attr]
    # the API reads them as hits, and writes on top of them (the counters were flushed too:
    # seeded from PostgreSQL once the backlog is known to be drained)
    with stack.http() as http:
        assert http.get(f"/v1/cache/{keys[0]}").json()["value"] == [keys[0]]
        assert http.post(f"/v1/cache/{keys[0]}", json={"value": "next"}).json()["version"] == 2


@pytest.mark.cluster
@pytestmark_db
def test_the_operators_redis_work_runs_on_the_cluster(stack: ClusterStack) -> None:
    """The rate limiter's admin reads and resets, the job runner's lock, the published documents."""
    from ops.console.jobs import RunnerLock, runner_alive
    from ops.published import PublishedDocument
    from ops.ratelimit import ratelimit_client_clear, ratelimit_client_counts

    with stack.http() as http:
        assert http.get(f"/v1/cache/{unique_key('counted')}").status_code == 404
    with cluster_settings(stack.cluster):
        counts = ratelimit_client_counts(clients=["127.0.0.1", "10.9.9.9"])
        assert counts["127.0.0.1"] and counts["127.0.0.1"] >= 1 and counts["10.9.9.9"] == 0, counts
        assert ratelimit_client_clear(client="127.0.0.1") >= 1
        assert ratelimit_client_counts(clients=["127.0.0.1"]) == {"127.0.0.1": 0}
        lock = RunnerLock()
        assert lock.acquire() and runner_alive() is True
        lock.last_renew = 0
        lock.renew()
        lock.release()
        assert runner_alive() is False
        document = PublishedDocument(
            name="test", key_parts=("test", "doc"), parse=orjson.loads, compile=lambda: b'{"a": 1}', default=None
        )
        assert document.get() == {"a": 1}  # missing: compiled and stored (SET NX)
        assert document.live() == {"a": 1}
        redis_store.cluster_client().delete(document.key())


@pytest.mark.cluster
@pytestmark_db
def test_moved_and_ask_are_followed(stack: ClusterStack) -> None:
    """A slot moved between masters (as ``redis-cli --cluster reshard`` does) while this process's
    slot table is old: ASK during the migration, MOVED after it; round_trip follows both (its
    callers see plain replies), and the slot's counters marker moves with the slot."""
    cluster = stack.cluster
    source, target = cluster.master_ports()[:2]
    (key,) = stack.keys_on(source, 1, "moving")
    slot = key_slot(key)
    ids = {n["port"]: n["id"] for n in cluster.cluster_nodes()}
    entry = redis_store.StoredEntry(key, 1, b'"moved"', b"{}", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", None)
    admin = stack.redis()

    def on(port: int, *command: Any) -> Any:
        return admin.execute_command(*command, target_nodes=admin.get_node("127.0.0.1", port))

    def start_moving(src: int, dst: int) -> None:
        on(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        on(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])

    def finish_moving(src: int, dst: int) -> None:
        while names := on(src, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            on(src, "MIGRATE", "127.0.0.1", dst, "", 0, 5000, "REPLACE", "KEYS", *names)
        for port in (dst, src, *[p for p in cluster.master_ports() if p not in (src, dst)]):
            on(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
        wait_for(lambda: cluster.master_of_slot(slot) == dst, timeout=10, message="the slot moved")

    with cluster_settings(stack.cluster):
        marker = counters_marker_key(key)
        assert redis_store.read(key) is None  # the table says: source
        assert on(source, "EXISTS", marker) == 1  # set when the counters were first seeded
        start_moving(source, target)
        try:
            # the key is on neither: the source answers ASK for it, the target takes it after ASKING
            assert redis_store.store(entry)[0]
            assert redis_store.read(key) == entry
            assert on(target, "EXISTS", entry_key(key)) == 1
        finally:
            finish_moving(source, target)
        assert redis_store.read(key) == entry  # MOVED from the source, then the target
        assert redis_store.cluster_client().nodes_manager.get_node_from_slot(slot).port == target
        assert on(target, "EXISTS", marker) == 1  # the marker went with its slot
        start_moving(target, source)
        finish_moving(target, source)  # back where it was, with its keys
        cluster.wait_healthy(30)
        assert redis_store.read(key) == entry
        redis_store.cluster_client().delete(entry_key(key))
    admin.close()


@pytest.mark.cluster
@pytestmark_db
def test_a_master_without_its_replica_refuses_writes(stack: ClusterStack) -> None:
    cluster = stack.cluster
    master = cluster.master_ports()[0]
    (replica,) = cluster.replicas_of(master)
    on_master, direct = stack.keys_on(master, 2, "lonely")
    elsewhere = next(
        k for k in (unique_key("other") for _ in range(1000)) if cluster.master_of_slot(key_slot(k)) != master
    )
    cluster.kill(replica)
    try:
        # In this process: the version script's reply is refused unless the replica confirms
        # (REDIS_CLUSTER_WAIT_REPLICAS=0 takes it: the documented risk)
        with cluster_settings(cluster, redis_cluster_wait_replicas=1):
            command = redis_store.assign_command(direct, floor=0, if_match=None, counter_ttl_ms=60_000)
            (reply,) = redis_store.round_trip(command, scripts=redis_store.ASSIGN_SCRIPTS)
            assert isinstance(reply, redis_store.ReplicasNotReachedError), reply
        with cluster_settings(cluster, redis_cluster_wait_replicas=0):
            command = redis_store.assign_command(direct, floor=0, if_match=None, counter_ttl_ms=60_000)
            assert redis_store.round_trip(command, scripts=redis_store.ASSIGN_SCRIPTS) == [[1, 2]]
        with stack.http() as http:
            began = time.monotonic()
            refused = http.post(f"/v1/cache/{on_master}", json={"value": 1})
            took = time.monotonic() - began
            assert refused.status_code == 503, refused.text
            body = refused.json()
            assert body["code"] == "SERVICE_UNAVAILABLE" and "redis" in refused.text.lower(), body
            assert took >= redis_store.WAIT_TIMEOUT_MS / 1000 * 0.9  # the master waited for its replica
            # nothing was published: PostgreSQL never gets it, the key reads as absent
            assert http.get(f"/v1/cache/{on_master}").status_code == 404
            # the other masters have their replicas
            assert http.post(f"/v1/cache/{elsewhere}", json={"value": 1}).status_code == 201
            cluster.start(replica)
            cluster.wait_healthy(60)
            accepted = http.post(f"/v1/cache/{on_master}", json={"value": 2})
            assert accepted.status_code == 201, accepted.text
            version = accepted.json()["version"]
        _wait_persisted({on_master: version, elsewhere: 1})
    finally:
        restored(cluster)


@pytest.mark.cluster
@pytestmark_db
def test_versions_never_repeat_across_a_failover(stack: ClusterStack) -> None:
    """A master SIGKILLed right after acknowledged writes of keys in its slots: once its replica
    took over, each key's next version is higher than every acknowledged one, and PostgreSQL has
    every acknowledged write (nothing lost)."""
    cluster = stack.cluster
    victim = cluster.master_ports()[1]
    keys = stack.keys_on(victim, 8, "failover")
    acked: dict[str, list[int]] = {key: [] for key in keys}
    with stack.http() as http:
        for round_ in range(3):
            for key in keys:
                response = http.post(f"/v1/cache/{key}", json={"value": [key, round_]})
                assert response.status_code in (200, 201), response.text
                acked[key].append(response.json()["version"])
        deleted = keys[-1]
        removed = http.delete(f"/v1/cache/{deleted}")  # a tombstone, acknowledged just before the kill
        assert removed.status_code == 204
        cluster.kill(victim)
        killed_at = time.monotonic()
        # Its replica takes over (cluster-node-timeout 2 s, then the election); meanwhile, and
        # until the old master is back as the new one's replica (REDIS_CLUSTER_WAIT_REPLICAS=1),
        # writes of its keys are refused.
        refused = 0
        while cluster.master_of_slot(key_slot(keys[0])) == victim:
            assert time.monotonic() < killed_at + 30, "no failover within 30 s"
            response = http.post(f"/v1/cache/{keys[0]}", json={"value": [keys[0], "during"]})
            assert response.status_code == 503, response.text
            refused += 1
        promoted_at = time.monotonic()
        cluster.start(victim)
        cluster.wait_healthy(60)
        rejoined_at = time.monotonic()
        after: dict[str, int] = {}
        for key in keys[:-1]:
            response = http.post(f"/v1/cache/{key}", json={"value": [key, "after"]})
            assert response.status_code == 200, response.text
            after[key] = response.json()["version"]
        assert victim not in cluster.master_ports()
        for key, version in after.items():
            assert version > max(acked[key]), (key, acked[key], version)
            read = http.get(f"/v1/cache/{key}").json()
            assert (read["version"], read["value"]) == (version, [key, "after"])
        # the delete acknowledged before the kill holds: the promoted replica has the tombstone
        assert http.get(f"/v1/cache/{deleted}").status_code == 404
    print(
        f"redis failover: replica promoted {promoted_at - killed_at:.1f}s after the kill, old master back as "
        f"its replica {rejoined_at - promoted_at:.1f}s later; {refused} writes refused (503) meanwhile; "
        f"versions of {keys[0]}: {acked[keys[0]]} then {after[keys[0]]}"
    )
    # nothing lost: PostgreSQL ends at every key's last acknowledged version, the delete included
    _wait_persisted({**after, deleted: max(acked[deleted]) + 1})
    assert CacheEntry.objects.get(key=deleted).deleted
    restored(cluster)
