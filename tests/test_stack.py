"""tools.stack starts real PostgreSQL, Redis and NATS servers and keeps their data across restarts.

Run alone with ``.venv/bin/python -m pytest tests/test_stack.py -p no:django -q``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import psutil
import psycopg
import pytest
import redis

from tools.stack import Stack, StackError, make_temp_data_dir, start_stack, stop_orphans

BASE_DIR = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: as root, PostgreSQL runs as nobody and cannot enter pytest's 0700 basetemp.
    path = make_temp_data_dir("birb-test-stack-")
    yield path
    stop_orphans(path)  # safety net: a failed test must not leave servers behind
    shutil.rmtree(path, ignore_errors=True)


def sql(stack: Stack, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.database_url, autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(query)
        return cursor.fetchall() if cursor.description else []


def redis_client(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url, socket_timeout=5, decode_responses=True)


def jetstream(stack: Stack, action: Callable[[Any], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        nc = await nats.connect(stack.nats_url, connect_timeout=5, allow_reconnect=False)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def assert_gone(pids: list[int]) -> None:
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running: {alive}"


def our_processes(data_dir: Path) -> list[int]:
    """Processes whose command line or working directory is inside data_dir (what `ps` would show)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline, cwd = " ".join(proc.info["cmdline"] or []), proc.info["cwd"] or ""
        if str(data_dir) in cmdline or cwd.startswith(str(data_dir)):
            found.append(proc.info["pid"])
    return found


def test_servers_start_and_keep_data_across_restarts(data_dir: Path) -> None:
    stack = start_stack(data_dir)
    try:
        assert set(stack.processes) == {"postgres", "redis", "nats"}
        assert stack.urls() == {
            "DATABASE_URL": stack.database_url,
            "REDIS_URL": stack.redis_url,
            "NATS_URL": stack.nats_url,
        }
        assert stack.database_url.startswith("postgresql://postgres@127.0.0.1:")
        assert stack.database_url.endswith("/birbnest")
        assert sql(stack, "SELECT 1") == [(1,)]
        assert sql(stack, "SHOW fsync") == [("on",)]
        client = redis_client(stack)
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        with urllib.request.urlopen(stack.nats_monitor_url + "/healthz?js-enabled-only=true", timeout=5) as response:
            assert response.status == 200

        async def create_stream(js: Any) -> None:
            await js.account_info()  # raises unless JetStream is enabled
            await js.add_stream(name="STACKTEST", subjects=["stacktest.>"])
            ack = await js.publish("stacktest.one", b"hello")
            assert ack.seq == 1

        jetstream(stack, create_stream)
        sql(stack, "CREATE TABLE survivor (v text); INSERT INTO survivor VALUES ('pg')")
        client.set("survivor", "redis")
        ports, pids = dict(stack.ports), [p.pid for p in stack.processes.values()]
    finally:
        stack.stop()
    stack.stop()  # idempotent
    assert stack.processes == {}
    assert_gone(pids)
    assert json.loads((data_dir / "stack.json").read_text())["pids"] == {}

    with start_stack(data_dir) as again:
        assert again.ports == ports
        assert sql(again, "SELECT v FROM survivor") == [("pg",)]
        assert redis_client(again).get("survivor") == "redis"

        async def stream_messages(js: Any) -> int:
            return (await js.stream_info("STACKTEST")).state.messages

        assert jetstream(again, stream_messages) == 1
    assert our_processes(data_dir) == []


def test_one_server_stops_and_starts_on_the_same_port(data_dir: Path) -> None:
    with start_stack(data_dir, fsync=False, redis_persistence=False) as stack:
        assert redis_client(stack).config_get("appendonly") == {"appendonly": "no"}
        sql(stack, "CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
        old_pid = stack.processes["postgres"].pid

        stack.stop_server("postgres")
        assert "postgres" not in stack.processes
        assert_gone([old_pid])
        with pytest.raises(psycopg.OperationalError):
            sql(stack, "SELECT 1")
        assert redis_client(stack).ping()  # the others keep running

        # A postmaster.pid naming a dead process (a SIGKILLed server's) must not block the start.
        dead = subprocess.Popen(["true"])
        dead.wait()
        (data_dir / "postgres" / "postmaster.pid").write_text(f"{dead.pid}\n{data_dir / 'postgres'}\n")
        stack.start_server("postgres")
        assert stack.processes["postgres"].pid != old_pid
        assert sql(stack, "SELECT v FROM kept") == [(7,)]

        for name in ("redis", "nats"):
            port = stack.ports[name]
            stack.stop_server(name)
            stack.start_server(name)
            assert stack.ports[name] == port
        assert redis_client(stack).ping()
        jetstream(stack, lambda js: js.account_info())


def test_a_port_taken_after_the_check_is_replaced_on_first_start(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        (data_dir / "stack.json").write_text(json.dumps({"ports": {"redis": busy}, "pids": {}}))
        # As if another process bound the port between our check and redis-server's bind.
        monkeypatch.setattr("tools.stack._port_free", lambda port: True)
        with start_stack(data_dir, only={"redis"}, redis_persistence=False) as stack:
            assert stack.ports["redis"] != busy
            assert set(stack.urls()) == {"REDIS_URL"}
            assert redis_client(stack).ping()


def test_servers_left_by_a_killed_owner_are_stopped_and_ports_reused(data_dir: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from tools.stack import start_stack; "
        "stack = start_stack(Path(sys.argv[1]), fsync=False); print('ready', flush=True); time.sleep(120)"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)], cwd=BASE_DIR, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        state = json.loads((data_dir / "stack.json").read_text())
        with pytest.raises(StackError, match="another process"):
            start_stack(data_dir)  # the owner is alive: its servers are not ours to stop
    finally:
        owner.kill()  # SIGKILL: the owner cannot stop its servers
        owner.wait()
    orphans = list(state["pids"].values())
    assert all(psutil.pid_exists(pid) for pid in orphans)

    with start_stack(data_dir, fsync=False) as stack:
        assert_gone(orphans)
        assert stack.ports == state["ports"]
        assert sql(stack, "SELECT 1") == [(1,)]


def test_cli_servers_writes_stack_env_and_stops_everything_on_sigint(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "NATS_URL", "SECRET_KEY")}
    env["BIRB_DATA_DIR"] = str(data_dir)
    cli = subprocess.Popen(
        [sys.executable, "-m", "tools.stack", "servers"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stack_env = data_dir / "stack.env"
        deadline = time.monotonic() + 30
        while not stack_env.exists():
            assert cli.poll() is None, cli.stdout.read() if cli.stdout else ""
            assert time.monotonic() < deadline, "stack.env was not written"
            time.sleep(0.1)
        written = stack_env.read_text()
        for name in ("DATABASE_URL", "REDIS_URL", "NATS_URL", "SECRET_KEY"):
            assert f"{name}='" in written
        assert (data_dir / "secret_key").read_text().strip() in written
        pids = list(json.loads((data_dir / "stack.json").read_text())["pids"].values())
        assert pids and all(psutil.pid_exists(pid) for pid in pids)
    finally:
        cli.send_signal(signal.SIGINT)
        try:
            output, _ = cli.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            cli.kill()  # the fixture's stop_orphans then stops its servers
            raise
    assert cli.returncode == 0, output
    assert_gone(pids)
    assert our_processes(data_dir) == []


# --- signals: however many arrive, whenever they arrive, every server is stopped -----------------


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of `python -m tools.stack` on its own servers in ``data_dir`` (no *_URL)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "NATS_URL", "SECRET_KEY")}
    return {**env, "BIRB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra}


class Watched:
    """`python -m tools.stack <command>` with its output in a file, and every process it ever ran:
    servers recorded in stack.json, processes working in the data dir, its descendants."""

    def __init__(self, command: str, data_dir: Path, log_path: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.stack", command],
                cwd=BASE_DIR,
                env=cli_env(data_dir, **env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.recorded: set[int] = set()  # stack.json's pids
        # psutil.Process remembers its start time, so a PID reused later does not count as ours.
        self.seen: dict[int, psutil.Process] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def look(self) -> None:
        pids = set(our_processes(self.data_dir))
        with contextlib.suppress(FileNotFoundError, ValueError):
            recorded = json.loads((self.data_dir / "stack.json").read_text()).get("pids", {}).values()
            self.recorded.update(recorded)
            pids.update(recorded)
        with contextlib.suppress(psutil.NoSuchProcess):
            pids.update(child.pid for child in psutil.Process(self.proc.pid).children(recursive=True))
        for pid in pids - set(self.seen):
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen[pid] = psutil.Process(pid)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.look()
            assert self.proc.poll() is None, f"exited before {what}:\n{self.log()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log()}"
            time.sleep(0.01)
        self.look()

    def signals(self, count: int, gap: float = 0.03) -> None:
        for n in range(count):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)
            self.look()
            if n < count - 1:
                time.sleep(gap)

    def wait_exited(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.look()
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the supervisor did not exit in {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.02)
        return self.proc.returncode


def assert_all_stopped(watched: Watched) -> None:
    # A moment for init to reap what the supervisor left behind, then nothing of ours may run.
    time.sleep(0.5)
    alive = []
    for proc in watched.seen.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:150]}")
    assert not alive, "still running after the supervisor exited:\n" + "\n".join(alive) + "\n" + watched.log()
    assert our_processes(watched.data_dir) == []


def _server_ready(watched: Watched, name: str) -> Callable[[], bool]:
    return lambda: f"{name} ready on" in watched.log()


@pytest.mark.parametrize(
    "moment",
    [
        "first-server-starting",  # the burst lands while PostgreSQL is being created or started
        "nats-starting",  # PostgreSQL and Redis run, NATS is starting
        "serving",
        "stopping",  # one SIGTERM, then more while the servers are being stopped
    ],
)
def test_cli_servers_stop_everything_on_signals_in_quick_succession(
    data_dir: Path, tmp_path: Path, moment: str
) -> None:
    # given `python -m tools.stack servers` at some moment of its life
    watched = Watched("servers", data_dir, tmp_path / "stack.log")
    try:
        if moment == "first-server-starting":
            watched.wait_until(lambda: bool(our_processes(data_dir)), "a server process in the data dir")
        elif moment == "nats-starting":
            watched.wait_until(_server_ready(watched, "redis"), "redis ready")
        else:
            watched.wait_until(lambda: (data_dir / "stack.env").exists(), "stack.env")
        # when SIGTERM comes 3 times, 30 ms apart (make forwarding a signal it got twice, say)
        if moment == "stopping":
            watched.signals(1)
            watched.wait_until(lambda: "stopped (pid" in watched.log(), "the first server stopped")
            watched.signals(2)
        else:
            watched.signals(3)
        code = watched.wait_exited()
    finally:
        if watched.proc.poll() is None:
            watched.proc.kill()
    # then the supervisor exited and every server it started (or was starting) is gone
    assert watched.recorded or moment == "first-server-starting", watched.log()
    assert_all_stopped(watched)
    assert code == 0, watched.log()


def test_cli_run_stops_everything_on_signals_in_quick_succession(data_dir: Path, tmp_path: Path) -> None:
    # given `make run` serving: servers, the API, the worker, the dashboard and the job runner
    ports = {"API_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port())}
    watched = Watched("run", data_dir, tmp_path / "run.log", **ports)
    try:
        watched.wait_until(lambda: "Ctrl-C stops everything" in watched.log(), "the summary", timeout=90)
        watched.wait_until(lambda: _answers(int(ports["API_PORT"])), "the API answering", timeout=30)
        # when SIGTERM comes 3 times, 20 ms apart
        watched.signals(3, gap=0.02)
        code = watched.wait_exited(timeout=90)
    finally:
        if watched.proc.poll() is None:
            watched.proc.kill()
    # then everything it started is gone, the apps' processes included
    assert_all_stopped(watched)
    assert code == 0, watched.log()


def test_a_child_deaf_to_sigterm_is_killed_with_its_own_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    # given an app child that ignores SIGTERM, with a process of its own that ignores it too (as a
    # granian worker that got SIGTERM while loading the app: it serves on, holding the port)
    from tools.stack import _Child, _stop_children

    monkeypatch.setattr("tools.stack.CHILD_STOP_TIMEOUT", 1.0)
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print(worker.pid, flush=True); time.sleep(120)"
    )
    child = _Child("api", [sys.executable, "-c", code])
    child.proc = subprocess.Popen(child.argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert child.proc.stdout is not None
    worker = psutil.Process(int(child.proc.stdout.readline()))
    # when the supervisor stops its children
    _stop_children([child])
    # then both are gone
    assert child.proc.returncode == -signal.SIGKILL
    worker.wait(5)


def _answers(port: int) -> bool:
    try:
        # No proxy: urllib would send a loopback request through $http_proxy if one is set.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_signals_until_the_very_end_still_give_exit_code_0(data_dir: Path, tmp_path: Path) -> None:
    # A SIGTERM every 5 ms from the first to the process's exit (a supervisor that keeps
    # forwarding): one landing while Python exits found the default action restored there and
    # killed the process (-15) after everything had stopped cleanly (seen in a CI run).
    watched = Watched("servers", data_dir, tmp_path / "stack.log")
    try:
        watched.wait_until(lambda: (data_dir / "stack.env").exists(), "stack.env")
        while watched.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                watched.proc.send_signal(signal.SIGTERM)
            time.sleep(0.005)
        code = watched.wait_exited()
    finally:
        if watched.proc.poll() is None:
            watched.proc.kill()
    assert_all_stopped(watched)
    assert code == 0, watched.log()
