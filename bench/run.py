"""`make bench` / `python -m bench.run [--smoke] [--duration S]`: Birb Nest beside its references.

Starts its own PostgreSQL, Redis and NATS (tools.stack, free ports, a temporary directory) with
the durability settings of `make run`, migrates, starts `manage.py runapi` and one
`manage.py runworker`, and measures, each for a bounded time:

- references: raw Redis GET (redis-benchmark) and Webdis (a C HTTP front end to Redis) serving
  the same value over HTTP;
- Birb Nest over HTTP with wrk at a fixed concurrency: GET hit, GET absent key (with the
  PostgreSQL queries per request), GET miss (read-through from PostgreSQL), durable write
  (POST), batch get and batch set of 100 keys;
- the pipeline: worker drain rate of a pre-filled backlog beside a bare nats-py fetch+ack of the
  same backlog, and the persist lag (API 2xx -> row visible in PostgreSQL) at a steady rate of
  0.9 x the POST req/s of the run;
- peak RSS of each API process and of the worker;
- issue #14's targets, each met / missed / n/a.

Prints a markdown table on stdout (progress goes to stderr) and writes the same figures as JSON
to ``var/bench/bench-<timestamp>.json`` and ``var/bench/latest.json``. Never fails on a slow
figure: the exit code is 0 unless the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))

from bench import httpload, pipeline, tools  # noqa: E402
from birbnest.tracing import SCHEDULE_DELAY_MS  # noqa: E402

VALUE_SIZE = 200  # bytes of the JSON value: {"payload":"xxx…"}
VALUE_JSON = '{"payload":"' + "x" * (VALUE_SIZE - 14) + '"}'
HIT_KEYS = 1_000  # k0 … k999: GET hit, batch get, Webdis
POST_KEYS = 10_000  # w0 … w9999: durable writes, random key per request
BATCH_SIZE = 100  # keys per batch get and per batch set
ABSENT_KEYS = 1_000  # nx0 … nx999: GET absent key, keys no measurement ever writes
ABSENT_PREFIX = "nx"
BATCH_SET_KEYS = 20_000  # b0 … b19999: batch set, 100 distinct random keys per request
BATCH_SET_TIMEOUT = 60.0  # wrk's --timeout for batch set: 50 batches in flight may take seconds each
CONNECTIONS = 50
WRK_THREADS = 2
# The persist lag's paced rate: this share of the POST req/s of the same run (the highest write
# rate the API sustains), or LAG_RATE when POST was not measured (e.g. --only persist_lag).
LAG_SHARE_OF_POST = 0.9
LAG_RATE = 1_000
MEASUREMENTS = (
    "references", "get_hit", "get_absent", "get_hit_limited", "get_hit_auth", "batch_get", "post", "batch_set",
    "persist_lag", "drain", "get_miss",
)  # fmt: skip
# Tracing on (issue #11): GET hit and POST again with OTEL_TRACES_ENABLED=true, every trace kept.
TRACING_MEASUREMENTS = ("tracing",)
# On clusters (issue #13, --cluster): GET hit, POST, persist lag through a Redis Cluster (3 + 3)
# and a three-node NATS with R3 streams on this machine, and the bare publish floor at R1 and R3.
CLUSTER_MEASUREMENTS = ("cluster",)
CLUSTER_STREAM = "BIRB_BENCH_CLUSTER"
# The limiter on for GET hit: every wrk connection is one client (127.0.0.1), so one counter
# takes all the traffic; the limit is never reached.
LIMITER_ON = {"enabled": True, "limit": 2_000_000_000, "window": 60, "algorithm": "fixed"}
# Issue #14's targets (and issue #10's API key one), each a ratio of two figures of the same run
# where it can be.
TARGETS = {
    "post_vs_get_hit": 0.35,
    "post_vs_publish": 0.5,
    "batch_set_keys_vs_post": 10.0,
    "get_hit_vs_webdis": 0.15,
    "get_hit_p99_ms": 15.0,
    "get_hit_auth_vs_off": 0.9,
    "get_absent_vs_get_hit": 0.5,
    "lag_p99_ms": 1_000.0,
    "drain_vs_bare": 0.8,
    "api_rss_mb": 150.0,
    "worker_rss_mb": 150.0,  # while draining 1,000,000 messages: the cost curves (bench/curves.py)
}


@dataclass(frozen=True)
class Plan:
    smoke: bool
    duration: float  # seconds of each HTTP measurement
    backlog: int  # messages in the drain backlog (and GET-miss keys)
    lag_seconds: float
    redis_requests: int


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# --- processes of the service -------------------------------------------------------------------


class Service:
    """`manage.py runapi` and `manage.py runworker`, each in a process group of its own."""

    def __init__(self, env: dict[str, str], log_dir: Path, api_port: int) -> None:
        self.env = self.base_env = env
        self.log_dir = log_dir
        self.api_port = api_port
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log: Path = log_dir / "worker-0.log"
        self._workers_started = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _manage(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = open(self.log_dir / name, "ab")  # noqa: SIM115 - the child keeps it
        return subprocess.Popen(
            [sys.executable, "manage.py", *args], cwd=BASE_DIR, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def migrate(self) -> None:
        done = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"], cwd=BASE_DIR, env=self.env,
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start_api(self, timeout: float = 30) -> None:
        self.api = self._manage("api.log", "runapi")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, _ = tools.http_get(self.url + "/")
                if status == 200:
                    return
            except OSError:
                pass
            if self.api.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"API did not start; {self.log_dir / 'api.log'}:\n{_tail(self.log_dir / 'api.log')}")

    def restart_api(self, **env: str) -> None:
        """Stop the API and start it again with these variables on top of the run's environment."""
        if self.api is not None:
            tools.stop_group(self.api)
        self.env = {**self.base_env, **env}
        self.start_api()

    def start_worker(self) -> None:
        self.worker_log = self.log_dir / f"worker-{self._workers_started}.log"
        self._workers_started += 1
        self.worker = self._manage(self.worker_log.name, "runworker")

    def worker_consuming(self) -> bool:
        try:
            return "worker consuming" in self.worker_log.read_text(errors="replace")
        except OSError:
            return False

    def wait_worker(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.worker_consuming():
            if self.worker is None or self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; {self.worker_log}:\n{_tail(self.worker_log)}")
            time.sleep(0.02)

    def stop_worker(self) -> None:
        if self.worker is not None:
            tools.stop_group(self.worker, timeout=30)
            if self.worker.returncode not in (0, -signal.SIGTERM):
                log(f"worker exited with {self.worker.returncode}")

    def api_pids(self) -> dict[str, int]:
        """The granian main process and its worker processes."""
        import psutil

        if self.api is None or self.api.poll() is not None:
            return {}
        pids = {"api main": self.api.pid}
        try:
            children = psutil.Process(self.api.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for n, child in enumerate(sorted(children, key=lambda c: c.pid)):
            pids[f"api worker {n + 1}"] = child.pid
        return pids

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc is not None:
                tools.stop_group(proc)


class SpanSink:
    """An OTLP/HTTP endpoint on loopback that takes the spans the API and the worker export and
    counts them: a stand-in for Jaeger that costs the machine little."""

    def start(self) -> SpanSink:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        sink = self
        self.requests = self.bytes = self.spans = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                request = ExportTraceServiceRequest.FromString(self.rfile.read(size))
                spans = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
                with sink.lock:
                    sink.requests += 1
                    sink.bytes += size
                    sink.spans += spans
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="span-sink", daemon=True).start()
        return self

    def figures(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes, "spans": self.spans}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class MachineLoad:
    """CPU used by other processes during the run: all busy CPU time minus this process tree's.

    Every process the bench starts is waited for (servers, API, its granian workers via granian,
    worker, wrk), so RUSAGE_CHILDREN holds their CPU time once they have stopped.
    """

    def __init__(self) -> None:
        import psutil

        self.began = time.monotonic()
        self.loadavg = os.getloadavg()[0]
        self.busy = self._busy(psutil.cpu_times())

    @staticmethod
    def _busy(times: Any) -> float:
        return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))

    def finish(self) -> dict[str, Any]:
        import resource

        import psutil

        seconds = time.monotonic() - self.began
        busy = self._busy(psutil.cpu_times()) - self.busy
        ours = sum(
            usage.ru_utime + usage.ru_stime
            for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )
        others = max(0.0, busy - ours)
        cores = os.cpu_count() or 1
        return {
            "cores": cores,
            "seconds": round(seconds, 1),
            "bench_cpu_s": round(ours, 1),
            "others_cpu_s": round(others, 1),
            "others_share_of_machine": round(others / (seconds * cores), 3) if seconds else 0.0,
            "loadavg_start": round(self.loadavg, 2),
            "loadavg_end": round(os.getloadavg()[0], 2),
        }


class CpuUse:
    """Cores used during one measurement by the API processes, the worker, and the whole machine."""

    def __init__(self, service: Service) -> None:
        import psutil

        self.service = service
        self.began = time.monotonic()
        self.procs = {pid: psutil.Process(pid) for pid in service.api_pids().values()}
        if service.worker is not None and service.worker.poll() is None:
            self.worker = psutil.Process(service.worker.pid)
        self.start = {pid: self._cpu(proc) for pid, proc in self.procs.items()}
        self.worker_start = self._cpu(self.worker) if self.worker else 0.0
        self.machine_start = MachineLoad._busy(psutil.cpu_times())

    worker: Any = None

    @staticmethod
    def _cpu(proc: Any) -> float:
        try:
            times = proc.cpu_times()
            return float(times.user + times.system)
        except Exception:
            return 0.0

    def finish(self) -> dict[str, float]:
        import psutil

        seconds = time.monotonic() - self.began
        api = sum(self._cpu(proc) - self.start[pid] for pid, proc in self.procs.items())
        worker = self._cpu(self.worker) - self.worker_start if self.worker else 0.0
        machine = MachineLoad._busy(psutil.cpu_times()) - self.machine_start
        return {
            "api": round(max(0.0, api) / seconds, 2),
            "worker": round(max(0.0, worker) / seconds, 2),
            "machine": round(machine / seconds, 2),
        }


class RssSampler(threading.Thread):
    """Peak RSS per process role, sampled every 0.2 s for the whole run."""

    def __init__(self, service: Service) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.service = service
        self.peaks: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopping.wait(0.2):
            roles = dict(self.service.api_pids())
            worker = self.service.worker
            if worker is not None and worker.poll() is None:
                roles["worker"] = worker.pid
            for role, pid in roles.items():
                try:
                    mb = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.peaks[role] = max(self.peaks.get(role, 0.0), round(mb, 1))


# --- load ---------------------------------------------------------------------------------------


class Load:
    """One HTTP measurement with wrk, or with the Python client when wrk is missing."""

    def __init__(self, use_wrk: bool, plan: Plan) -> None:
        self.use_wrk = use_wrk
        self.plan = plan

    def run(
        self,
        url: str,
        script: str,
        args: list[str],
        fallback: httpload.Request | Any,
        authorization: str | None = None,
        expect: int | None = None,
        on_answer: Any = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """``authorization``: an Authorization header for every request (wrk's scripts read it from
        ``BENCH_AUTHORIZATION``, so it stays out of the command line the report shows).
        ``expect`` and ``on_answer`` are for the Python client (see ``httpload.closed_loop``); a
        wrk script counts what it needs itself and prints it (``result["script"]``). ``timeout``:
        seconds before wrk gives up on an answer (its default 2 s; the Python client waits 10 s)."""
        host, port = url.removeprefix("http://").split(":")
        os.environ.pop("BENCH_AUTHORIZATION", None)
        if authorization:
            os.environ["BENCH_AUTHORIZATION"] = authorization
        watch = tools.StarvationWatch(int(port), max(1, round(self.plan.duration)))
        try:
            if self.use_wrk:
                result = tools.run_wrk(
                    url, script, args, duration=self.plan.duration, connections=CONNECTIONS, threads=WRK_THREADS,
                    timeout=timeout,
                )  # fmt: skip
            else:
                headers = {"Authorization": authorization} if authorization else None
                loop = httpload.closed_loop(
                    host, int(port), fallback, connections=CONNECTIONS, duration=self.plan.duration,
                    headers=headers, expect=expect, on_answer=on_answer, timeout=timeout or 10.0,
                )  # fmt: skip
                result = asyncio.run(loop).summary()
                result["command"] = f"python load generator ({CONNECTIONS} connections; wrk is not installed)"
        finally:
            os.environ.pop("BENCH_AUTHORIZATION", None)
            result_watch = watch.finish()
        result["server_connections"] = result_watch
        return result


def shut_down(
    sampler: RssSampler | None,
    service: Service | None,
    stack: Any,
    results: dict[str, Any],
    data_dir: Path,
    *,
    keep: bool,
) -> None:
    """Stop what a bench run started (the peak RSS goes into ``results``); the servers' data and
    logs stay when ``keep`` (asked for, or the run failed)."""
    if sampler is not None:
        sampler.stopping.set()
        sampler.join(2)
        results["rss_mb"] = dict(sorted(sampler.peaks.items()))
    if service is not None:
        service.stop()
    if stack is not None:
        stack.stop()
    if keep:
        log(f"servers' data and logs kept in {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)


def _miss_note(miss: dict[str, Any], keys: int) -> str:
    if "miss_fraction" not in miss:
        return ""
    note = f"{miss['miss_fraction'] * 100:.1f}% were misses (/metrics)"
    if miss["hits"] + miss["misses"] > keys:
        note += f"; **the {keys:,} keys ran out: requests after the first {keys:,} were hits**"
    return note


def _absent_note(absent: dict[str, Any]) -> str:
    if "pg_queries_per_request" not in absent:
        return ""
    statements = absent["pg_statements"]
    return (
        f"**{absent['pg_queries_per_request']:.3f} PostgreSQL queries per request** "
        f"({statements['cache_entries']:,} statements on cache_entries for "
        f"{max(absent['requests'], absent.get('reads_answered_by_api', 0)):,} reads answered, "
        f"pg_stat_statements; {statements['all']:,} in all)"
    )


def _batch_set_note(batch: dict[str, Any]) -> str:
    if "keys_per_s" not in batch:
        return ""
    note = (
        f"{_fmt(batch['keys_per_s'])} durable keys/s ({batch.get('keys_created', 0):,} created, "
        f"{batch.get('keys_updated', 0):,} updated"
    )
    if batch.get("keys_failed"):
        note += f", **{batch['keys_failed']:,} refused**"
    return note + ")"


def get_requests(prefix: str, count: int) -> Any:
    return lambda i: ("GET", f"{prefix}{i % count}", None)


def post_requests(prefix: str, count: int) -> Any:
    body = ('{"value": ' + VALUE_JSON + "}").encode()
    return lambda i: ("POST", f"/v1/cache/{prefix}{random.randrange(count)}", body)


def batch_requests(prefix: str, count: int, size: int) -> Any:
    bodies = [
        json.dumps({"keys": [f"{prefix}{k}" for k in random.sample(range(count), size)]}).encode() for _ in range(32)
    ]
    return lambda i: ("POST", "/v1/cache/batch/get", bodies[i % len(bodies)])


def batch_set_requests(prefix: str, count: int, size: int) -> Any:
    """A new batch of ``size`` distinct random keys per request, as batch_set.lua makes them."""
    entry = '{"key":"%s","value":' + VALUE_JSON + "}"

    def request(i: int) -> httpload.Request:
        entries = ",".join(entry % f"{prefix}{k}" for k in random.sample(range(count), size))
        return ("POST", "/v1/cache/batch/set", ('{"entries":[' + entries + "]}").encode())

    return request


class KeyResults:
    """Counts the per-key results of batch set answers, as batch_set.lua's response() does."""

    def __init__(self) -> None:
        self.counts = {"keys_created": 0, "keys_updated": 0, "keys_failed": 0}

    def __call__(self, status: int, body: bytes) -> None:
        if status != 200:
            return
        for result in json.loads(body)["results"]:
            name = {201: "keys_created", 200: "keys_updated"}.get(result["status"], "keys_failed")
            self.counts[name] += 1


async def _write_keys(url: str, keys: list[str], connections: int = 16) -> None:
    host, port = url.removeprefix("http://").split(":")
    body = ('{"value": ' + VALUE_JSON + "}").encode()
    todo = iter(keys)

    async def client() -> None:
        conn = httpload.HttpConnection(host, int(port))
        try:
            for key in todo:
                status, payload = await conn.request("POST", f"/v1/cache/{key}", body)
                if status not in (200, 201):
                    raise RuntimeError(f"POST {key}: {status} {payload[:300]!r}")
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(connections)))


def pg_statements(database_url: str) -> dict[str, int]:
    """Statements PostgreSQL has run so far (pg_stat_statements' calls, tools.stack loads it):
    those naming ``cache_entries``, and all in the database but this query's own."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(calls) FILTER (WHERE query ILIKE %s), 0), coalesce(sum(calls), 0) "
            "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT ILIKE %s",
            ("%cache_entries%", "%pg_stat_statements%"),
        ).fetchone()
    assert row is not None
    return {"cache_entries": int(row[0]), "all": int(row[1])}


def settle(url: str, connections: int = 8) -> float:
    """Seconds until the API answered a GET / on each of ``connections`` new connections: the
    requests it still had queued when the load stopped are done by then (spread over its processes)."""
    host, port = url.removeprefix("http://").split(":")
    began = time.monotonic()

    async def one() -> None:
        conn = httpload.HttpConnection(host, int(port), timeout=120)
        try:
            await conn.request("GET", "/")
        finally:
            conn.close()

    async def all_of_them() -> None:
        await asyncio.gather(*(one() for _ in range(connections)))

    asyncio.run(all_of_them())
    return time.monotonic() - began


def _reads(figures: dict[str, Any]) -> int:
    return int(figures["cache_hits"]) + int(figures["cache_misses"])


def metrics(url: str) -> dict[str, Any]:
    """The API's /metrics; after a measurement it waits behind the requests the API still had
    queued when the load stopped (a batch set's take seconds each)."""
    _, body = tools.http_get(url + "/metrics", timeout=120)
    return json.loads(body)


# --- the run ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, plan: Plan, args: argparse.Namespace) -> None:
        self.plan = plan
        self.args = args
        self.results: dict[str, Any] = {}
        self.profiles: dict[str, Any] = {}
        self.notes: list[str] = []

    def run(self) -> dict[str, Any]:
        from tools.stack import make_temp_data_dir, start_stack

        began = time.monotonic()
        load = MachineLoad()
        self.tools = tools.ensure_tools(self.args.install_tools, set(self.args.without))
        for name, where in self.tools.items():
            if not tools.available(self.tools, name):
                log(f"{name}: {where}")
        use_wrk = tools.available(self.tools, "wrk")
        if not use_wrk:
            self.notes.append(
                "wrk is not installed: Birb Nest was loaded by the built-in Python client, which costs far more CPU "
                "per request on the same cores; its figures are not comparable with wrk's (fine for a smoke run)"
            )
            log(f"wrk: {self.tools['wrk']}; loading the API with the built-in Python client instead")
        self.load = Load(use_wrk, self.plan)

        data_dir = make_temp_data_dir("birb-bench-")
        self.data_dir = data_dir
        stack = service = sampler = None
        failed = False  # an error (not Ctrl-C) keeps the servers' data and logs for a look
        try:
            durable = not self.args.no_fsync
            log(
                f"starting PostgreSQL, Redis, NATS in {data_dir} (fsync={durable}, redis_persistence={durable}"
                + (", as make run)" if durable else ", as the tests: NOT the shipped settings)")
            )
            stack = start_stack(data_dir, fsync=durable, redis_persistence=durable)
            env = self._env(stack, data_dir)
            os.environ.update(env)
            import django

            django.setup()
            service = Service(env, data_dir / "log", int(env["API_PORT"]))
            log("migrating")
            service.migrate()
            log("starting the API and the worker")
            service.start_api()
            service.start_worker()
            service.wait_worker()
            sampler = RssSampler(service)
            sampler.start()
            self.settings = self._settings(stack)

            if self.wanted("references"):
                self.references(stack, data_dir)
            self.birb_http(service, stack)
            if self.wanted("tracing"):
                self.tracing_on(service, stack)
            if self.wanted("persist_lag"):
                self.persist_lag(service, stack)
            if self.wanted("drain") or self.wanted("get_miss"):
                self.drain(service, stack)
            if self.wanted("get_miss"):
                self.get_miss(service)
            if self.args.cluster or "cluster" in self.args.only:
                self.cluster(service, stack)
        except Exception:
            failed = True
            raise
        finally:
            shut_down(sampler, service, stack, self.results, data_dir, keep=failed or self.args.keep)
        self.seconds = time.monotonic() - began
        self.load_info = load.finish()
        if self.load_info["others_share_of_machine"] > 0.1:
            self.notes.append(
                f"other processes on this machine used {self.load_info['others_cpu_s']:.0f} CPU-seconds during the run "
                f"({self.load_info['others_share_of_machine'] * 100:.0f}% of its {self.load_info['cores']} cores; "
                f"load average {self.load_info['loadavg_start']:.1f} at start): the figures are lower than on an "
                "idle machine"
            )
        return self.report_data()

    def _env(self, stack: Any, data_dir: Path) -> dict[str, str]:
        env = {
            **os.environ,
            **stack.urls(),
            "DJANGO_SETTINGS_MODULE": "birbnest.settings",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "BIRB_DATA_DIR": str(data_dir),
            # The developer's .env is not read: the bench measures the shipped defaults.
            "BIRB_ENV_FILE": str(data_dir / "no.env"),
            "API_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # runapi makes its own under the data dir
        return env

    def _settings(self, stack: Any) -> dict[str, Any]:
        import psycopg
        import redis
        from django.conf import settings

        config = settings.BIRB
        with psycopg.connect(stack.database_url) as conn:
            pg = conn.execute("SHOW server_version").fetchone()[0]
        redis_version = redis.Redis.from_url(stack.redis_url).info()["redis_version"]
        nats_version = subprocess.run(
            [str(Path(sys.executable).parent / "nats-server"), "--version"], capture_output=True, text=True
        ).stdout.strip()
        import django
        import granian
        import nats

        return {
            "durability": (
                "as make run: PostgreSQL fsync=on + synchronous_commit=on, JetStream file storage with "
                "sync_interval always, Redis appendonly everysec"
                if not self.args.no_fsync
                else "NOT as make run (--no-fsync, the tests' settings): PostgreSQL fsync=off + "
                "synchronous_commit=off, JetStream sync_interval default (2 min), Redis without AOF"
            ),
            "api_workers": config.api_workers,
            "api_threads": config.api_threads,
            "worker_batch_size": config.worker_batch_size,
            "worker_batch_timeout_s": config.worker_batch_timeout,
            "value_size_bytes": VALUE_SIZE,
            "keys": {
                "get_hit_batch_webdis": HIT_KEYS,
                "post": POST_KEYS,
                "get_miss_and_backlog": self.plan.backlog,
                "batch_get": BATCH_SIZE,
                "get_absent": ABSENT_KEYS,
                "batch_set": BATCH_SET_KEYS,
                "batch_set_per_request": BATCH_SIZE,
            },
            "persist_lag_rate": f"{LAG_SHARE_OF_POST:g} x the POST req/s of the run ({LAG_RATE:,}/s without one)",
            "connections": CONNECTIONS,
            "wrk_threads": WRK_THREADS,
            "duration_s": self.plan.duration,
            "versions": {
                "postgresql": pg,
                "redis": redis_version,
                "nats_server": nats_version,
                "django": django.__version__,
                "granian": granian.__version__,
                "nats_py": getattr(nats, "__version__", "") or _dist_version("nats-py"),
                **{f"debian {k}": v for k, v in tools.tool_versions().items()},
            },
        }

    # --- references -----------------------------------------------------------------------

    def references(self, stack: Any, data_dir: Path) -> None:
        import redis

        client = redis.Redis.from_url(stack.redis_url)
        pipe = client.pipeline(transaction=False)
        for i in range(HIT_KEYS):
            pipe.set(f"birbbench:wd:{i}", VALUE_JSON)
        pipe.execute()
        redis_port = stack.ports["redis"]

        if tools.available(self.tools, "redis-benchmark"):
            log(f"redis-benchmark GET, {self.plan.redis_requests} requests")
            self.results["redis_get"] = tools.run_redis_benchmark(
                redis_port, "birbbench:wd:0", requests=self.plan.redis_requests, connections=CONNECTIONS
            )
        else:
            self.results["redis_get"] = {"skipped": self.tools["redis-benchmark"]}

        log(f"bare nats-py publish + PubAck, {CONNECTIONS} in flight ({self.plan.duration:g} s)")
        body = ('{"op":"set","key":"w0","version":1,"value":' + VALUE_JSON + "}").encode()
        self.results["jetstream_publish"] = asyncio.run(
            pipeline.publish_in_flight(stack.nats_url, self.plan.duration, CONNECTIONS, body)
        )

        webdis = None
        if not tools.available(self.tools, "webdis"):
            self.results["webdis_get"] = {"skipped": self.tools["webdis"]}
        elif not self.load.use_wrk:
            self.results["webdis_get"] = {"skipped": "wrk is not installed (the reference needs wrk)"}
        else:
            try:
                webdis = tools.start_webdis(data_dir, redis_port, free_port())
                url = f"http://127.0.0.1:{webdis.port}"
                status, body = tools.http_get(f"{url}/GET/birbbench:wd:0")
                if status != 200 or VALUE_JSON.replace('"', '\\"').encode() not in body:
                    raise RuntimeError(f"webdis GET answered {status} {body[:200]!r}, not the value")
                log(f"Webdis GET over HTTP (wrk, {self.plan.duration:g} s)")
                self.results["webdis_get"] = self.load.run(
                    url, "get.lua", ["/GET/birbbench:wd:", str(HIT_KEYS), str(WRK_THREADS)], None
                )
            except Exception as error:
                self.results["webdis_get"] = {"skipped": f"webdis failed: {error}"}
            finally:
                if webdis is not None:
                    webdis.stop()

    # --- Birb Nest over HTTP -----------------------------------------------------------------

    def wanted(self, name: str) -> bool:
        only = [n for n in self.args.only if n not in CLUSTER_MEASUREMENTS]
        if self.args.only and not only:  # --only cluster: nothing of the single-node run
            return False
        return not only or name in only

    def birb_http(self, service: Service, stack: Any) -> None:
        url = service.url
        if any(self.wanted(name) for name in ("get_hit", "get_hit_limited", "get_hit_auth", "batch_get")):
            log(f"writing {HIT_KEYS} keys through the API")
            asyncio.run(_write_keys(url, [f"k{i}" for i in range(HIT_KEYS)]))
            status, body = tools.http_get(f"{url}/v1/cache/k0")
            if status != 200 or b'"payload"' not in body:
                raise RuntimeError(f"GET k0 answered {status} {body[:200]!r}")

        if self.wanted("get_hit"):
            log(f"GET hit ({self.plan.duration:g} s)")
            self.results["get_hit"] = self._http(
                service, "get_hit", "get.lua", ["/v1/cache/k", str(HIT_KEYS), str(WRK_THREADS)],
                get_requests("/v1/cache/k", HIT_KEYS),
            )  # fmt: skip
        if self.wanted("get_absent"):
            self.get_absent(service, stack)
        if self.wanted("get_hit_limited"):
            from ops.ratelimit import REFRESH_SECONDS, ratelimit_settings_update

            ratelimit_settings_update(**LIMITER_ON, by="bench")
            time.sleep(REFRESH_SECONDS + 0.3)  # every API process has read it
            try:
                log(f"GET hit, rate limiter on ({self.plan.duration:g} s)")
                self.results["get_hit_limited"] = self._http(
                    service, "get_hit_limited", "get.lua", ["/v1/cache/k", str(HIT_KEYS), str(WRK_THREADS)],
                    get_requests("/v1/cache/k", HIT_KEYS),
                )  # fmt: skip
            finally:
                ratelimit_settings_update(enabled=False, by="bench")
                time.sleep(REFRESH_SECONDS + 0.3)
        if self.wanted("get_hit_auth"):
            self.get_hit_auth(service)
        if self.wanted("batch_get"):
            log(f"batch get of {BATCH_SIZE} keys ({self.plan.duration:g} s)")
            batch = self._http(
                service, "batch_get", "batch.lua", ["k", str(HIT_KEYS), str(BATCH_SIZE)],
                batch_requests("k", HIT_KEYS, BATCH_SIZE),
            )  # fmt: skip
            batch["keys_per_s"] = round(batch.get("rps", 0) * BATCH_SIZE, 1)
            self.results["batch_get"] = batch
        if self.wanted("post"):
            log(f"durable write POST ({self.plan.duration:g} s)")
            self.results["post"] = self._http(
                service, "post", "post.lua", ["w", str(POST_KEYS), str(VALUE_SIZE)], post_requests("w", POST_KEYS)
            )
        if self.wanted("batch_set"):
            self.batch_set(service)

    def get_absent(self, service: Service, stack: Any) -> None:
        """GETs cycling over ABSENT_KEYS keys that exist nowhere (404 each), with the statements
        PostgreSQL ran on ``cache_entries`` meanwhile (pg_stat_statements: its counts are updated
        as each statement ends, where pg_stat_user_tables' wait for the backend's next flush)."""
        self._wait_idle(stack)  # the worker idle: the statements counted are the reads'
        status, body = tools.http_get(f"{service.url}/v1/cache/{ABSENT_PREFIX}probe")
        if status != 404:
            raise RuntimeError(f"GET of an absent key answered {status} {body[:200]!r}, not 404")
        log(f"GET absent key ({ABSENT_KEYS:,} keys that exist nowhere, {self.plan.duration:g} s)")
        reads_before, before = _reads(metrics(service.url)), pg_statements(stack.database_url)
        result = self._http(
            service, "get_absent", "absent.lua", [f"/v1/cache/{ABSENT_PREFIX}", str(ABSENT_KEYS), str(WRK_THREADS)],
            get_requests(f"/v1/cache/{ABSENT_PREFIX}", ABSENT_KEYS), expect=404,
        )  # fmt: skip
        settle(service.url)  # the requests still in flight when the load stopped are answered
        after, reads = pg_statements(stack.database_url), _reads(metrics(service.url)) - reads_before
        if "script" in result:  # wrk: its non-2xx are the 404s; absent.lua counted the other answers
            result["non_2xx"] = result["script"]["not_404"]
        result["answered_404"] = result.get("requests", 0) - result.get("non_2xx", 0)
        result["pg_statements"] = {name: after[name] - before[name] for name in after}
        # Per read the API answered (/metrics hits + misses): the load tool does not count the
        # requests in flight when it stops, which the API answers all the same.
        result["reads_answered_by_api"] = reads
        answered = reads if reads >= result.get("requests", 0) else result.get("requests", 0)
        if answered:
            result["pg_queries_per_request"] = round(result["pg_statements"]["cache_entries"] / answered, 4)
        self.results["get_absent"] = result

    def batch_set(self, service: Service) -> None:
        """Batch set of BATCH_SIZE distinct random keys of BATCH_SET_KEYS (new ones and existing ones
        mixed), every key durable before the answer; keys/s counts the keys answered 200 or 201."""
        log(f"batch set of {BATCH_SIZE} keys ({self.plan.duration:g} s)")
        counter = KeyResults()
        result = self._http(
            service, "batch_set", "batch_set.lua", ["b", str(BATCH_SET_KEYS), str(BATCH_SIZE), str(VALUE_SIZE)],
            batch_set_requests("b", BATCH_SET_KEYS, BATCH_SIZE), on_answer=counter, timeout=BATCH_SET_TIMEOUT,
        )  # fmt: skip
        result["settle_s"] = round(settle(service.url), 2)
        keys = result.setdefault("script", counter.counts)
        durable = keys["keys_created"] + keys["keys_updated"]
        result.update(keys)
        result["keys_durable"] = durable
        result["keys_per_s"] = round(durable / result["seconds"], 1) if result.get("seconds") else 0.0
        self.results["batch_set"] = result

    def get_hit_auth(self, service: Service) -> None:
        """GET hit with a valid API key (the default API_AUTH=auto once a key exists), then the
        same with API_AUTH=off (the API restarted), back to back."""
        from ops.access.keys import apikey_create
        from ops.models import ApiKey
        from ops.published import REFRESH_SECONDS

        get = ("get.lua", ["/v1/cache/k", str(HIT_KEYS), str(WRK_THREADS)], get_requests("/v1/cache/k", HIT_KEYS))
        token = apikey_create(name="bench", scopes=["read"]).token
        try:
            time.sleep(REFRESH_SECONDS + 0.3)  # every API process has read it
            status, _ = tools.http_get(f"{service.url}/v1/cache/k0")
            if status != 401:
                raise RuntimeError(f"GET without a key answered {status} once a key existed, not 401")
            log(f"GET hit with an API key ({self.plan.duration:g} s)")
            self.results["get_hit_auth"] = self._http(service, "get_hit_auth", *get, authorization=f"Bearer {token}")
        finally:
            ApiKey.objects.filter(name="bench").delete()  # published to the API processes on commit
        log("restarting the API with API_AUTH=off")
        service.restart_api(API_AUTH="off")
        try:
            log(f"GET hit, API_AUTH=off ({self.plan.duration:g} s)")
            self.results["get_hit_auth_off"] = self._http(service, "get_hit_auth_off", *get)
        finally:
            service.restart_api()

    def tracing_on(self, service: Service, stack: Any) -> None:
        """GET hit and POST with tracing on at 100% sampling (API and worker restarted with the
        variables, spans exported over OTLP/HTTP to a sink in this process), beside the rows with
        it off; then both restarted as they were."""
        if not any(self.wanted(name) for name in ("get_hit", "post")):
            log(f"writing {HIT_KEYS} keys through the API")
            asyncio.run(_write_keys(service.url, [f"k{i}" for i in range(HIT_KEYS)]))
        sink = SpanSink().start()
        traced = {
            "OTEL_TRACES_ENABLED": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
            "OTEL_TRACES_SAMPLER": "always_on",
        }
        try:
            self._wait_idle(stack)
            log("restarting the API and the worker with tracing on (100% sampled)")
            service.restart_api(**traced)
            service.stop_worker()
            service.start_worker()
            service.wait_worker()
            log(f"GET hit, tracing on ({self.plan.duration:g} s)")
            self.results["get_hit_traced"] = self._http(
                service, "get_hit_traced", "get.lua", ["/v1/cache/k", str(HIT_KEYS), str(WRK_THREADS)],
                get_requests("/v1/cache/k", HIT_KEYS),
            )  # fmt: skip
            log(f"durable write POST, tracing on ({self.plan.duration:g} s)")
            self.results["post_traced"] = self._http(
                service, "post_traced", "post.lua", ["w", str(POST_KEYS), str(VALUE_SIZE)],
                post_requests("w", POST_KEYS),
            )  # fmt: skip
            self._wait_idle(stack)
            time.sleep(3 * SCHEDULE_DELAY_MS / 1000)  # the last spans sent
            self.results["tracing_export"] = sink.figures()
        finally:
            service.restart_api()
            service.stop_worker()
            service.start_worker()
            service.wait_worker()
            sink.stop()

    def _http(
        self,
        service: Service,
        name: str,
        script: str,
        args: list[str],
        fallback: Any,
        authorization: str | None = None,
        **fallback_options: Any,
    ) -> dict[str, Any]:
        spy = self._start_profile(name, service.api_pids().get("api worker 1"), self.plan.duration - 1)
        before = metrics(service.url)
        cpu = CpuUse(service)
        result = self.load.run(service.url, script, args, fallback, authorization, **fallback_options)
        result["cores_used"] = cpu.finish()
        after = metrics(service.url)
        hits = after["cache_hits"] - before["cache_hits"]
        misses = after["cache_misses"] - before["cache_misses"]
        if hits + misses:
            result["miss_fraction"] = round(misses / (hits + misses), 4)
            result["hits"], result["misses"] = hits, misses
        self._finish_profile(name, spy)
        return result

    # --- profiles (--profile) ---------------------------------------------------------------

    def _start_profile(self, name: str, pid: int | None, seconds: float) -> Any:
        if not self.args.profile or pid is None:
            return None
        out = self.data_dir / f"profile-{name}.raw"
        proc = tools.start_pyspy(pid, seconds, out)
        return (proc, out, pid) if proc else None

    def _finish_profile(self, name: str, spy: Any) -> None:
        if spy is None:
            return
        proc, out, pid = spy
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if out.is_file():
            self.profiles[name] = {"pid": pid, **tools.aggregate_profile(out)}
            if self.args.profile_dir:
                Path(self.args.profile_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(out, Path(self.args.profile_dir) / out.name)

    # --- the pipeline -----------------------------------------------------------------------

    def _names(self) -> Any:
        from persistence import jetstream

        return jetstream.names()

    def _wait_idle(self, stack: Any, timeout: float = 60, stream: str = "") -> None:
        n = self._names()
        state = asyncio.run(pipeline.wait_drained(stack.nats_url, stream or n.stream, n.consumer, timeout=timeout))
        if not state["drained"]:
            self.notes.append(f"the worker had not drained the POST backlog after {timeout:.0f} s: {state}")

    def persist_lag(self, service: Service, stack: Any) -> None:
        self._wait_idle(stack)  # the POST measurement's backlog first
        self.results["persist_lag"] = self._persist_lag(service, stack.database_url, self.lag_rate("post"))

    def lag_rate(self, post: str) -> tuple[int, str]:
        """The persist lag's paced rate: LAG_SHARE_OF_POST x the req/s of the run's ``post`` row,
        the highest write rate the API sustained, or LAG_RATE without one; and where it came from."""
        rps = self.results.get(post, {}).get("rps")
        if not rps:
            return LAG_RATE, f"fixed ({post} not measured)"
        return max(1, round(LAG_SHARE_OF_POST * rps)), f"{LAG_SHARE_OF_POST:g} x {post} {rps:,.0f} req/s"

    def _persist_lag(self, service: Service, database_url: str, rate_of: tuple[int, str]) -> dict[str, Any]:
        (rate, rate_source), seconds = rate_of, self.plan.lag_seconds
        log(f"persist lag: {rate:,} writes/s ({rate_source}) for {seconds:g} s")
        poller = pipeline.LagPoller(database_url)
        poller.start()
        body = ('{"value": ' + VALUE_JSON + "}").encode()

        def on_answer(i: int, status: int, payload: bytes, at: float) -> None:
            if 200 <= status < 300:
                poller.ack(f"lag{i}", int(json.loads(payload)["version"]), at)

        host, port = service.url.removeprefix("http://").split(":")
        watch = tools.StarvationWatch(int(port), seconds)
        writer = asyncio.run(
            httpload.paced(
                host, int(port), lambda i: ("POST", f"/v1/cache/lag{i}", body), on_answer, rate=rate,
                duration=seconds, connections=CONNECTIONS,
            )
        )  # fmt: skip
        starved = watch.finish()
        deadline = time.monotonic() + 30
        while poller.outstanding() and time.monotonic() < deadline and poller.error is None:
            time.sleep(0.05)
        poller.stopping.set()
        poller.join(5)
        lags = poller.lags_ms()
        return {
            "rate": rate,
            "rate_source": rate_source,
            "seconds": seconds,
            **writer.summary(),
            "seen_in_postgresql": len(lags),
            "not_seen_after_30s": poller.outstanding(),
            "p50_ms": round(httpload.percentile(lags, 50), 1),
            "p99_ms": round(httpload.percentile(lags, 99), 1),
            "max_ms": round(max(lags), 1) if lags else 0.0,
            "poll_interval_ms": 20,
            "connections": CONNECTIONS,
            "server_connections": starved,
            **({"poller_error": str(poller.error)} if poller.error else {}),
        }

    # --- on clusters (--cluster) -------------------------------------------------------------

    def cluster(self, service: Service, stack: Any) -> None:
        """GET hit, POST and persist lag with the API and the worker on a Redis Cluster (3 masters +
        3 replicas) and a three-node NATS with R3 streams, all on this machine, after the
        single-node rows of the same run; and the bare publish floor on that NATS at R1 and R3,
        which is what R3's quorum round trip costs a write."""
        from types import SimpleNamespace

        from tools.nats_cluster import start_nats_cluster
        from tools.redis_cluster import start_redis_cluster

        durable = not self.args.no_fsync
        base = self.data_dir / "cluster"
        log("starting a Redis Cluster (3 masters + 3 replicas) and a three-node NATS cluster")
        redis_cluster = start_redis_cluster(base / "redis", persistence=durable)
        nats_cluster = None
        try:
            nats_cluster = start_nats_cluster(base / "nats", nodes=3, fsync=durable)
            env = {
                "REDIS_URL": redis_cluster.url,
                "NATS_URL": nats_cluster.url,
                "JETSTREAM_REPLICAS": "3",
                "BIRB_STREAM": CLUSTER_STREAM,
                "BIRB_DLQ_STREAM": f"{CLUSTER_STREAM}_DLQ",
                "BIRB_SUBJECT_PREFIX": "birbbenchcluster",
            }
            log("restarting the API and the worker on the clusters")
            service.stop_worker()
            service.restart_api(**env)
            service.start_worker()
            service.wait_worker()
            nats = SimpleNamespace(nats_url=nats_cluster.url)
            log(f"writing {HIT_KEYS} keys through the API (cluster)")
            asyncio.run(_write_keys(service.url, [f"k{i}" for i in range(HIT_KEYS)]))
            get = ("get.lua", ["/v1/cache/k", str(HIT_KEYS), str(WRK_THREADS)], get_requests("/v1/cache/k", HIT_KEYS))
            log(f"GET hit on the clusters ({self.plan.duration:g} s)")
            self.results["cluster_get_hit"] = self._http(service, "cluster_get_hit", *get)
            log(f"durable write POST on the clusters ({self.plan.duration:g} s)")
            self.results["cluster_post"] = self._http(
                service, "cluster_post", "post.lua", ["w", str(POST_KEYS), str(VALUE_SIZE)],
                post_requests("w", POST_KEYS),
            )  # fmt: skip
            self._wait_idle(nats, stream=CLUSTER_STREAM)
            log("persist lag on the clusters")
            self.results["cluster_persist_lag"] = self._persist_lag(
                service, stack.database_url, self.lag_rate("cluster_post")
            )
            body = ('{"op":"set","key":"w0","version":1,"value":' + VALUE_JSON + "}").encode()
            for replicas in (1, 3):
                log(f"bare nats-py publish + PubAck on the NATS cluster, R{replicas} ({self.plan.duration:g} s)")
                self.results[f"cluster_publish_r{replicas}"] = asyncio.run(
                    pipeline.publish_in_flight(
                        nats_cluster.url, self.plan.duration, CONNECTIONS, body, replicas=replicas
                    )
                )
        finally:
            service.stop_worker()
            if nats_cluster is not None:
                nats_cluster.stop()
            redis_cluster.stop()

    def drain(self, service: Service, stack: Any) -> None:
        n = self._names()
        count = self.plan.backlog
        log("stopping the worker to build a backlog")
        service.stop_worker()
        messages = pipeline.persist_messages("d", count, VALUE_JSON)
        first_seq = asyncio.run(pipeline.last_seq(stack.nats_url, n.stream)) + 1
        log(f"filling {n.stream} with {count:,} persist messages (concurrent publishes, PubAck each)")
        fill_rate = asyncio.run(pipeline.publish_all(stack.nats_url, n.persist_subject("set"), messages))
        log("reference: bare nats-py fetch(500) + ack of the same backlog, by a consumer of its own")
        asyncio.run(pipeline.create_reference_consumer(stack.nats_url, n.stream, n.persist_subjects, first_seq))
        try:
            self.results["jetstream_fetch_ack"] = asyncio.run(pipeline.bare_fetch_ack(stack.nats_url, n.stream, count))
        finally:
            asyncio.run(pipeline.delete_reference_consumer(stack.nats_url, n.stream))

        log("starting the worker on the backlog")
        service.start_worker()
        spy_started = False
        spy = None

        def started() -> bool:
            nonlocal spy_started, spy
            if not service.worker_consuming():
                return False
            if not spy_started and service.worker is not None:
                spy_started = True
                spy = self._start_profile("worker_drain", service.worker.pid, 8)
            return True

        # Bounded: a worker that cannot drain in 2 minutes gets the rate of what it did drain.
        state = asyncio.run(pipeline.wait_drained(stack.nats_url, n.stream, n.consumer, timeout=120, started=started))
        self._finish_profile("worker_drain", spy)
        import psycopg

        with psycopg.connect(stack.database_url) as conn:
            rows = conn.execute("SELECT count(*) FROM cache_entries WHERE key LIKE 'd%'").fetchone()[0]
        seconds = state["seconds"]
        self.results["worker_drain"] = {
            "messages": count,
            "seconds": seconds,
            "rate": round((count - state.get("pending", 0) - state.get("ack_pending", 0)) / seconds, 1)
            if seconds
            else 0.0,
            "drained": state["drained"],
            "rows_in_postgresql": rows,
            "fill_rate": round(fill_rate, 1),
        }
        if not state["drained"]:
            self.results["worker_drain"]["state"] = state

    def get_miss(self, service: Service) -> None:
        log(f"GET miss: keys in PostgreSQL only ({self.plan.duration:g} s)")
        result = self._http(
            service, "get_miss", "get.lua", ["/v1/cache/d", str(self.plan.backlog), str(WRK_THREADS)],
            get_requests("/v1/cache/d", self.plan.backlog),
        )  # fmt: skip
        self.results["get_miss"] = result

    # --- report -----------------------------------------------------------------------------

    def report_data(self) -> dict[str, Any]:
        r = self.results
        ratios = {}
        hit, webdis, rb = r.get("get_hit", {}), r.get("webdis_get", {}), r.get("redis_get", {})
        for name in ("get_hit", "get_miss"):
            if "rps" in r.get(name, {}) and "rps" in webdis:
                ratios[f"{name}_vs_webdis"] = round(r[name]["rps"] / webdis["rps"], 4)
        if "rps" in hit and "rps" in rb:
            ratios["get_hit_vs_redis"] = round(hit["rps"] / rb["rps"], 4)
        limited = r.get("get_hit_limited", {})
        if "rps" in limited and "rps" in hit:
            ratios["get_hit_limited_vs_off"] = round(limited["rps"] / hit["rps"], 4)
        for traced, off in (("get_hit_traced", "get_hit"), ("post_traced", "post")):
            if "rps" in r.get(traced, {}) and "rps" in r.get(off, {}):
                ratios[f"{traced}_vs_off"] = round(r[traced]["rps"] / r[off]["rps"], 4)
        auth, auth_off = r.get("get_hit_auth", {}), r.get("get_hit_auth_off", {})
        if "rps" in auth and "rps" in auth_off:
            ratios["get_hit_auth_vs_off"] = round(auth["rps"] / auth_off["rps"], 4)
        if "rps" in r.get("post", {}) and r.get("jetstream_publish", {}).get("rate"):
            ratios["post_vs_publish"] = round(r["post"]["rps"] / r["jetstream_publish"]["rate"], 4)
        for name, reference in (("get_absent", "get_hit"), ("post", "get_hit")):
            if "rps" in r.get(name, {}) and r.get(reference, {}).get("rps"):
                ratios[f"{name}_vs_{reference}"] = round(r[name]["rps"] / r[reference]["rps"], 4)
        if "keys_per_s" in r.get("batch_set", {}) and r.get("post", {}).get("rps"):
            ratios["batch_set_keys_vs_post"] = round(r["batch_set"]["keys_per_s"] / r["post"]["rps"], 4)
        for on_cluster, single in (("cluster_get_hit", "get_hit"), ("cluster_post", "post")):
            if "rps" in r.get(on_cluster, {}) and "rps" in r.get(single, {}):
                ratios[f"{on_cluster}_vs_single"] = round(r[on_cluster]["rps"] / r[single]["rps"], 4)
        r1, r3 = r.get("cluster_publish_r1", {}), r.get("cluster_publish_r3", {})
        if r1.get("rate") and r3.get("rate"):
            ratios["cluster_publish_r3_vs_r1"] = round(r3["rate"] / r1["rate"], 4)
        drain, bare = r.get("worker_drain", {}), r.get("jetstream_fetch_ack", {})
        if drain.get("rate") and bare.get("rate"):
            ratios["drain_vs_bare"] = round(drain["rate"] / bare["rate"], 4)
        return {
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "smoke": self.plan.smoke,
            "profiled": bool(self.args.profile),
            "no_fsync": bool(self.args.no_fsync),
            "command": self.args.command_line,
            "seconds": round(self.seconds, 1),
            "machine": tools.machine_info(),
            "machine_load": self.load_info,
            "settings": self.settings,
            "tools": self.tools,
            "results": r,
            "ratios": ratios,
            "targets": targets(r, ratios),
            "notes": self.notes,
            "profiles": self.profiles,
        }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def targets(r: dict[str, Any], ratios: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's targets, each met / missed / n/a (a reference or a figure is missing)."""
    t = TARGETS
    rss = r.get("rss_mb", {})
    api_rss = max((mb for role, mb in rss.items() if role.startswith("api")), default=None)

    def unread(name: str) -> int:
        return int(r.get(name, {}).get("server_connections", {}).get("unread_whole_run", 0))

    def unread_note(name: str) -> str:
        return f" of the answered; {unread(name)} of {CONNECTIONS} connections never answered" if unread(name) else ""

    lag = r.get("persist_lag", {})
    lag_rate_reached = lag.get("achieved_rps", 0) >= 0.95 * lag.get("rate", LAG_RATE)
    lag_note = f" at {lag.get('achieved_rps', 0):,.0f} writes/s" + ("" if lag_rate_reached else " (rate not reached)")
    lag_rate = f"{lag['rate']:,} writes/s ({lag.get('rate_source', 'fixed')})" if "rate" in lag else "the POST rate"
    batch = r.get("batch_set", {})
    failed_keys = batch.get("keys_failed", 0)
    rows = [
        ("durable write throughput", f">= {t['post_vs_get_hit']:g} x GET hit of the run", ratios.get("post_vs_get_hit"),
         lambda v: v >= t["post_vs_get_hit"], "{:.2f} x" + f" ({_fmt(r.get('post', {}).get('rps'))} req/s)"),
        ("durable write vs its floor", f">= {t['post_vs_publish']:g} x bare publish + PubAck (fsync each)",
         ratios.get("post_vs_publish"), lambda v: v >= t["post_vs_publish"], "{:.2f} x"),
        (f"batch set of {BATCH_SIZE} keys", f">= {t['batch_set_keys_vs_post']:g} x POST req/s, in durable keys/s",
         ratios.get("batch_set_keys_vs_post"), lambda v: v >= t["batch_set_keys_vs_post"] and not failed_keys,
         "{:.1f} x" + f" ({_fmt(batch.get('keys_per_s'))} keys/s"
         + (f"; {failed_keys:,} keys refused)" if failed_keys else ")")),
        ("GET hit throughput", f">= {t['get_hit_vs_webdis']:.2f} x Webdis", ratios.get("get_hit_vs_webdis"),
         lambda v: v >= t["get_hit_vs_webdis"], "{:.3f} x"),
        ("GET hit p99 at 50 connections", f"<= {t['get_hit_p99_ms']:g} ms (every connection answered)",
         r.get("get_hit", {}).get("p99_ms"), lambda v: v <= t["get_hit_p99_ms"] and not unread("get_hit"),
         "{:.1f} ms" + unread_note("get_hit")),
        ("GET hit with an API key", f">= {t['get_hit_auth_vs_off']:g} x the same with API_AUTH=off",
         ratios.get("get_hit_auth_vs_off"), lambda v: v >= t["get_hit_auth_vs_off"], "{:.2f} x"),
        ("GET absent key", f">= {t['get_absent_vs_get_hit']:g} x GET hit of the run",
         ratios.get("get_absent_vs_get_hit"), lambda v: v >= t["get_absent_vs_get_hit"],
         "{:.2f} x" + (f" ({r['get_absent']['pg_queries_per_request']:.3f} PostgreSQL queries per request)"
                       if "pg_queries_per_request" in r.get("get_absent", {}) else "")),
        ("persist lag p99 at the highest write rate", f"<= {t['lag_p99_ms']:,.0f} ms at {lag_rate}, >= 95% reached",
         lag.get("p99_ms"), lambda v: v <= t["lag_p99_ms"] and lag_rate_reached, "{:,.0f} ms" + lag_note),
        ("worker drain rate", f">= {t['drain_vs_bare']:g} x bare nats-py fetch+ack", ratios.get("drain_vs_bare"),
         lambda v: v >= t["drain_vs_bare"], "{:.2f} x"),
        ("API process RSS (each)", f"<= {t['api_rss_mb']:g} MB", api_rss, lambda v: v <= t["api_rss_mb"],
         "{:.0f} MB (largest)"),
        ("worker RSS draining 1,000,000 messages", f"<= {t['worker_rss_mb']:g} MB", None, lambda v: False,
         "n/a here: measured by the cost curves (bench/curves.py)"),
    ]  # fmt: skip
    out = []
    for name, required, value, check, fmt in rows:
        out.append({
            "target": name, "required": required,
            "measured": fmt.format(value) if value is not None else ("n/a" if "{" in fmt else fmt),
            "value": value, "met": None if value is None else bool(check(value)),
        })  # fmt: skip
    return out


def cluster_markdown(r: dict[str, Any], ratios: dict[str, float], http_row: Any, lines: list[str]) -> None:
    """Append the --cluster rows to ``lines``, in a table of their own under the single-node one
    (``http_row`` appends its rows to the same ``lines``)."""
    lines += [
        "",
        "On clusters, same machine: Redis Cluster 3 masters + 3 replicas, NATS 3 nodes, streams R3 "
        "(JETSTREAM_REPLICAS=3, REDIS_CLUSTER_WAIT_REPLICAS=1), one API and one worker as above.",
        "",
        "| measurement | req/s | p50 | p99 | vs reference | notes |",
        "|---|---:|---:|---:|---|---|",
    ]
    http_row(
        "Birb Nest GET hit, cluster", "cluster_get_hit",
        f"{ratios['cluster_get_hit_vs_single']:.2f} x single node" if "cluster_get_hit_vs_single" in ratios else "",
        "redis-py's cluster client: slot lookup and a pipeline per node",
    )  # fmt: skip
    http_row(
        "Birb Nest durable write (POST), cluster", "cluster_post",
        f"{ratios['cluster_post_vs_single']:.2f} x single node" if "cluster_post_vs_single" in ratios else "",
        "PubAck after a quorum of 2 of 3 stored it; version replicated first (WAIT 1)",
    )  # fmt: skip
    for replicas in (1, 3):
        pub = r.get(f"cluster_publish_r{replicas}", {})
        if pub:
            ratio = ""
            if replicas == 3 and "cluster_publish_r3_vs_r1" in ratios:
                ratio = f"{ratios['cluster_publish_r3_vs_r1']:.2f} x R1"
            lines.append(
                f"| JetStream publish + PubAck, bare nats-py, R{replicas} on the cluster | {_fmt(pub.get('rate'))} | "
                f"{_fmt(pub.get('p50_ms'), '.2f')} ms | {_fmt(pub.get('p99_ms'), '.2f')} ms | {ratio} | "
                f"reference: {pub.get('in_flight')} in flight; {pub.get('failed', 0)} failed |"
            )
    lag = r.get("cluster_persist_lag", {})
    if lag:
        lines.append(
            f"| Persist lag, cluster | {_fmt(lag.get('achieved_rps'))} writes/s | {_fmt(lag.get('p50_ms'))} ms | "
            f"{_fmt(lag.get('p99_ms'))} ms | | paced at {lag.get('rate', 0):,}/s ({lag.get('rate_source', 'fixed')}); "
            f"max {_fmt(lag.get('max_ms'))} ms"
            + (f"; **{lag['not_seen_after_30s']} not seen**" if lag.get("not_seen_after_30s") else "")
            + " |"
        )


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(data: dict[str, Any]) -> str:
    r, ratios, s, m = data["results"], data["ratios"], data["settings"], data["machine"]
    lines = []
    title = "Birb Nest benchmark" + (" (SMOKE run: figures are not meaningful)" if data["smoke"] else "")
    if data["profiled"]:
        title += " (py-spy attached: figures are lower than usual)"
    if data.get("no_fsync"):
        title += " (--no-fsync: not the shipped durability settings)"
    lines += [f"## {title}", ""]
    lines.append(
        f"{data['timestamp']} · {m['cores']} cores, {m['cpu_model']}, {m['memory_gb']} GB · {m['os']} · "
        f"Python {m['python']} · load tool on the same box"
    )
    lines.append(
        f"API {s['api_workers']} processes x {s['api_threads']} threads, one worker (batch {s['worker_batch_size']}, "
        f"timeout {s['worker_batch_timeout_s']:g} s); {s['durability']}."
    )
    ml = data.get("machine_load") or {}
    if ml:
        lines.append(
            f"Machine load during the run: load average {ml['loadavg_start']:.1f} at start, "
            f"{ml['loadavg_end']:.1f} at end; "
            f"other processes used {ml['others_cpu_s']:.0f} CPU-s ({ml['others_share_of_machine'] * 100:.0f}% of the "
            f"machine), the bench and what it started {ml['bench_cpu_s']:.0f} CPU-s."
        )
    keys = s["keys"]
    lines.append(
        f"Value {s['value_size_bytes']} bytes of JSON; keys: GET hit / batch / Webdis "
        f"{keys['get_hit_batch_webdis']:,}, "
        f"POST {keys['post']:,} (random), GET miss = the drained backlog {keys['get_miss_and_backlog']:,}, "
        f"GET absent {keys.get('get_absent', ABSENT_KEYS):,} that exist nowhere, batch set "
        f"{keys.get('batch_set_per_request', BATCH_SIZE)} distinct random keys of "
        f"{keys.get('batch_set', BATCH_SET_KEYS):,}; "
        f"{s['connections']} connections, wrk -t{s['wrk_threads']}, {s['duration_s']:g} s each."
    )
    lines += ["", "| measurement | req/s | p50 | p99 | vs reference | notes |", "|---|---:|---:|---:|---|---|"]

    def http_row(label: str, key: str, ratio: str = "", note: str = "") -> None:
        fig = r.get(key, {})
        if "skipped" in fig:
            lines.append(f"| {label} | skipped | | | | {fig['skipped']} |")
            return
        extra = []
        if fig.get("non_2xx") or fig.get("errors"):
            extra.append(f"**{fig.get('non_2xx', 0)} non-2xx, {fig.get('errors', 0)} socket errors**")
        starved = fig.get("server_connections", {}).get("unread_whole_run", 0)
        if starved:
            extra.append(f"**{starved} of {CONNECTIONS} connections never served** (not in req/s, p99)")
        if note:
            extra.append(note)
        if "cores_used" in fig:
            c = fig["cores_used"]
            extra.append(f"cores: API {c['api']:.2f}, worker {c['worker']:.2f}, machine {c['machine']:.2f}")
        lines.append(
            f"| {label} | {_fmt(fig.get('rps'))} | {_fmt(fig.get('p50_ms'), '.2f')} ms | "
            f"{_fmt(fig.get('p99_ms'), '.2f')} ms | {ratio} | {'; '.join(extra)} |"
        )

    http_row("Redis GET (redis-benchmark)", "redis_get", note="reference: RESP, no HTTP")
    http_row("Webdis GET over HTTP", "webdis_get", note="reference: C HTTP front end to the same Redis")
    hit_ratio = " · ".join(
        x for x in (
            f"{ratios['get_hit_vs_webdis']:.3f} x Webdis" if "get_hit_vs_webdis" in ratios else "",
            f"{ratios['get_hit_vs_redis']:.3f} x Redis" if "get_hit_vs_redis" in ratios else "",
        ) if x
    )  # fmt: skip
    http_row("Birb Nest GET hit", "get_hit", hit_ratio)
    absent = r.get("get_absent", {})
    http_row(
        f"Birb Nest GET absent key ({ABSENT_KEYS:,} keys, 404)", "get_absent",
        f"{ratios['get_absent_vs_get_hit']:.2f} x GET hit" if "get_absent_vs_get_hit" in ratios else "",
        _absent_note(absent),
    )  # fmt: skip
    http_row(
        "Birb Nest GET hit, rate limiter on", "get_hit_limited",
        f"{ratios['get_hit_limited_vs_off']:.2f} x limiter off" if "get_hit_limited_vs_off" in ratios else "",
        "fixed window, one client, limit never reached",
    )  # fmt: skip
    http_row(
        "Birb Nest GET hit, valid API key", "get_hit_auth",
        f"{ratios['get_hit_auth_vs_off']:.2f} x API_AUTH=off" if "get_hit_auth_vs_off" in ratios else "",
        "Authorization: Bearer, checked in process (the next row is its reference)",
    )  # fmt: skip
    http_row(
        "Birb Nest GET hit, API_AUTH=off", "get_hit_auth_off", "",
        "reference for the row above: the API restarted without the key check, measured right after it",
    )  # fmt: skip
    miss = r.get("get_miss", {})
    http_row(
        "Birb Nest GET miss (read-through from PostgreSQL)", "get_miss",
        f"{ratios['get_miss_vs_webdis']:.3f} x Webdis" if "get_miss_vs_webdis" in ratios else "",
        _miss_note(miss, keys["get_miss_and_backlog"]),
    )  # fmt: skip
    publish = r.get("jetstream_publish", {})
    if publish:
        lines.append(
            f"| JetStream publish + PubAck, bare nats-py | {_fmt(publish.get('rate'))} | "
            f"{_fmt(publish.get('p50_ms'), '.2f')} ms | {_fmt(publish.get('p99_ms'), '.2f')} ms | | "
            f"reference: the durable write's floor ({publish.get('in_flight')} in flight, same server and storage) |"
        )
    http_row(
        "Birb Nest durable write (POST, 2xx after PubAck)", "post",
        f"{ratios['post_vs_publish']:.2f} x bare publish" if "post_vs_publish" in ratios else "",
    )  # fmt: skip
    exported = r.get("tracing_export", {})
    exported_note = f"{exported.get('spans', 0):,} spans exported to an OTLP/HTTP sink" if exported else ""
    http_row(
        "Birb Nest GET hit, tracing on (100%)", "get_hit_traced",
        f"{ratios['get_hit_traced_vs_off']:.2f} x tracing off" if "get_hit_traced_vs_off" in ratios else "",
        "OTEL_TRACES_ENABLED=true, always_on; API restarted; off = the GET hit row",
    )  # fmt: skip
    http_row(
        "Birb Nest POST, tracing on (100%)", "post_traced",
        f"{ratios['post_traced_vs_off']:.2f} x tracing off" if "post_traced_vs_off" in ratios else "",
        "API and worker traced; off = the durable write row" + (f"; {exported_note}" if exported_note else ""),
    )  # fmt: skip
    batch = r.get("batch_get", {})
    http_row(f"Birb Nest batch get of {BATCH_SIZE} keys", "batch_get", note=f"{_fmt(batch.get('keys_per_s'))} keys/s")
    batch_set = r.get("batch_set", {})
    http_row(
        f"Birb Nest batch set of {BATCH_SIZE} keys (durable)", "batch_set",
        f"{ratios['batch_set_keys_vs_post']:.1f} x POST, in keys/s" if "batch_set_keys_vs_post" in ratios else "",
        _batch_set_note(batch_set),
    )  # fmt: skip
    bare, drain, lag = r.get("jetstream_fetch_ack", {}), r.get("worker_drain", {}), r.get("persist_lag", {})
    lines.append(
        f"| JetStream fetch(500)+ack, bare nats-py (msgs/s) | {_fmt(bare.get('rate'))} | | | | "
        f"{bare.get('messages', 0):,} messages in {bare.get('seconds', 0):.2f} s; reference |"
    )
    drain_note = f"{drain.get('messages', 0):,} messages in {drain.get('seconds', 0):.2f} s, " + (
        f"{drain.get('rows_in_postgresql', 0):,} rows" if drain.get("drained") else "**did not drain**"
    )
    lines.append(
        f"| Worker drain into PostgreSQL (msgs/s) | {_fmt(drain.get('rate'))} | | | "
        f"{ratios['drain_vs_bare']:.2f} x bare nats-py | {drain_note} |"
        if "drain_vs_bare" in ratios
        else f"| Worker drain into PostgreSQL (msgs/s) | {_fmt(drain.get('rate'))} | | | | {drain_note} |"
    )
    lines.append(
        f"| Persist lag, API 2xx -> row in PostgreSQL | {_fmt(lag.get('achieved_rps'))} writes/s | "
        f"{_fmt(lag.get('p50_ms'))} ms | {_fmt(lag.get('p99_ms'))} ms | | paced at {lag.get('rate', 0):,}/s "
        f"({lag.get('rate_source', 'fixed')}) for {lag.get('seconds', 0):g} s, new keys, polled every 20 ms; "
        f"max {_fmt(lag.get('max_ms'))} ms"
        + (f"; **{lag['not_seen_after_30s']} not seen**" if lag.get("not_seen_after_30s") else "")
        + (f"; {lag['non_2xx']} non-2xx, {lag['errors']} errors" if lag.get("non_2xx") or lag.get("errors") else "")
        + (f"; **{lag['not_sent']:,} not sent: the API fell behind**" if lag.get("not_sent") else "")
        + (
            f"; **{lag['server_connections']['unread_whole_run']} of {CONNECTIONS} writer connections never read**"
            if lag.get("server_connections", {}).get("unread_whole_run")
            else ""
        )
        + " |"
    )
    if any(name.startswith("cluster_") for name in r):
        cluster_markdown(r, ratios, http_row, lines)
    rss = r.get("rss_mb", {})
    lines += ["", "Peak RSS: " + ", ".join(f"{role} {mb:.0f} MB" for role, mb in rss.items()) + "."]
    lines += ["", "| target | required | measured | |", "|---|---|---|---|"]
    for t in data["targets"]:
        verdict = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['required']} | {t['measured']} | {verdict} |")
    for note in data["notes"]:
        lines += ["", f"Note: {note}"]
    for name, fig in r.items():
        if isinstance(fig, dict) and "command" in fig:
            lines.append(f"<!-- {name}: {fig['command']} -->")
    if data["profiles"]:
        lines += ["", "### Profiles (py-spy record --gil, self time by function, top 15)"]
        for name, prof in data["profiles"].items():
            lines += ["", f"**{name}** (pid {prof['pid']}, {prof['samples']} samples)", "", "| % | function |",
                      "|---:|---|"]  # fmt: skip
            lines += [f"| {row['pct']:.1f} | `{row['function']}` |" for row in prof["self"]]
    lines.append("")
    lines.append(f"Whole run: {data['seconds']:.0f} s. Command: `{data['command']}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="every measurement for ~1-2 s, backlog 2,000")
    parser.add_argument("--duration", type=float, help="seconds of each HTTP measurement (default 10; smoke 1.5)")
    parser.add_argument("--backlog", type=int, help="messages in the drain backlog (default 100,000; smoke 2,000)")
    parser.add_argument(
        "--install-tools",
        action="store_true",
        help="apt-get install wrk, redis-tools, webdis when missing (root only; `make bench` does)",
    )
    parser.add_argument("--profile", action="store_true",
                        help="py-spy record --gil one granian worker during each HTTP measurement, and the worker "
                             "during the drain (slows what it profiles)")  # fmt: skip
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=sorted(tools.PACKAGES),
        help="treat this tool as missing (exercises the fallbacks; repeatable)",
    )
    parser.add_argument("--profile-dir", help="also keep the raw py-spy files here")
    parser.add_argument("--out", default=str(BASE_DIR / "var" / "bench"), help="where the JSON goes (var/bench)")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="servers without fsync, as the tests run them (to see what durability costs; not the shipped settings)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=(*MEASUREMENTS, *TRACING_MEASUREMENTS, *CLUSTER_MEASUREMENTS),
        default=[],
        help="run only this measurement (repeatable; get_miss includes the drain, which makes its keys)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also GET hit, POST, persist lag on a local Redis Cluster (3+3) and 3-node NATS with R3 streams",
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' data and logs")
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])])
    duration = args.duration or (1.5 if args.smoke else 10.0)
    backlog = args.backlog or (2_000 if args.smoke else 100_000)
    plan = Plan(
        smoke=args.smoke,
        duration=duration,
        backlog=backlog,
        lag_seconds=2.0 if args.smoke else duration,
        redis_requests=int(max(20_000, duration * 100_000)),
    )
    # Explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    bench = Bench(plan, args)
    try:
        data = bench.run()
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(data, indent=2) + "\n"
    (out / f"bench-{stamp}{'-smoke' if plan.smoke else ''}.json").write_text(text)
    (out / "latest.json").write_text(text)
    print(markdown(data), flush=True)
    log(f"figures written to {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
