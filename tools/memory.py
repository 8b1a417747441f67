"""Resident memory (RSS) of real API and worker processes under each memory knob.

    python -m tools.memory            # every scenario; the servers of .env / var/stack.env (`make run`)

Each scenario starts its own `manage.py runapi` / `manage.py runworker` with one setting changed,
drives it (large values read concurrently; a backlog of large writes drained), samples the RSS of
every process it started with psutil every 50 ms, and prints one line: idle and peak RSS (MiB).
It writes keys under ``memtest:`` and leaves them for the next run to overwrite. Not for
production: it loads the service as hard as the scenario needs.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

BASE_DIR = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_tree(proc: psutil.Process) -> dict[int, int]:
    """RSS of a process and its children, by PID (processes that just went away are skipped)."""
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            out[p.pid] = p.memory_info().rss
        except psutil.Error:
            continue
    return out


class Sampler:
    """Peak RSS per PID of a process tree, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, rss in rss_tree(self.proc).items():
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def api(**settings: str) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runapi", "--port", str(port)],
        cwd=BASE_DIR,
        env=env(DASHBOARD_PORT=str(free_port()), **settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        workers = int(settings.get("API_WORKERS", "1"))
        while len(psutil.Process(proc.pid).children()) < workers:
            time.sleep(0.1)
        time.sleep(1)  # every worker has loaded the app
        yield url, psutil.Process(proc.pid)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def mib(n: float) -> str:
    return f"{n / MIB:.0f}"


def api_scenario(name: str, *, value_size: int, clients: int, seconds: float, **settings: str) -> None:
    """Idle RSS, then peak RSS while ``clients`` threads read a ``value_size`` value for ``seconds``."""
    with api(**settings) as (url, root):
        idle = rss_tree(root)
        key = f"memtest:api:{value_size}"
        value = "x" * (value_size - 64)  # JSON string quotes, envelope: stays under MAX_VALUE_SIZE
        response = httpx.post(f"{url}/v1/cache/{key}", json={"value": value}, timeout=30)
        assert response.status_code in (200, 201), response.text
        deadline = time.monotonic() + seconds
        count = [0]

        def reader() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while time.monotonic() < deadline:
                    http.get(f"/v1/cache/{key}")
                    count[0] += 1

        with Sampler(root.pid) as sampler:
            threads = [threading.Thread(target=reader) for _ in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        workers = [pid for pid in sampler.peak if pid != root.pid]
        print(
            f"{name:<44} idle {mib(sum(idle[p] for p in idle if p != root.pid)):>5} MiB  "
            f"peak {mib(sum(sampler.peak[p] for p in workers)):>5} MiB over {len(workers)} process(es) "
            f"(+ granian main {mib(sampler.peak.get(root.pid, 0))} MiB), {count[0]} reads",
            flush=True,
        )


def worker_scenario(name: str, *, writes: int, value_size: int, **settings: str) -> None:
    """A backlog of ``writes`` writes of ``value_size`` made while no worker runs, then drained."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "birbnest.settings")
    django.setup()
    from persistence.models import CacheEntry

    prefix = f"memtest:worker:{time.time_ns()}:"
    with api(API_WORKERS="1") as (url, _):
        value = "y" * (value_size - 64)
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(writes):
                assert http.post(f"/v1/cache/{prefix}{i}", json={"value": value}).status_code == 201
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runworker"],
        cwd=BASE_DIR,
        env=env(**settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = time.monotonic()
        with Sampler(proc.pid) as sampler:
            while CacheEntry.objects.filter(key__startswith=prefix).count() < writes:
                if time.monotonic() - started > 300:
                    raise RuntimeError("the backlog did not drain in 5 minutes")
                time.sleep(0.2)
            drained = time.monotonic() - started
            time.sleep(0.5)
        print(
            f"{name:<44} peak {mib(sampler.peak.get(proc.pid, 0)):>5} MiB draining {writes} writes of "
            f"{value_size // 1024} KiB in {drained:.1f} s",
            flush=True,
        )
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="load per API scenario (default 5)")
    parser.add_argument("--only", choices=("api", "worker"), help="one half only")
    args = parser.parse_args()
    s = args.seconds
    if args.only != "worker":
        api_scenario("API_WORKERS=1 API_THREADS=8, 1 KiB", value_size=1024, clients=8, seconds=s,
                     API_WORKERS="1", API_THREADS="8")  # fmt: skip
        api_scenario("API_WORKERS=2 API_THREADS=8, 1 KiB", value_size=1024, clients=8, seconds=s,
                     API_WORKERS="2", API_THREADS="8")  # fmt: skip
        api_scenario("API_WORKERS=1 API_THREADS=8, 1000 KiB", value_size=1000 * 1024, clients=8, seconds=s,
                     API_WORKERS="1", API_THREADS="8")  # fmt: skip
        api_scenario("API_WORKERS=1 API_THREADS=32, 1000 KiB", value_size=1000 * 1024, clients=32, seconds=s,
                     API_WORKERS="1", API_THREADS="32")  # fmt: skip
        api_scenario("API_WORKERS=1 API_THREADS=8 MAX_VALUE_SIZE=64KiB", value_size=64 * 1024, clients=8,
                     seconds=s, API_WORKERS="1", API_THREADS="8", MAX_VALUE_SIZE=str(64 * 1024))  # fmt: skip
    if args.only != "api":
        worker_scenario("WORKER_BATCH_SIZE=10, 256 KiB values", writes=200, value_size=256 * 1024,
                        WORKER_BATCH_SIZE="10")  # fmt: skip
        worker_scenario("WORKER_BATCH_SIZE=100, 256 KiB values", writes=200, value_size=256 * 1024,
                        WORKER_BATCH_SIZE="100")  # fmt: skip
        worker_scenario("WORKER_BATCH_SIZE=200, 256 KiB values", writes=200, value_size=256 * 1024,
                        WORKER_BATCH_SIZE="200")  # fmt: skip


if __name__ == "__main__":
    main()
