"""A second API (or dashboard) on a port already in use stops at once with one line and exit
code 2, instead of silently sharing the port with the first through SO_REUSEPORT (issue #11)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ops.ports import bind_error
from tests.conftest import free_port, manage, service_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def run_to_exit(*args: str, timeout: float = 30, **env: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc = manage(*args, env=service_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # it started serving: the check let it through
            proc.kill()
            proc.wait(10)
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


def test_a_second_api_on_the_same_port_exits_2_and_the_first_keeps_its_traffic(api_factory) -> None:
    first = api_factory().start()
    for _ in range(20):
        httpx.get(first.url + "/v1/cache/port-test-absent", timeout=10)
    counted = httpx.get(first.url + "/metrics", timeout=10).json()["total_requests"]
    assert counted >= 20

    # when
    code, out, err, took = run_to_exit("runapi", **first.env)

    # then
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1, err
    assert f"cannot serve the API on 127.0.0.1:{first.port}: port {first.port} is already in use" in lines[0]
    assert "API_PORT" in lines[0]
    assert took < 15
    print(f"second runapi: exit {code} after {took:.1f} s: {lines[0]}")
    # the first one was not joined, and its metrics were not wiped
    assert first.proc is not None and first.proc.poll() is None
    assert httpx.get(first.url + "/metrics", timeout=10).json()["total_requests"] >= counted


def test_a_second_dashboard_on_the_same_port_exits_2(tmp_path: Path) -> None:
    port = free_port()
    env = {"DASHBOARD_PORT": str(port), "API_PORT": str(free_port())}
    log = open(tmp_path / "dashboard.log", "wb")  # noqa: SIM115 - the child keeps it
    first = manage("rundashboard", env=service_env(**env), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: bind_error("127.0.0.1", port) is not None, timeout=20, message="the dashboard listening")
        code, out, err, _ = run_to_exit("rundashboard", **env)
        assert code == 2, (out, err)
        assert f"cannot serve the dashboard on 127.0.0.1:{port}: port {port} is already in use" in err
        assert "DASHBOARD_PORT" in err
        assert first.poll() is None, "the first dashboard still runs"
    finally:
        first.terminate()
        first.wait(15)


def test_a_port_held_with_so_reuseport_counts_as_in_use() -> None:
    # granian listens with SO_REUSEPORT: a plain bind must still see the port as taken
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        error = bind_error("127.0.0.1", port)
    assert error is not None and "in use" in str(error)
    assert bind_error("127.0.0.1", port) is None  # closed: free again
