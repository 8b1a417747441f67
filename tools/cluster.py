"""`make cluster`: Birb Nest on real local clusters, from the same PyPI wheels as `make run`.

``python -m tools.cluster`` starts, all on 127.0.0.1, with their data under ``var/cluster/``
(``BIRB_CLUSTER_DIR`` or ``--data-dir`` moves it)::

    DATA_DIR/redis/node-<i>/   a Redis Cluster of 3 masters + 3 replicas (tools/redis_cluster.py)
    DATA_DIR/nats/             a 3-node NATS cluster with JetStream (tools/nats_cluster.py)
    DATA_DIR/postgres          one PostgreSQL (tools/stack.py); its log in DATA_DIR/log/
    DATA_DIR/stack.json        every process: PID, role, state, port
    DATA_DIR/stack.env         API_URLS, DATABASE_URL, REDIS_URL, NATS_URL, JETSTREAM_REPLICAS, SECRET_KEY

then applies the migrations and runs 2 APIs (`manage.py runapi`, a port each) and 2 workers
(`manage.py runworker`, sharing the durable consumer), all with ``REDIS_URL=redis+cluster://…``,
``NATS_URL`` = the three NATS servers and ``JETSTREAM_REPLICAS=3``. An app that exits on its own
is restarted with backoff by tools.stack's supervisor, as in `make run`. Ports are remembered in
the data dir, so a second start reuses ports and data.

From another terminal, ``BIRB_DATA_DIR=var/cluster .venv/bin/python manage.py …`` reaches the
cluster (manage.py reads ``$BIRB_DATA_DIR/stack.env``). Ctrl-C or SIGTERM, however often, stops
the apps first, then the servers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import signal
import sys
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.nats_cluster import NatsCluster, NatsClusterNode, start_nats_cluster
from tools.redis_cluster import RedisCluster, start_redis_cluster
from tools.stack import (
    _HTTP,
    Stack,
    StackError,
    StopRequestedError,
    _Child,
    _configured,
    _load_state,
    _run_relayed,
    _stop_children,
    _stop_request,
    _stored_secret_key,
    _Supervisor,
    _write_env_file,
    _write_state,
    start_stack,
)
from tools.stack_output import json_logging

logger = logging.getLogger("tools.cluster")

API_COUNT = 2
WORKER_COUNT = 2
JETSTREAM_REPLICAS = 3
# A first start takes these for the two APIs when they are free: beside `make run`'s 8080 (API)
# and 8081 (its dashboard), so both can run at once.
PREFERRED_API_PORT = 8180
# A server node that exits is started again this long after: time enough for the cluster to show
# what losing it does (a Redis failover takes 2-4 s with the 2 s node timeout).
NODE_RESTART_DELAY = 5.0
# How long the APIs may take to answer /health with 200 before the summary is printed anyway.
SERVING_TIMEOUT = 60.0
ROLES = {
    "supervisor": "make cluster itself (python -m tools.cluster): SIGTERM or SIGINT stops everything below",
    "api": "API main process (granian; its worker processes are its children)",
    "worker": "worker (manage.py runworker; SIGUSR1 reloads its configuration, SIGTERM drains it)",
    "redis": "Redis Cluster node (`redis-cli -p PORT cluster nodes` says whether master or replica)",
    "nats": "NATS server with JetStream, one of the cluster's three",
}
CLUSTER_KEYS = ("api-", "worker-", "redis-", "nats-")  # stack.json entries this module writes


def default_data_dir() -> Path:
    """``BIRB_CLUSTER_DIR``, else ``var/cluster`` in the checkout."""
    from birbnest.env import BASE_DIR

    raw = os.environ.get("BIRB_CLUSTER_DIR") or _configured()("BIRB_CLUSTER_DIR")
    return (Path(raw) if raw else BASE_DIR / "var" / "cluster").resolve()


@dataclass
class _ClusterChild(_Child):
    """An API or a worker of the cluster: tools.stack's child, with variables of its own (its port)."""

    extra_env: dict[str, str] = field(default_factory=dict)
    kind: str = ""  # api | worker
    port: int | None = None

    def start(self, cwd: Path, env: dict[str, str]) -> None:
        super().start(cwd, {**env, **self.extra_env})


@dataclass
class _ClusterSupervisor(_Supervisor):
    """tools.stack's supervisor loop; stack.json gets the cluster's processes (api-1, redis-0, …)."""

    redis: RedisCluster | None = None
    nats: NatsCluster | None = None
    restart_at: dict[str, float] = field(default_factory=dict)  # server nodes that exited: when to start them
    backoff: dict[str, float] = field(default_factory=dict)

    def _nodes(self) -> list[tuple[str, Any, Callable[[], None]]]:
        """(name, node, how to start it again) for every server node."""
        found: list[tuple[str, Any, Callable[[], None]]] = []
        if self.redis is not None:
            redis = self.redis
            found += [(f"redis-{n.index}", n, functools.partial(redis.start, n.port)) for n in redis.nodes]
        if self.nats is not None:
            nats = self.nats
            found += [(f"nats-{n.index}", n, functools.partial(nats.start, n.index)) for n in nats.nodes]
        return found

    def tick(self, now: float) -> None:
        """A server node that exited (killed, crashed) is started again with its port and data after
        NODE_RESTART_DELAY, like compose's `restart: unless-stopped`; until then the cluster runs
        without it (a Redis replica takes over its master's slots, NATS keeps quorum with 2 of 3)."""
        for name, node, start in self._nodes():
            if node.proc is not None and node.proc.poll() is None:
                continue  # running (or frozen with SIGSTOP: that is the operator's experiment)
            if name not in self.restart_at:
                delay = self.backoff.setdefault(name, NODE_RESTART_DELAY)
                code = node.proc.returncode if node.proc is not None else None
                logger.error("%s (port %d) exited (code %s); starting it again in %.0f s", name, node.port, code, delay)
                self.restart_at[name] = now + delay
                self.record()
            elif now >= self.restart_at[name]:
                try:
                    start()
                except RuntimeError as error:  # e.g. its port was taken meanwhile
                    self.backoff[name] = min(self.backoff[name] * 2, 60.0)
                    logger.error("%s did not start: %s; trying again in %.0f s", name, error, self.backoff[name])
                    self.restart_at[name] = time.monotonic() + self.backoff[name]
                else:
                    assert node.proc is not None
                    logger.info("%s started again (pid %d, port %d)", name, node.proc.pid, node.port)
                    del self.restart_at[name], self.backoff[name]
                self.record()

    def record(self, stopped: bool = False) -> None:
        state = _load_state(self.data_dir)
        for key in [key for key in state if key.startswith(CLUSTER_KEYS)]:
            state.pop(key)
        for child in self.children:
            assert isinstance(child, _ClusterChild)
            running = not stopped and child.state() == "running" and child.proc is not None
            state[child.name] = {
                "role": ROLES[child.kind],
                "pid": child.proc.pid if running and child.proc is not None else None,
                "state": "stopped" if stopped else child.state(),
                "command": " ".join(["manage.py", *child.argv[2:]]),
                **({"port": child.port} if child.port else {}),
            }
        for kind, server in (("redis", self.redis), ("nats", self.nats)):
            for node in server.nodes if server is not None else []:
                pid = node.proc.pid if not stopped and node.proc is not None and node.proc.poll() is None else None
                state[f"{kind}-{node.index}"] = {
                    "role": ROLES[kind],
                    "pid": pid,
                    "state": "running" if pid else "stopped" if stopped else "restarting",
                    "port": node.port,
                    # NATS: /healthz, /varz, /jsz (the runbook's localhost:8222)
                    **({"monitor_port": node.monitor_port} if isinstance(node, NatsClusterNode) else {}),
                    "log": str(node.log),
                }
        state["supervisor"] = {
            "role": ROLES["supervisor"],
            "pid": None if stopped else os.getpid(),
            "state": "stopped" if stopped else "running",
        }
        _write_state(self.data_dir, state)


def _environ() -> dict[str, str]:
    """What the apps will see before our variables: the operator's .env under the environment."""
    from dotenv import dotenv_values

    from birbnest.env import env_file

    path = env_file()
    dotenv = {k: v for k, v in dotenv_values(path).items() if v} if path.is_file() else {}
    return {**dotenv, **os.environ}


def _api_ports(data_dir: Path, requested: list[int] | None) -> list[int]:
    """``--api-ports``, else the ports of the last start if free, else 8180 and 8181 if free, else
    free ones; remembered in stack.json."""
    from tools.stack import _choose_port, _port_free

    state = _load_state(data_dir)
    remembered = state.get("ports", {})
    if requested:
        if len(requested) != API_COUNT or len(set(requested)) != API_COUNT:
            raise StackError(f"--api-ports takes {API_COUNT} different ports, e.g. 8180,8181")
        busy = [port for port in requested if not _port_free(port)]
        if busy:
            raise StackError(f"API port(s) in use: {busy}")
        ports = list(requested)
    else:
        ports, taken = [], set[int]()
        for index in range(API_COUNT):
            before = remembered.get(f"api-{index + 1}")
            port = _choose_port([before, PREFERRED_API_PORT + index], taken)
            if before and port != before:
                logger.warning("api-%d: port %s of the last start is taken; using %d", index + 1, before, port)
            ports.append(port)
            taken.add(port)
    state["ports"] = {**remembered, **{f"api-{index + 1}": port for index, port in enumerate(ports)}}
    _write_state(data_dir, state)
    return ports


def _health(url: str) -> int:
    """The status ``url``/health answers with, 0 when nothing answers."""
    try:
        with _HTTP.open(url + "/health", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:  # 503: up, but a server it needs is not
        return int(error.code)
    except OSError:
        return 0


def _wait_serving(children: list[_ClusterChild], urls: list[str]) -> dict[str, int]:
    """Each API's /health status once all answer 200, or after SERVING_TIMEOUT, or when an app
    exited (the supervisor deals with it) or a stop was asked for."""
    statuses, deadline = dict.fromkeys(urls, 0), time.monotonic() + SERVING_TIMEOUT
    while not _stop_request.signum:
        statuses = {url: status if status == 200 else _health(url) for url, status in statuses.items()}
        exited = any(child.proc is not None and child.proc.poll() is not None for child in children)
        if all(status == 200 for status in statuses.values()) or exited or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # each 503 is an error line in the API's log: not too many
    return statuses


def _serve(data_dir: Path, requested_ports: list[int] | None) -> int:
    """Servers, stack.env, migrations, apps, then the supervisor loop until a signal."""
    from birbnest.env import BASE_DIR, STACK_ENV_FILE, exit_on_config_error, load_config

    signal.signal(signal.SIGINT, _stop_request.handle)
    signal.signal(signal.SIGTERM, _stop_request.handle)
    stack: Stack | None = None
    redis: RedisCluster | None = None
    nats: NatsCluster | None = None
    children: list[_ClusterChild] = []
    supervisor: _ClusterSupervisor | None = None
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        base = _environ()
        secret_key = base.get("SECRET_KEY") or _stored_secret_key(data_dir)
        fixed = {
            "SECRET_KEY": secret_key,
            "BIRB_DATA_DIR": str(data_dir),
            "JETSTREAM_REPLICAS": str(JETSTREAM_REPLICAS),
            "API_HOST": "127.0.0.1",
        }
        with exit_on_config_error():  # a bad value in .env stops us before any server starts
            config = load_config({**base, **fixed, "DATABASE_URL": "", "REDIS_URL": "", "NATS_URL": ""})

        began = time.monotonic()
        stack = start_stack(data_dir, only=["postgres"])  # takes the data dir's lock first
        _stop_request.check()
        logger.info("starting the Redis Cluster (3 masters + 3 replicas)")
        redis = start_redis_cluster(data_dir / "redis")
        logger.info("Redis Cluster ready on ports %s", " ".join(str(node.port) for node in redis.nodes))
        _stop_request.check()
        logger.info("starting the NATS cluster (3 servers, JetStream)")
        nats = start_nats_cluster(data_dir / "nats")
        logger.info("NATS cluster ready on ports %s", " ".join(str(node.port) for node in nats.nodes))
        _stop_request.check()

        api_ports = _api_ports(data_dir, requested_ports)
        api_urls = [f"http://127.0.0.1:{port}" for port in api_ports]
        urls = {
            "API_URLS": ",".join(api_urls),
            "DATABASE_URL": stack.database_url,
            "REDIS_URL": redis.url,
            "NATS_URL": nats.url,
            "JETSTREAM_REPLICAS": str(JETSTREAM_REPLICAS),
        }
        env_file = data_dir / STACK_ENV_FILE
        _write_env_file(
            env_file,
            {**urls, "SECRET_KEY": secret_key},
            header="# Written by `python -m tools.cluster` (make cluster): its servers and APIs. manage.py reads it\n"
            f"# for unset variables when BIRB_DATA_DIR={data_dir}; scripts: set -a; . {env_file}; set +a\n",
        )
        env = {**os.environ, **fixed, **urls, "PYTHONUNBUFFERED": "1"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # runapi makes one per port
        env.pop("REDIS_CLUSTER", None)  # the URL says it
        with exit_on_config_error():
            config = load_config({**base, **env})

        json_output = config.log_format == "json"
        logger.info("applying migrations")
        migrate = _run_relayed(
            "migrate", [sys.executable, "manage.py", "migrate", "--noinput"], BASE_DIR, env, json_output
        )
        _stop_request.check()  # before judging migrate: Ctrl-C reaches it too
        if migrate:
            logger.error("migrate failed; stopping")
            return 1
        for index, port in enumerate(api_ports, 1):
            argv = [sys.executable, "manage.py", "runapi"]
            children.append(
                _ClusterChild(f"api-{index}", argv, extra_env={"API_PORT": str(port)}, kind="api", port=port)
            )
        for index in range(1, WORKER_COUNT + 1):
            argv, liveness = [sys.executable, "manage.py", "runworker"], str(data_dir / f"worker-{index}.alive")
            children.append(
                _ClusterChild(f"worker-{index}", argv, extra_env={"WORKER_LIVENESS_FILE": liveness}, kind="worker")
            )
        for child in children:
            child.json_output = json_output
            child.start(BASE_DIR, env)
        supervisor = _ClusterSupervisor(data_dir, stack, list[_Child](children), BASE_DIR, env, redis=redis, nats=nats)
        supervisor.record()
        health = _wait_serving(children, api_urls)
        _stop_request.check()
        for url, status in health.items():
            if status != 200:
                logger.warning("%s/health answers %s, not 200 yet (see its log lines above)", url, status or "nothing")
        _announce(config, supervisor, urls, health, time.monotonic() - began)
        return supervisor.run()
    except StopRequestedError:
        return 0  # the handler said so; what started is stopped below
    except RuntimeError as error:  # StackError and the cluster launchers' errors: a server did not start
        logger.error("%s", error)
        return 1
    finally:
        # Nothing here can be interrupted: further signals only say "already stopping".
        if children:
            logger.info("stopping the APIs and the workers")
            _stop_children(list[_Child](children))
        for name, server in (("NATS cluster", nats), ("Redis Cluster", redis)):
            if server is not None:
                logger.info("stopping the %s", name)
                server.stop()
        if stack is not None:
            stack.stop()
        if supervisor is not None:
            supervisor.record(stopped=True)
        # As in tools.stack: once everything is stopped, a late signal must not kill the exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _announce(config: Any, sup: _ClusterSupervisor, urls: dict[str, str], health: dict[str, int], took: float) -> None:
    """The summary: a banner on stdout, or with LOG_FORMAT=json one record holding the same."""
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):
        _print_summary(sup, urls, health, took)
    if config.log_format != "json":
        print(banner.getvalue(), end="", flush=True)
        return
    lines = [line.rstrip() for line in banner.getvalue().splitlines() if line.strip() and set(line) != {"="}]
    fields: dict[str, Any] = {
        # Scalars only (the JSON formatter turns anything else into its str()): lists are comma-separated.
        "api_urls": urls["API_URLS"],
        "postgres": urls["DATABASE_URL"],
        "redis": urls["REDIS_URL"],
        "nats": urls["NATS_URL"],
        "nats_monitor": ",".join(f"{node.monitor_url}/healthz" for node in sup.nats.nodes) if sup.nats else "",
        "jetstream_replicas": int(urls["JETSTREAM_REPLICAS"]),
        "data_dir": str(sup.data_dir),
        "stack_env": str(sup.data_dir / "stack.env"),
        "stack_json": str(sup.data_dir / "stack.json"),
        "banner": "\n".join(lines),
    }
    logger.info("cluster serving; Ctrl-C stops everything", extra=fields)


def _pid(child: _ClusterChild) -> str:
    return str(child.proc.pid) if child.proc is not None and child.proc.poll() is None else "not running"


def _print_summary(sup: _ClusterSupervisor, urls: dict[str, str], health: dict[str, int], took: float) -> None:
    children = [child for child in sup.children if isinstance(child, _ClusterChild)]
    redis, nats, data_dir = sup.redis, sup.nats, sup.data_dir
    assert redis is not None and nats is not None
    rows: list[tuple[str, str]] = []
    for child in children:
        if child.kind == "api":
            url = f"http://127.0.0.1:{child.port}"
            status = health.get(url) or "no answer"
            rows.append((child.name, f"{url}/  (pid {_pid(child)}; /health: {status}; /metrics, /admin/)"))
    workers = [child for child in children if child.kind == "worker"]
    rows.append(("workers", ", ".join(f"{child.name} pid {_pid(child)}" for child in workers)))
    rows.append(("PostgreSQL", urls["DATABASE_URL"]))
    master_count = redis.masters
    rows.append(("Redis Cluster", urls["REDIS_URL"]))
    rows.append(
        (
            "  nodes",
            f"{' '.join(str(n.port) for n in redis.nodes[:master_count])} (masters at start), "
            f"{' '.join(str(n.port) for n in redis.nodes[master_count:])} (their replicas)",
        )
    )
    rows.append(("NATS", urls["NATS_URL"]))
    rows.append(("  JetStream", f"streams with {urls['JETSTREAM_REPLICAS']} replicas"))
    rows.append(("  monitor", " ".join(f"http://127.0.0.1:{node.monitor_port}/" for node in nats.nodes)))
    rows += [("data dir", str(data_dir)), ("processes", str(data_dir / "stack.json"))]
    width = max(len(label) for label, _ in rows)
    print("\n" + "=" * 72)
    print(f"  Birb Nest on local clusters, up in {took:.0f} s")
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    relative = os.path.relpath(data_dir) if not os.path.relpath(data_dir).startswith("..") else str(data_dir)
    print(f"\n  URLs for scripts: {data_dir / 'stack.env'} (API_URLS, DATABASE_URL, REDIS_URL, NATS_URL, …)")
    print(f"  manage.py here:   BIRB_DATA_DIR={relative} .venv/bin/python manage.py jetstream report")
    print("  Ctrl-C stops everything.")
    print("=" * 72 + "\n", flush=True)


def _port_list(raw: str) -> list[int]:
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ports: {raw!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cluster", description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where everything lives (default $BIRB_CLUSTER_DIR or var/cluster)"
    )
    parser.add_argument(
        "--api-ports", type=_port_list, default=None, help="the two APIs' ports, e.g. 8180,8181 (default: as last time)"
    )
    args = parser.parse_args(argv)
    base_dir = str(Path(__file__).resolve().parent.parent)
    if base_dir not in sys.path:  # birbnest must import even when run from another directory
        sys.path.insert(0, base_dir)
    data_dir = args.data_dir.resolve() if args.data_dir else default_data_dir()
    if _configured()("LOG_FORMAT") == "text":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:  # json, the default (a bad value stops the start with its one line, further on)
        json_logging()
        _stop_request.json_lines = True
    return _serve(data_dir, args.api_ports)


if __name__ == "__main__":
    sys.exit(main())
