"""`make cluster` (python -m tools.cluster): everything starts, a write through one API is read
through the other and reaches PostgreSQL, stack.env leads manage.py to the cluster, SIGINT stops
every process, and a second start reuses the ports and the data.

Run alone with ``.venv/bin/python -m pytest tests/test_cluster_launcher.py -q``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil
import psycopg
import pytest
from dotenv import dotenv_values

from birbnest.env import load_env_files, redis_cluster_seeds, url_list
from tools.stack import make_temp_data_dir

BASE_DIR = Path(__file__).resolve().parent.parent
SUMMARY_EVENT = "cluster serving; Ctrl-C stops everything"
# Both runs, start to stop, measured at 45-55 s on a 2-core machine: the bound leaves room for a busy one.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]
# Variables that would point the launcher or its apps elsewhere than its own clusters and dir.
FOREIGN = ("DATABASE_URL", "REDIS_URL", "NATS_URL", "SECRET_KEY", "BIRB_DATA_DIR", "BIRB_CLUSTER_DIR", "API_PORT")


@pytest.fixture(autouse=True)
def birb_settings() -> None:
    """Replaces tests/conftest.py's session fixture here: the launcher starts its own servers."""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: as root, PostgreSQL runs as nobody and cannot enter pytest's 0700 basetemp.
    path = make_temp_data_dir("birb-test-cluster-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_ports(count: int) -> list[int]:
    """Ports that are free now, distinct (the kernel picks them)."""
    from tools.stack import _choose_port

    taken: set[int] = set()
    for _ in range(count):
        taken.add(_choose_port([], taken))
    return sorted(taken)


class Launcher:
    """`python -m tools.cluster` with its output in a file, and every process it ever ran."""

    def __init__(self, data_dir: Path, log_path: Path, api_ports: list[int]) -> None:
        self.data_dir, self.log_path = data_dir, log_path
        env = {key: value for key, value in os.environ.items() if key not in FOREIGN}
        env.update(BIRB_CLUSTER_DIR=str(data_dir), API_WORKERS="1", LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        ports = ",".join(map(str, api_ports))
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.cluster", "--api-ports", ports],
                cwd=BASE_DIR,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # psutil.Process remembers its start time: a PID reused later does not count as ours.
        self.seen: dict[int, psutil.Process] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def look(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)

    def summary(self, timeout: float) -> dict[str, Any]:
        """The JSON record the launcher logs once both APIs answer."""
        deadline = time.monotonic() + timeout
        while True:
            self.look()
            for line in self.log().splitlines():
                if line.startswith("{") and SUMMARY_EVENT in line:
                    record: dict[str, Any] = json.loads(line)
                    return record
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before its summary:\n{self.log()}"
            assert time.monotonic() < deadline, f"no summary after {timeout:.0f} s:\n{self.log()}"
            time.sleep(0.2)

    def interrupt(self, timeout: float = 45) -> int:
        """SIGINT, as Ctrl-C would send it; the exit code."""
        self.look()
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {timeout:.0f} s after SIGINT:\n{self.log()}") from None

    def assert_all_gone(self) -> None:
        time.sleep(0.3)  # for init to reap what was reparented to it
        alive = []
        for proc in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        assert not alive, "still running after the launcher exited:\n" + "\n".join(alive)

    def kill_everything(self) -> None:
        """After a failure: nothing of ours may outlive the test."""
        self.look()
        for proc in [*self.seen.values(), psutil.Process(self.proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.proc.wait(10)


def _client() -> httpx.Client:
    return httpx.Client(timeout=10, trust_env=False)  # no $http_proxy for loopback


def _wait_persisted(database_url: str, key: str, timeout: float = 20) -> tuple[Any, int]:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            row = conn.execute("SELECT value, version FROM cache_entries WHERE key = %s", (key,)).fetchone()
        if row is not None:
            value = json.loads(row[0]) if isinstance(row[0], str) else row[0]
            return value, int(row[1])
        assert time.monotonic() < deadline, f"{key} not in PostgreSQL after {timeout:.0f} s"
        time.sleep(0.2)


def _stream_replicas(nats_url: str) -> tuple[int, int]:
    """(num_replicas, replicas reported) of BIRB_CACHE, asked of the NATS cluster."""

    async def ask() -> tuple[int, int]:
        nc = await nats.connect(servers=list(url_list(nats_url)), connect_timeout=5, allow_reconnect=False)
        try:
            info = await nc.jetstream().stream_info(os.environ.get("BIRB_STREAM") or "BIRB_CACHE")
            followers = len(info.cluster.replicas or []) if info.cluster else 0
            return int(info.config.num_replicas or 1), followers + 1
        finally:
            await nc.close()

    return asyncio.run(ask())


def _ports(data_dir: Path) -> dict[str, Any]:
    state = json.loads((data_dir / "stack.json").read_text())
    return {name: entry.get("port") for name, entry in state.items() if isinstance(entry, dict) and "role" in entry}


def test_make_cluster_serves_through_both_apis_and_stops_everything(data_dir: Path, tmp_path: Path) -> None:
    began = time.monotonic()
    api_ports = free_ports(2)
    key, value = f"launcher:{uuid.uuid4().hex[:8]}", {"written": "through api-1", "n": 1}

    # given `make cluster` started in a fresh data dir
    launcher = Launcher(data_dir, tmp_path / "cluster-1.log", api_ports)
    try:
        summary = launcher.summary(timeout=70)
        urls = [f"http://127.0.0.1:{port}" for port in api_ports]
        assert summary["api_urls"] == ",".join(urls)
        assert len(redis_cluster_seeds(summary["redis"]).nodes) == 3 and summary["redis"].startswith("redis+cluster://")
        assert len(url_list(summary["nats"])) == 3 and summary["jetstream_replicas"] == 3

        # then stack.env holds what scripts need, and manage.py finds it through BIRB_DATA_DIR
        written = dotenv_values(data_dir / "stack.env")
        assert written["API_URLS"] == ",".join(urls)
        assert (written["REDIS_URL"], written["NATS_URL"]) == (summary["redis"], summary["nats"])
        assert written["DATABASE_URL"] == summary["postgres"] and written["JETSTREAM_REPLICAS"] == "3"
        assert written["SECRET_KEY"]
        environ = {"BIRB_DATA_DIR": str(data_dir), "BIRB_ENV_FILE": str(tmp_path / "no.env")}
        load_env_files(environ)
        assert {name: environ[name] for name in ("DATABASE_URL", "REDIS_URL", "NATS_URL", "JETSTREAM_REPLICAS")} == {
            name: written[name] for name in ("DATABASE_URL", "REDIS_URL", "NATS_URL", "JETSTREAM_REPLICAS")
        }

        # when a key is written through API 1
        with _client() as http:
            created = http.post(f"{urls[0]}/v1/cache/{key}", json={"value": value})
            assert created.status_code == 201, created.text
            # then API 2 reads it, the worker persists it, and the stream has 3 replicas
            read = http.get(f"{urls[1]}/v1/cache/{key}")
            assert read.status_code == 200, read.text
            assert (read.json()["value"], read.json()["version"]) == (value, 1)
        assert _wait_persisted(written["DATABASE_URL"] or "", key) == (value, 1)
        assert _stream_replicas(written["NATS_URL"] or "") == (3, 3)

        state = json.loads((data_dir / "stack.json").read_text())
        names = {"postgres", "api-1", "api-2", "worker-1", "worker-2", "supervisor"}
        names |= {f"redis-{i}" for i in range(6)} | {f"nats-{i}" for i in range(3)}
        assert names <= set(state), sorted(state)
        for name in names:
            assert state[name]["state"] == "running" and psutil.pid_exists(state[name]["pid"]), (name, state[name])
        ports_before = _ports(data_dir)

        # when Ctrl-C comes
        assert launcher.interrupt() == 0, launcher.log()
    except BaseException:
        launcher.kill_everything()
        raise
    # then every process it started is gone, and stack.json says so
    launcher.assert_all_gone()
    state = json.loads((data_dir / "stack.json").read_text())
    assert all(state[name]["state"] == "stopped" for name in names), state
    stop_lines = [line for line in launcher.log().splitlines() if "stopping the" in line or "stopped (pid" in line]
    assert "stopping the APIs and the workers" in stop_lines[0], stop_lines  # apps first, then the servers

    # given a second start on the same data dir
    again = Launcher(data_dir, tmp_path / "cluster-2.log", api_ports)
    try:
        second = again.summary(timeout=60)
        # then it has the same ports and the same data
        assert _ports(data_dir) == ports_before
        assert (second["redis"], second["nats"], second["postgres"]) == (
            summary["redis"],
            summary["nats"],
            summary["postgres"],
        )
        with _client() as http:
            read = http.get(f"{urls[1]}/v1/cache/{key}")
            assert read.status_code == 200 and read.json()["value"] == value, read.text
        assert again.interrupt() == 0, again.log()
    except BaseException:
        again.kill_everything()
        raise
    again.assert_all_gone()
    took = time.monotonic() - began
    print(f"two starts and stops in {took:.1f} s")
