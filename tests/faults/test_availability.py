"""Availability under faults: not only is nothing lost, the service keeps answering.

A writer of 8 threads POSTs fresh keys without pausing after an error; the fault is injected while
it runs. Every request is counted (2xx, 5xx, no answer), and every acknowledged write must read
back afterwards. Each scenario prints ``availability fault=<name> requests=N errors=N (x.xx%) ...``
and appends it to ``test-artifacts/faults-summary.txt``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import wait_for
from tests.faults.harness import SUMMARY_FILE, KeyWriter, api_connections, granian_workers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

MAX_ERROR_SHARE = 0.02  # only the requests the dead process held may fail


def _replacement(main: psutil.Process, before: list[Any], timeout: float) -> Any:
    """The worker granian started in place of a dead one, or None if none came in ``timeout``."""
    known = {w.pid for w in before}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and main.is_running():
        fresh = [w for w in granian_workers(main.pid) if w.pid not in known]
        if fresh:
            return fresh[0]
        time.sleep(0.01)
    return None


def _until_it_serves(worker: Any, api_url: str, port: int, timeout: float) -> float | None:
    """Seconds until ``worker`` accepts one of many fresh connections (None: it never did).
    The connections stay open while looking: an accepted one shows as ESTABLISHED in it."""
    began, clients = time.monotonic(), []
    try:
        while time.monotonic() - began < timeout:
            client = httpx.Client(timeout=5)
            clients.append(client)
            with contextlib.suppress(httpx.HTTPError):
                client.get(api_url + "/")
            if api_connections(worker, port):
                return time.monotonic() - began
            time.sleep(0.02)
        return None
    finally:
        for client in clients:
            client.close()


def test_one_api_worker_sigkilled_the_other_serves_on_and_it_is_replaced(api_factory, worker_factory, scenario) -> None:
    # given an API of 2 worker processes and a writer of 8 threads keeping both busy
    scenario.track(worker_factory().start().wait_ready())
    api = api_factory(API_WORKERS="2").start()
    main = psutil.Process(api.proc.pid)  # runapi execs granian: this is granian's main process
    workers = wait_for(lambda: (w := granian_workers(main.pid)) and len(w) == 2 and w, timeout=20, message="2 workers")
    respawned_in = serving_in = None
    with KeyWriter(api.url, threads=8) as writer:
        writer.wait_requests(1500)
        # when the kernel kills one of them mid-request (as the OOM killer would): the one
        # holding the most client connections
        victim = max(workers, key=lambda w: api_connections(w, api.port))
        held = api_connections(victim, api.port)
        requests_before, errors_before = writer.requests, writer.errors
        killed = time.monotonic()
        victim.kill()
        replacement = _replacement(main, workers, timeout=10)
        if replacement is not None:
            respawned_in = time.monotonic() - killed
            serving = _until_it_serves(replacement, api.url, api.port, timeout=10)
            serving_in = None if serving is None else time.monotonic() - killed
        writer.wait_requests(2000)  # and the writer keeps going
        seconds_after = time.monotonic() - killed
    alive = main.is_running() and main.status() != psutil.STATUS_ZOMBIE

    requests, errors = writer.requests, writer.errors
    line = (
        f"availability fault=api-worker-sigkill requests={requests} errors={errors} "
        f"({100 * errors / requests:.2f}%) errors_after_kill={errors - errors_before} "
        f"of {requests - requests_before} in {seconds_after:.1f}s acknowledged={len(writer.acknowledged)} "
        f"victim_connections={held} main_alive={alive} "
        f"respawned_in={_seconds(respawned_in)} replacement_serving_in={_seconds(serving_in)}"
    )
    detail = f"  statuses={dict(sorted(writer.statuses.items()))} errors={dict(writer.transport_errors)}"
    print("\n" + line + "\n" + detail, flush=True)
    SUMMARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    with SUMMARY_FILE.open("a") as out:
        out.write(line + "\n")

    # then the API's main process lives on, a new worker took the dead one's place and serves,
    assert not writer.crashed, f"writer crashed: {writer.crashed[0]!r}"
    assert alive, f"granian's main process exited when one worker died\n{line}\n{api.log_path.read_text()[-2000:]}"
    assert respawned_in is not None, f"no worker replaced the dead one in 10 s\n{line}"
    assert serving_in is not None, f"the replacement worker accepted no connection in 10 s\n{line}"
    assert len(granian_workers(main.pid)) == 2
    # only the requests the dead process held failed (counted from the kill on: the requests
    # before it would only dilute the share),
    assert errors - errors_before <= MAX_ERROR_SHARE * (requests - requests_before), f"{line}\n{detail}"
    # and every acknowledged write reads back as written
    unreadable = writer.unreadable(api.url)
    assert not unreadable, f"{len(unreadable)} acknowledged writes not readable:\n" + "\n".join(unreadable[:20])


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}s"
