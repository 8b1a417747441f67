"""Real servers for the whole session, and the processes tests start against them.

With ``BIRB_TEST_DATABASE_URL`` / ``BIRB_TEST_REDIS_URL`` / ``BIRB_TEST_NATS_URL`` set, those
servers are used, and this run keeps to its own database, Redis key prefix and streams (removed
at the end), so two runs never see each other's data. The others are started from the PyPI
wheels on free ports in a temporary directory (tools/stack.py) and stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dj_database_url
import httpx
import pytest

from tests.cluster.nats_fixtures import nats_cluster  # noqa: F401 - session fixture for every directory
from tests.cluster.redis_fixtures import redis_cluster  # noqa: F401 - session fixture for every directory
from tools.stack import Stack, make_temp_data_dir, start_stack

BASE_DIR = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
EXTERNAL = {
    "postgres": os.environ.get("BIRB_TEST_DATABASE_URL", ""),
    "redis": os.environ.get("BIRB_TEST_REDIS_URL", ""),
    "nats": os.environ.get("BIRB_TEST_NATS_URL", ""),
}


@dataclass
class Servers:
    """The session's servers: URLs, and the stack that owns the ones this run started."""

    database_url: str
    redis_url: str
    nats_url: str
    stack: Stack | None
    external: dict[str, bool] = field(default_factory=dict)

    def owns(self, name: str) -> bool:
        return self.stack is not None and name in self.stack.processes

    def stop(self, name: str) -> None:
        assert self.stack is not None
        self.stack.stop_server(name)

    def start(self, name: str) -> None:
        assert self.stack is not None
        self.stack.start_server(name)
        if name == "postgres":
            # The test's own connection died with the server; the next query opens a new one.
            from django.db import connections

            connections.close_all()


def _close_nats_clients() -> None:
    """This process's NATS connections: the publisher's and the stream admin's on its loop."""
    from persistence import jetstream, streams_admin

    for close in (streams_admin.close_connection, jetstream.close_publisher):
        try:
            close()
        except Exception as error:  # a test may have left NATS stopped or the loop busy
            print(f"closing a NATS connection: {type(error).__name__}: {error}")


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    missing = [name for name, url in EXTERNAL.items() if not url]
    data_dir = make_temp_data_dir() if missing else None
    stack = start_stack(data_dir, redis_persistence=False, fsync=False, only=missing) if data_dir else None
    try:
        yield Servers(
            database_url=EXTERNAL["postgres"] or (stack.database_url if stack else ""),
            redis_url=EXTERNAL["redis"] or (stack.redis_url if stack else ""),
            nats_url=EXTERNAL["nats"] or (stack.nats_url if stack else ""),
            stack=stack,
            external={name: bool(url) for name, url in EXTERNAL.items()},
        )
    finally:
        _close_nats_clients()  # before NATS stops: else reconnect attempts log after pytest closed its output
        if stack is not None:
            stack.stop()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def birb_settings(servers: Servers) -> Iterator[None]:
    """Point settings at the session's servers, before anything connects."""
    from django.conf import settings

    config = settings.BIRB
    overrides: dict[str, Any] = {
        "database_url": servers.database_url,
        "redis_url": servers.redis_url,
        "nats_url": servers.nats_url,
    }
    if servers.external["redis"]:
        overrides["redis_key_prefix"] = f"birbtest{RUN_ID}:"
    if servers.external["nats"]:
        overrides.update(
            birb_stream=f"BIRB_CACHE_T{RUN_ID}",
            birb_dlq_stream=f"BIRB_CACHE_DLQ_T{RUN_ID}",
            birb_subject_prefix=f"cachet{RUN_ID}",
        )
    settings.BIRB = replace(config, **overrides)
    settings.CACHES["default"]["LOCATION"] = servers.redis_url
    settings.CACHES["default"]["KEY_PREFIX"] = settings.BIRB.redis_key_prefix + "django"
    parsed = dj_database_url.parse(servers.database_url)
    database = settings.DATABASES["default"]
    for name in ("NAME", "USER", "PASSWORD", "HOST", "PORT"):
        database[name] = parsed.get(name, "")
    database.setdefault("TEST", {})["NAME"] = (
        f"test_birbnest_{RUN_ID}" if servers.external["postgres"] else "test_birbnest"
    )
    yield
    _remove_run_state(servers)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: Any) -> Iterator[None]:
    """pytest-django's, plus: the connections the version seed keeps per thread are closed
    before the test database is dropped (it refuses while sessions are open)."""
    yield
    from persistence.selectors import close_version_connections

    close_version_connections()


def _remove_run_state(servers: Servers) -> None:
    """Streams and Redis keys of this run on shared servers (own servers are simply stopped)."""
    from django.conf import settings

    if servers.external["nats"]:
        from persistence import jetstream

        client = jetstream.publisher()
        try:
            js = client.client()
            for stream in (settings.BIRB.birb_stream, settings.BIRB.birb_dlq_stream):
                client.run(js.js.delete_stream(stream), timeout=5)
        except Exception as error:  # best effort: report, do not fail the run at teardown
            print(f"could not delete this run's streams: {error}", file=sys.stderr)
    if servers.external["redis"]:
        from persistence import redis_store

        flush_redis_namespace(redis_store.client(), settings.BIRB.redis_key_prefix)


def flush_redis_namespace(client: Any, prefix: str) -> int:
    """FLUSHDB for this run only: delete every key under the run's prefix."""
    removed = 0
    for batch in _chunks(client.scan_iter(match=f"{prefix}*", count=1000), 500):
        removed += client.delete(*batch)
    return removed


def _chunks(items: Any, size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@pytest.fixture(autouse=True)
def _fresh_content_type_cache() -> None:
    """A transactional test's flush recreates content types with new ids; the per-process
    cache would otherwise hand out the old ones (and permission lookups fail)."""
    from django.contrib.contenttypes.models import ContentType

    ContentType.objects.clear_cache()


@pytest.fixture
def redis_client() -> Any:
    from persistence import redis_store

    return redis_store.client()


@pytest.fixture
def flush_redis(redis_client: Any) -> Any:
    """Empties Redis of this run's keys (FLUSHDB when the server is this run's own)."""
    from django.conf import settings

    def flush() -> None:
        if EXTERNAL["redis"]:
            flush_redis_namespace(redis_client, settings.BIRB.redis_key_prefix)
        else:
            redis_client.flushdb()

    return flush


def unique_key(name: str = "k") -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


# --- API keys ---------------------------------------------------------------------------------


@pytest.fixture
def api_keys_removed(transactional_db: Any) -> Iterator[None]:
    """Every API key is gone again after the test, and every API process knows it: with
    ``API_AUTH=auto`` a key left behind would make every later test's `/v1/` request need one."""
    yield
    from ops.access.keyring import keyring_publish
    from ops.models import ApiKey
    from ops.published import REFRESH_SECONDS

    had_keys = ApiKey.objects.exists()
    ApiKey.objects.all().delete()
    keyring_publish()
    if had_keys:
        time.sleep(REFRESH_SECONDS + 0.1)  # the session's API processes have re-read it


@pytest.fixture
def make_api_key(api_keys_removed: None) -> Any:
    """``make_api_key(scopes=..., key_prefixes=..., expires_in=..., rate_limit=...)`` → the key.

    The API processes apply it within half a second (``wait_published()`` waits that long)."""
    from ops.access.keys import apikey_create

    def make(name: str | None = None, **options: Any) -> str:
        return apikey_create(name=name or unique_key("key"), **options).token

    return make


def wait_published() -> None:
    """Until every API process has re-read the published keys and rate-limit config."""
    from ops.published import REFRESH_SECONDS

    time.sleep(REFRESH_SECONDS + 0.1)


# --- processes -------------------------------------------------------------------------------


def service_env(**extra: str) -> dict[str, str]:
    """Environment for a `manage.py` subprocess that talks to this session's servers and test DB."""
    from django.conf import settings
    from django.db import connection

    config = settings.BIRB
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "birbnest.settings",
        "DATABASE_URL": f"postgresql://{auth}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_URL": config.redis_url,
        "NATS_URL": config.nats_url,
        "REDIS_KEY_PREFIX": config.redis_key_prefix,
        "BIRB_STREAM": config.birb_stream,
        "BIRB_DLQ_STREAM": config.birb_dlq_stream,
        "BIRB_SUBJECT_PREFIX": config.birb_subject_prefix,
        "SECRET_KEY": settings.SECRET_KEY,
        "LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def manage(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env or service_env(), **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    """A real `manage.py runworker` process."""

    def __init__(self, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = manage("runworker", env=service_env(**self.env), stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def wait_ready(self, timeout: float = 20) -> Worker:
        wait_for(lambda: "worker consuming" in self.log(), timeout=timeout, message="worker consuming")
        return self

    def stop(self, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def worker_factory(tmp_path: Path, transactional_db: Any) -> Iterator[Any]:
    started: list[Worker] = []

    def make(**env: str) -> Worker:
        worker = Worker(tmp_path / f"worker-{len(started)}.log", **env)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(10)


@pytest.fixture
def worker(worker_factory: Any) -> Worker:
    """One running worker for this test, which starts with the backlog of earlier tests drained
    (writes made while no worker ran), so versions are seeded as on a settled system."""
    from persistence import jetstream, services

    started = worker_factory(WORKER_BATCH_TIMEOUT="100ms").start()
    # Polled: until the new process has created the consumer, the backlog's state is unknown.
    wait_for(lambda: jetstream.publisher().wait_drained(1), timeout=30, message="the earlier tests' backlog drained")
    services._backlog.last_wait_failed = False
    return started


class Api:
    """A real `manage.py runapi` (granian, WSGI) on a free port."""

    def __init__(self, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # A free port of its own for the dashboard's websocket server: API_PORT + 1 (the default)
        # may be taken by another process of the run.
        self.env = {
            "API_PORT": str(self.port),
            "DASHBOARD_PORT": str(free_port()),
            "API_WORKERS": "2",
            "API_THREADS": "8",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> Api:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = manage(
            "runapi", env=service_env(**self.env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"API did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, 9)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)


@pytest.fixture
def api_factory(tmp_path: Path, transactional_db: Any) -> Iterator[Any]:
    started: list[Api] = []

    def make(**env: str) -> Api:
        api = Api(tmp_path / f"api-{len(started)}.log", **env)
        started.append(api)
        return api

    yield make
    for api in started:
        api.stop()


@pytest.fixture(scope="session")
def api(tmp_path_factory: pytest.TempPathFactory, django_db_setup: Any) -> Iterator[Api]:
    """One API for the session (tests that kill an API start their own with api_factory)."""
    api = Api(tmp_path_factory.mktemp("api") / "api.log").start()
    yield api
    api.stop()


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def clear_of_window_edge(window: int, margin: float = 5.0) -> None:
    """Fixed windows are aligned on the epoch: when one ends, every count starts afresh.

    A test that counts requests against a limit must not straddle that moment, so when fewer
    than ``margin`` seconds are left in the current window, wait for the next one.
    """
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 0.05)


# --- a clean exit --------------------------------------------------------------------------------
# A test that leaves a non-daemon thread running (a worker loop that never stopped, an executor
# thread stuck in a call) makes the interpreter wait for it at exit, after the summary: a CI run
# that finished its tests in 20 minutes was killed at its 90-minute limit that way. Such threads
# get a few seconds; then their stacks are printed and the process exits with the run's status.
_EXIT_STATUS: list[int] = []
LINGERING_THREAD_GRACE = 10.0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    import threading
    import traceback

    def lingering() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive() and not _idle_executor_thread(t)
        ]

    deadline = time.monotonic() + LINGERING_THREAD_GRACE
    while lingering() and time.monotonic() < deadline:
        time.sleep(0.1)
    threads = lingering()
    if not threads or not _EXIT_STATUS:
        return
    frames = sys._current_frames()
    lines = [f"\n{len(threads)} thread(s) still running after the session; exiting without waiting for them:"]
    for thread in threads:
        lines.append(f"--- {thread.name}")
        lines.extend(traceback.format_stack(frames[thread.ident]) if thread.ident in frames else ["(no frame)"])
    print("\n".join(lines), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(_EXIT_STATUS[-1])


def _idle_executor_thread(thread: Any) -> bool:
    """A ThreadPoolExecutor's thread blocked in its queue's get(): Python's exit stops it at once."""
    frame = sys._current_frames().get(thread.ident)
    return (
        frame is not None
        and frame.f_code.co_name == "_worker"
        and frame.f_code.co_filename.endswith("concurrent/futures/thread.py")
    )
