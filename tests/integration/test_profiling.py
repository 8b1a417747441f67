"""Debug endpoints (API_DEBUG_PORT): a CPU profile, a heap snapshot and every stack, from each API
process and from the worker, over real processes; a non-loopback bind refused at start."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import httpx
import pytest

from birbnest.env import ConfigError, is_loopback, load_config
from tests.conftest import BASE_DIR, manage, service_env, unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
API_WORKERS = 2


def free_port_range(count: int) -> int:
    """A first port such that it and the ``count - 1`` after it are free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return int(first)
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def index(port: int) -> dict | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/debug/pprof/", timeout=2).json()
    except httpx.HTTPError:
        return None


@pytest.fixture
def debug_stack(api_factory, worker_factory):
    """An API of two granian processes and one worker, with API_DEBUG_PORT set."""
    first = free_port_range(API_WORKERS + 2)
    env = {"API_DEBUG_PORT": str(first), "API_WORKERS": str(API_WORKERS)}
    api = api_factory(**env).start()
    worker = worker_factory(**env).start().wait_ready()
    ports = {"api": [first, first + 1], "worker": [first + API_WORKERS]}
    for port in [*ports["api"], *ports["worker"]]:
        wait_for(lambda port=port: index(port), timeout=20, message=f"debug endpoints on port {port}")
    return api, worker, ports


def all_ports(ports: dict[str, list[int]]) -> list[tuple[str, int]]:
    return [(role, port) for role, role_ports in ports.items() for port in role_ports]


def test_every_api_process_and_the_worker_has_its_own_port(debug_stack) -> None:
    api, worker, ports = debug_stack
    # when
    indexes = {port: index(port) for _, port in all_ports(ports)}
    # then: one process per port, roles as documented, the worker's pid is the command's
    assert [indexes[port]["role"] for port in ports["api"]] == ["api", "api"]
    assert indexes[ports["worker"][0]]["role"] == "worker"
    assert indexes[ports["worker"][0]]["pid"] == worker.proc.pid
    assert len({body["pid"] for body in indexes.values()}) == 3
    assert api.proc.pid not in {body["pid"] for body in indexes.values()}  # granian's main process serves none


def test_cpu_profile_from_each_process_is_speedscope_json(debug_stack) -> None:
    api, _, ports = debug_stack
    key = unique_key("profiled")
    stop = threading.Event()

    def load() -> None:  # something for the API processes to do while they are profiled
        with httpx.Client(base_url=api.url) as http:
            http.post(f"/v1/cache/{key}", json={"value": "x" * 100})
            while not stop.is_set():
                http.get(f"/v1/cache/{key}")

    loader = threading.Thread(target=load)
    loader.start()
    try:
        profiles = {}
        for role, port in all_ports(ports):
            response = httpx.get(f"http://127.0.0.1:{port}/debug/pprof/profile?seconds=1", timeout=10)
            assert response.status_code == 200, response.text
            profiles[port] = (role, response.json())
    finally:
        stop.set()
        loader.join()
    for port, (role, profile) in profiles.items():
        assert profile["$schema"] == "https://www.speedscope.app/file-format-schema.json"
        assert profile["shared"]["frames"], port
        assert profile["profiles"] and all(p["type"] == "sampled" for p in profile["profiles"])
        assert sum(len(p["samples"]) for p in profile["profiles"]) > 0
        files = {frame["file"] for frame in profile["shared"]["frames"]}
        expected = "persistence/worker/loop.py" if role == "worker" else "granian"
        assert any(expected in file for file in files), (port, sorted(files)[:20])
    # the request threads (granian's, not started by `threading`) were seen handling the load
    api_frames = {f["name"] for port in ports["api"] for f in profiles[port][1]["shared"]["frames"]}
    assert "CacheEntryApi.get" in api_frames or "DataPlaneHandler.__call__" in api_frames


def test_collapsed_stacks_for_flamegraph(debug_stack) -> None:
    _, _, ports = debug_stack
    response = httpx.get(
        f"http://127.0.0.1:{ports['worker'][0]}/debug/pprof/profile?seconds=0.5&format=collapsed&hz=50", timeout=10
    )
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert lines and all(line.rsplit(" ", 1)[1].isdigit() for line in lines)


def test_heap_snapshot_from_each_process(debug_stack) -> None:
    _, _, ports = debug_stack
    for _, port in all_ports(ports):
        response = httpx.get(f"http://127.0.0.1:{port}/debug/pprof/heap?seconds=1&top=5", timeout=10)
        assert response.status_code == 200, response.text
        assert "# heap profile of pid" in response.text and "tracemalloc" in response.text
        assert "#1: " in response.text, response.text  # at least one allocation site, with its traceback
        assert 'File "' in response.text


def test_goroutine_dump_has_every_thread_and_task(debug_stack) -> None:
    _, worker, ports = debug_stack
    dumps = {
        port: httpx.get(f"http://127.0.0.1:{port}/debug/pprof/goroutine?debug=2", timeout=10).text
        for _, port in all_ports(ports)
    }
    for port, dump in dumps.items():
        assert "goroutine profile" in dump  # the runbook's `grep -A 10 "goroutine profile"`
        assert "Thread " in dump and 'File "' in dump, port
    worker_dump = dumps[ports["worker"][0]]
    assert f"pid {worker.proc.pid} (worker)" in worker_dump
    assert "run_async" in worker_dump  # the worker's main task, with its await chain
    assert '"MainThread"' in worker_dump
    assert "asyncio tasks in" in worker_dump and 'Task "' in worker_dump


def test_bad_parameters_are_400_and_unknown_paths_404(debug_stack) -> None:
    _, _, ports = debug_stack
    base = f"http://127.0.0.1:{ports['api'][0]}/debug/pprof"
    for path in ("/profile?seconds=abc", "/profile?seconds=0", "/profile?seconds=9999", "/profile?format=svg",
                 "/heap?top=-1", "/profile?hz=100000"):  # fmt: skip
        response = httpx.get(base + path, timeout=5)
        assert response.status_code == 400, (path, response.status_code)
    assert httpx.get(base + "/nothing", timeout=5).status_code == 404


def test_a_non_loopback_bind_is_refused_at_start() -> None:
    for command in ("runworker", "runapi"):
        proc = manage(
            command,
            env=service_env(API_DEBUG_PORT="6060", API_DEBUG_HOST="0.0.0.0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (command, err)
        assert b'invalid value for API_DEBUG_HOST: "0.0.0.0" is not a loopback address' in err, err


def test_loopback_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
    with pytest.raises(ConfigError, match="API_DEBUG_HOST"):
        load_config({"SECRET_KEY": "s", "API_DEBUG_PORT": "6060", "API_DEBUG_HOST": "::"})
    allowed = load_config(
        {"SECRET_KEY": "s", "API_DEBUG_PORT": "6060", "API_DEBUG_HOST": "0.0.0.0", "API_DEBUG_ALLOW_REMOTE": "true"}
    )
    assert allowed.api_debug_host == "0.0.0.0"
    assert load_config({"SECRET_KEY": "s", "API_DEBUG_HOST": "0.0.0.0"}).api_debug_port == 0  # off: no bind


def test_off_by_default_the_package_is_not_even_imported() -> None:
    code = (
        "import sys, django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'birbnest.settings'); "
        "import birbnest.wsgi; print('birbnest.pprof' in sys.modules)"
    )
    env = service_env()
    env.pop("API_DEBUG_PORT", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, timeout=60)
    assert out.stdout.strip() == b"False", out.stderr
