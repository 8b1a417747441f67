"""`python -m bench.curves [--rows 10000,1000000] [--large] [--smoke] [--only NAME]`: cost curves.

How each cost grows with the data (issue #14, "Cost curves"), on a stack of its own started as
`make bench` starts it (tools.stack with the durability settings of `make run`; the API and one
worker through bench.run's ``Service``):

- ``rows``: GET miss (read-through from PostgreSQL, wrk at 50 connections) and
  ``manage.py rehydrate --all`` with 10k and 1M rows in ``cache_entries`` (10M with ``--large``),
  the rows written with COPY and not in Redis; beside it, the buffers and time PostgreSQL spends
  on one primary-key lookup (EXPLAIN ANALYZE), which is what should grow as log n;
- ``values``: GET hit and durable POST throughput and p99 for values of 100 B, 10 KB, 100 KB and
  1 MB (10^6 bytes of JSON: under the default MAX_VALUE_SIZE of 1 MiB, nothing is changed);
- ``backlog``: the worker's drain of a 1,000,000-message backlog (published while it is
  stopped, as the API would have), its peak RSS meanwhile, and the API's POST latency at a
  paced 200 writes/s before and during the drain;
- ``purge``: deleting the expired quarter of a 1M-row table with ``manage.py purge_expired
  --retention 0s`` (the purge the workers run every WORKER_EXPIRED_PURGE_INTERVAL, run to the
  end), its time, and GET hit and GET miss latency of paced readers before and during it.

Prints a markdown table per curve on stdout (progress on stderr), writes the figures as JSON to
``var/bench/curves-<UTC stamp>.json`` and a plot to ``docs/bench/cost-curves.png``. Never
fails on a slow figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))

from bench import httpload, pipeline, tools  # noqa: E402
from bench.run import (  # noqa: E402
    CONNECTIONS,
    VALUE_JSON,
    WRK_THREADS,
    Bench,
    Load,
    Plan,
    RssSampler,
    Service,
    _fmt,
    _raise_interrupt,
    _write_keys,
    get_requests,
    log,
    shut_down,
)

CURVES = ("rows", "values", "backlog", "purge")
DEFAULT_ROWS = (10_000, 1_000_000)
LARGE_ROWS = 10_000_000
VALUE_SIZES = (100, 10_000, 100_000, 1_000_000)
WRITE_RATE = 200  # paced POSTs/s while the backlog drains (and before, as the reference)
READ_RATE = 100  # paced GETs/s of each kind (hit, miss) around the purge
PURGE_BATCH = 5_000  # persistence.write_behind.PURGE_BATCH, what the purge deletes per transaction
FILL_CHUNK = 100_000  # backlog messages built and published at a time
EXPIRED_EVERY = 4  # one row in four of the purge table has expired
WORKER_RSS_TARGET_MB = 150.0


def _sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"duration": 1.0, "value_keys": 10, "backlog": 2_000, "purge_rows": 20_000, "quiet": 1.0}
    return {"duration": 5.0, "value_keys": 100, "backlog": 1_000_000, "purge_rows": 1_000_000, "quiet": 5.0}


# --- rows in cache_entries ------------------------------------------------------------------


def copy_rows(database_url: str, prefix: str, start: int, stop: int, *, expired_every: int = 0) -> float:
    """COPY rows ``<prefix><start>`` … ``<prefix><stop - 1>`` into cache_entries (version 1, the
    bench's 200-byte value, no metadata); with ``expired_every`` every n-th row expired an hour
    ago. Seconds taken, VACUUM ANALYZE included (a table the planner and the visibility map know,
    as a table that grew slowly would be)."""
    import psycopg

    now = datetime.now(UTC)
    stamp = now.isoformat()
    past = (now - timedelta(hours=1)).isoformat()
    began = time.perf_counter()
    columns = "key, value, version, metadata, expires_at, deleted, created_at, updated_at"
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY cache_entries ({columns}) FROM STDIN") as copy:
            for chunk in range(start, stop, 50_000):
                lines = []
                for i in range(chunk, min(stop, chunk + 50_000)):
                    expires = past if expired_every and i % expired_every == 0 else "\\N"
                    lines.append(f"{prefix}{i}\t{VALUE_JSON}\t1\t{{}}\t{expires}\tf\t{stamp}\t{stamp}\n")
                copy.write("".join(lines).encode())
        conn.execute("VACUUM ANALYZE cache_entries")
        # The load's dirty pages written now, not by a checkpoint during the next measurement.
        conn.execute("CHECKPOINT")
    return time.perf_counter() - began


def lookup_cost(database_url: str, keys: list[str]) -> dict[str, float]:
    """PostgreSQL's own cost of the read-through's lookup by key: mean buffers touched and mean
    execution time over ``keys`` (EXPLAIN ANALYZE of the selector's query shape)."""
    import psycopg

    buffers, ms = [], []
    with psycopg.connect(database_url, autocommit=True) as conn:
        for key in keys:
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM cache_entries WHERE key = %s AND NOT deleted "
                "AND (expires_at IS NULL OR expires_at > now())",
                (key,),
            ).fetchone()[0][0]
            top = plan["Plan"]
            buffers.append(top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0))
            ms.append(plan["Execution Time"])
    return {
        "lookups": len(keys),
        "buffers_mean": round(sum(buffers) / len(buffers), 2),
        "exec_ms_mean": round(sum(ms) / len(ms), 4),
        "exec_ms_p50": round(httpload.percentile(ms, 50), 4),
    }


def table_facts(database_url: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE relname = 'cache_entries'").fetchone()[0]
        size = conn.execute("SELECT pg_total_relation_size('cache_entries')").fetchone()[0]
    return {"rows_estimate": int(rows), "table_mb": round(size / 2**20, 1)}


def flush_redis(redis_url: str) -> None:
    """Empty the bench's own Redis (nothing else uses it): every key is read from PostgreSQL
    again, as after a Redis restart without persistence (the runbook's FLUSHDB; what
    ``redis_store.namespace_flush`` does key by key)."""
    import redis

    # ASYNC: a synchronous FLUSHDB of a million entries outlasts the client's read timeout.
    redis.Redis.from_url(redis_url).flushdb(asynchronous=True)


def settle(url: str, timeout: float = 60) -> float:
    """Wait until the API answers ``GET /`` within 50 ms three times running (after a curve that
    left it a queue of megabyte requests); seconds waited."""
    began = time.monotonic()
    quick = 0
    while quick < 3 and time.monotonic() - began < timeout:
        t0 = time.monotonic()
        try:
            tools.http_get(url + "/")
            quick = quick + 1 if time.monotonic() - t0 < 0.05 else 0
        except OSError:
            quick = 0
        time.sleep(0.1)
    return time.monotonic() - began


# --- paced load with timestamps ---------------------------------------------------------------


class Trickle(threading.Thread):
    """Paced requests (``rate``/s, open loop, bench.httpload.paced in windows of 1 s) until
    stopped; each answer kept as (monotonic time it was sent, latency ms, status)."""

    def __init__(self, url: str, make: Callable[[int], httpload.Request], rate: float, connections: int = 8) -> None:
        super().__init__(name="trickle", daemon=True)
        self.url, self.make, self.rate, self.connections = url, make, rate, connections
        self.samples: list[tuple[float, float, int]] = []
        self.errors = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        while not self.stopping.is_set():
            result = asyncio.run(self._window(host, int(port), len(self.samples) + self.errors))
            self.errors += result.errors

    async def _window(self, host: str, port: int, base: int) -> httpload.PacedResult:
        sent: dict[int, float] = {}

        def make(i: int) -> httpload.Request:
            sent[i] = time.monotonic()
            return self.make(base + i)

        def answer(i: int, status: int, payload: bytes, at: float) -> None:
            self.samples.append((sent[i], (at - sent[i]) * 1000, status))

        return await httpload.paced(
            host, port, make, answer, rate=self.rate, duration=1.0, connections=self.connections
        )

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Latency of the requests sent in [start, end)."""
        inside = [(lat, status) for at, lat, status in list(self.samples) if start <= at < end]
        lats = [lat for lat, _ in inside]
        return {
            "requests": len(inside),
            "non_2xx": sum(1 for _, status in inside if not 200 <= status < 300),
            "p50_ms": round(httpload.percentile(lats, 50), 2),
            "p99_ms": round(httpload.percentile(lats, 99), 2),
            "max_ms": round(max(lats), 2) if lats else 0.0,
        }

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


# --- the run --------------------------------------------------------------------------------


class Curves:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = _sizes(args.smoke)
        self.rows = sorted(set(args.rows) | ({LARGE_ROWS} if args.large else set()))
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []
        self.seconds: dict[str, float] = {}

    def wanted(self, name: str) -> bool:
        return not self.args.only or name in self.args.only

    def run(self) -> dict[str, Any]:
        from tools.stack import make_temp_data_dir, start_stack

        began = time.monotonic()
        found = tools.ensure_tools(self.args.install_tools)
        use_wrk = tools.available(found, "wrk")
        if not use_wrk:
            self.notes.append(
                "wrk is not installed: the API was loaded by bench's Python client, whose figures are not "
                "comparable with wrk's (fine for a smoke run)"
            )
        plan = Plan(smoke=self.args.smoke, duration=self.size["duration"], backlog=self.size["backlog"],
                    lag_seconds=self.size["duration"], redis_requests=0)  # fmt: skip
        # bench.run's Bench lends its environment, its wrk measurement with /metrics and CPU, and
        # its settings summary; the curves' own steps are below.
        self.bench = Bench(plan, argparse.Namespace(profile=False, no_fsync=False, only=[], cluster=False))
        self.bench.load = Load(use_wrk, plan)
        data_dir = make_temp_data_dir("birb-curves-")
        self.bench.data_dir = data_dir
        stack = service = sampler = None
        failed = False
        try:
            log(f"curves: starting PostgreSQL, Redis, NATS in {data_dir} (durable, as make run)")
            stack = start_stack(data_dir, fsync=True, redis_persistence=True)
            env = self.bench._env(stack, data_dir)
            os.environ.update(env)
            import django

            django.setup()
            service = Service(env, data_dir / "log", int(env["API_PORT"]))
            service.migrate()
            service.start_api()
            service.start_worker()
            service.wait_worker()
            sampler = RssSampler(service)
            sampler.start()
            self.settings = self.bench._settings(stack)
            for name in CURVES:
                if self.wanted(name):
                    t0 = time.monotonic()
                    getattr(self, f"curve_{name}")(service, stack, sampler)
                    self.seconds[name] = round(time.monotonic() - t0, 1)
                    log(f"curve {name}: {self.seconds[name]:.0f} s")
        except Exception:
            failed = True
            raise
        finally:
            shut_down(sampler, service, stack, self.results, data_dir, keep=failed or self.args.keep)
        return {
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "smoke": self.args.smoke,
            "command": self.args.command_line,
            "seconds": round(time.monotonic() - began, 1),
            "seconds_per_curve": self.seconds,
            "machine": tools.machine_info(),
            "settings": {
                "durability": self.settings["durability"],
                "api_workers": self.settings["api_workers"],
                "api_threads": self.settings["api_threads"],
                "worker_batch_size": self.settings["worker_batch_size"],
                "connections": CONNECTIONS,
                "duration_s": self.size["duration"],
                "max_value_size": self._max_value_size(),
                "versions": self.settings["versions"],
                "load_tool": "wrk" if use_wrk else "python",
            },
            "results": self.results,
            "notes": self.notes,
        }

    @staticmethod
    def _max_value_size() -> int:
        from django.conf import settings

        return int(settings.BIRB.max_value_size)

    # --- 1. rows ----------------------------------------------------------------------------

    def curve_rows(self, service: Service, stack: Any, sampler: RssSampler) -> None:
        points = []
        have = 0
        for n in self.rows:
            log(f"rows: COPY up to {n:,} rows into cache_entries")
            copy_s = copy_rows(stack.database_url, "r", have, n)
            have = n
            point: dict[str, Any] = {
                "rows": n,
                "copy_and_vacuum_s": round(copy_s, 1),
                **table_facts(stack.database_url),
            }
            sample = [f"r{random.randrange(n)}" for _ in range(200)]
            point["lookup"] = lookup_cost(stack.database_url, sample)
            flush_redis(stack.redis_url)
            log(f"rows: GET miss on {n:,} rows ({self.size['duration']:g} s)")
            point["get_miss"] = self.bench._http(
                service, f"get_miss_{n}", "get.lua", ["/v1/cache/r", str(n), str(WRK_THREADS)],
                get_requests("/v1/cache/r", n),
            )  # fmt: skip
            if point["get_miss"].get("hits"):
                self.notes.append(
                    f"GET miss on {n:,} rows: {point['get_miss']['hits']:,} of the requests were hits (the walk "
                    "wrapped round the table)"
                )
            time.sleep(1)  # the API done with wrk's last requests, then an empty Redis
            flush_redis(stack.redis_url)
            log(f"rows: manage.py rehydrate --all on {n:,} rows")
            point["rehydrate"] = self._rehydrate(service, n)
            flush_redis(stack.redis_url)
            points.append(point)
        self.results["rows"] = points

    def _rehydrate(self, service: Service, n: int) -> dict[str, Any]:
        """``manage.py rehydrate --all`` run in this process (call_command: the command's count,
        pages, pipelines and audit entry, without a Python start-up of seconds on a busy box)."""
        from io import StringIO

        from django.core.management import call_command

        out = StringIO()
        began = time.perf_counter()
        call_command("rehydrate", "--all", "--no-progress", stdout=out, stderr=StringIO())
        seconds = time.perf_counter() - began
        text = out.getvalue().strip()
        loaded = int(text.split()[1]) if text.startswith("rehydrated ") else 0
        present = re.search(r"(\d+) already in Redis", text)
        skipped = int(present.group(1)) if present else 0  # read through by a GET still in the API's queue
        rate = round((loaded + skipped) / seconds, 1)
        return {"seconds": round(seconds, 2), "loaded": loaded, "skipped": skipped, "rate": rate, "output": text}

    # --- 2. value sizes ---------------------------------------------------------------------

    def curve_values(self, service: Service, stack: Any, sampler: RssSampler) -> None:
        keys = self.size["value_keys"]
        points = []
        for size in VALUE_SIZES:
            value = '{"payload":"' + "x" * (size - 14) + '"}'
            body = ('{"value": ' + value + "}").encode()
            prefix = f"s{size}_"
            log(f"values: writing {keys} keys of {size:,} bytes")
            asyncio.run(_write_body(service.url, [f"{prefix}{i}" for i in range(keys)], body))
            log(f"values: GET hit, {size:,} bytes ({self.size['duration']:g} s)")
            point: dict[str, Any] = {"bytes": size}
            # Load.run, not Bench._http: /metrics may not answer within its 5 s while the API
            # still works through the 50 connections' last megabyte requests.
            point["get_hit"] = self.bench.load.run(
                service.url, "get.lua", [f"/v1/cache/{prefix}", str(keys), str(WRK_THREADS)],
                get_requests(f"/v1/cache/{prefix}", keys),
            )  # fmt: skip
            self.bench._wait_idle(stack, timeout=600)
            log(f"values: POST, {size:,} bytes ({self.size['duration']:g} s)")
            point["post"] = self.bench.load.run(
                service.url, "post.lua", [prefix, str(keys), str(size)],
                lambda i, p=prefix, b=body: ("POST", f"/v1/cache/{p}{random.randrange(keys)}", b),
            )  # fmt: skip
            t0 = time.monotonic()
            self.bench._wait_idle(stack, timeout=600)
            point["drain_after_post_s"] = round(time.monotonic() - t0, 2)
            for kind in ("get_hit", "post"):
                fig = point[kind]
                fig["mb_per_s"] = round(fig.get("rps", 0) * size / 1e6, 3)
            points.append(point)
        self.results["values"] = points

    # --- 3. backlog -------------------------------------------------------------------------

    def curve_backlog(self, service: Service, stack: Any, sampler: RssSampler) -> None:
        n = self.bench._names()
        count = self.args.backlog or self.size["backlog"]
        quiet = self.size["quiet"]
        body = ('{"value": ' + VALUE_JSON + "}").encode()
        writes = Trickle(service.url, lambda i: ("POST", f"/v1/cache/tw{i}", body), WRITE_RATE)
        self.bench._wait_idle(stack, timeout=600)
        settle(service.url)
        writes.start()
        t0 = time.monotonic()
        time.sleep(quiet)
        t1 = time.monotonic()
        writes.stop()
        before = writes.window(t0, t1)
        log("backlog: stopping the worker")
        service.stop_worker()
        log(f"backlog: publishing {count:,} persist messages (concurrent publishes, PubAck each)")
        fill_s = 0.0
        for part, start in enumerate(range(0, count, FILL_CHUNK)):
            # 100k messages at a time: a list of a million takes this process to 4 GB.
            messages = pipeline.persist_messages(f"b{part}_", min(FILL_CHUNK, count - start), VALUE_JSON)
            t_fill = time.perf_counter()
            asyncio.run(pipeline.publish_all(stack.nats_url, n.persist_subject("set"), messages))
            fill_s += time.perf_counter() - t_fill
        fill_rate = count / fill_s
        del messages
        sampler.peaks.pop("worker", None)  # the peak of this drain only
        writes = Trickle(service.url, lambda i: ("POST", f"/v1/cache/td{i}", body), WRITE_RATE)
        log("backlog: starting the worker; paced POSTs meanwhile")
        service.start_worker()
        started_at: list[float] = []

        def started() -> bool:
            if service.worker_consuming():
                if not started_at:
                    started_at.append(time.monotonic())
                    writes.start()
                return True
            return False

        state = asyncio.run(pipeline.wait_drained(stack.nats_url, n.stream, n.consumer, timeout=3600, started=started))
        ended = time.monotonic()
        time.sleep(quiet)  # the same writes for as long again with the backlog gone
        after_end = time.monotonic()
        if writes.is_alive():
            writes.stop()
        during = writes.window(started_at[0], ended) if started_at else {}
        after = writes.window(ended, after_end) if started_at else {}
        import psycopg

        with psycopg.connect(stack.database_url) as conn:
            rows = conn.execute("SELECT count(*) FROM cache_entries WHERE key LIKE 'b%'").fetchone()[0]
        seconds = state["seconds"]
        self.results["backlog"] = {
            "messages": count,
            "fill_seconds": round(fill_s, 1),
            "fill_rate": round(fill_rate, 1),
            "drain_seconds": seconds,
            "drain_rate": round(count / seconds, 1) if seconds else 0.0,
            "drained": state["drained"],
            "rows_in_postgresql": rows,
            "worker_peak_rss_mb": sampler.peaks.get("worker"),
            "worker_rss_target_mb": WORKER_RSS_TARGET_MB,
            "write_rate": WRITE_RATE,
            "post_before": before,
            "post_during": during,
            "post_after": after,
        }
        if not state["drained"]:
            self.results["backlog"]["state"] = state

    # --- 4. purge ---------------------------------------------------------------------------

    def curve_purge(self, service: Service, stack: Any, sampler: RssSampler) -> None:
        import psycopg

        total = self.size["purge_rows"]
        quiet = self.size["quiet"]
        expired = len(range(0, total, EXPIRED_EVERY))
        log(f"purge: COPY {total:,} rows ({expired:,} expired) under the prefix p")
        copy_s = copy_rows(stack.database_url, "p", 0, total, expired_every=EXPIRED_EVERY)
        flush_redis(stack.redis_url)
        hit_keys = [f"ph{i}" for i in range(1_000)]
        asyncio.run(_write_keys(service.url, hit_keys))
        live = [f"p{i}" for i in range(total) if i % EXPIRED_EVERY]
        random.shuffle(live)
        hits = Trickle(service.url, lambda i: ("GET", f"/v1/cache/{hit_keys[i % len(hit_keys)]}", None), READ_RATE)
        misses = Trickle(service.url, lambda i: ("GET", f"/v1/cache/{live[i % len(live)]}", None), READ_RATE)
        hits.start()
        misses.start()
        t_before = time.monotonic()
        time.sleep(quiet)
        t_purge = time.monotonic()
        log("purge: manage.py purge_expired --retention 0s (the workers' purge, run to the end)")
        done = subprocess.run(
            [sys.executable, "manage.py", "purge_expired", "--retention", "0s"], cwd=BASE_DIR, env=service.env,
            capture_output=True, text=True,
        )  # fmt: skip
        t_done = time.monotonic()
        said = re.search(r"purged (\d+) rows .* in ([\d.]+) s", done.stdout)
        if done.returncode != 0 or said is None:
            raise RuntimeError(f"purge_expired failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        deleted, command_s = int(said.group(1)), float(said.group(2))
        hits.stop()
        misses.stop()
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            left = conn.execute("SELECT count(*) FROM cache_entries WHERE expires_at < now()").fetchone()[0]
        seconds = command_s  # the purge itself, without the command's start (Django, ~1 s)
        self.results["purge"] = {
            "rows": total,
            "expired": expired,
            "copy_and_vacuum_s": round(copy_s, 1),
            "deleted": deleted,
            "expired_left": left,
            "batch": PURGE_BATCH,
            "command_wall_s": round(t_done - t_purge, 2),
            "seconds": round(seconds, 2),
            "rows_per_s": round(deleted / seconds, 1) if seconds else 0.0,
            "read_rate_each": READ_RATE,
            "get_hit_before": hits.window(t_before, t_purge),
            "get_hit_during": hits.window(t_purge, t_done),
            "get_miss_before": misses.window(t_before, t_purge),
            "get_miss_during": misses.window(t_purge, t_done),
            "sql": "persistence.write_behind.cache_entries_purge (manage.py purge_expired)",
        }
        if len(live) < misses.window(t_before, t_done)["requests"]:
            self.notes.append("purge: the GET-miss readers ran out of fresh keys (some of their reads were hits)")


async def _write_body(url: str, keys: list[str], body: bytes, connections: int = 8) -> None:
    """POST ``body`` to each key (bench.run's ``_write_keys`` with a value of our size)."""
    host, port = url.removeprefix("http://").split(":")
    todo: Iterator[str] = iter(keys)

    async def client() -> None:
        conn = httpload.HttpConnection(host, int(port), timeout=60)
        try:
            for key in todo:
                status, payload = await conn.request("POST", f"/v1/cache/{key}", body)
                if status not in (200, 201):
                    raise RuntimeError(f"POST {key}: {status} {payload[:300]!r}")
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(connections)))


# --- report -----------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f} x" if a and b else "—"


def verdicts(r: dict[str, Any]) -> dict[str, str]:
    """Whether each curve grows as expected, from the figures (the explanation is in the doc)."""
    out = {}
    rows = r.get("rows", [])
    if len(rows) >= 2:
        small, big = rows[0], rows[-1]
        growth = big["rows"] / small["rows"]
        miss = big["get_miss"].get("rps", 0) / max(small["get_miss"].get("rps", 0), 1e-9)
        buf = big["lookup"]["buffers_mean"] / max(small["lookup"]["buffers_mean"], 1e-9)
        rate = big["rehydrate"]["rate"] / max(small["rehydrate"]["rate"], 1e-9)
        out["rows"] = (
            f"{growth:,.0f} x the rows: GET miss throughput {miss:.2f} x (expected ~flat: a B-tree lookup is "
            f"log n), buffers per lookup {buf:.2f} x; rehydrate rate {rate:.2f} x (expected flat: linear time)"
        )
    values = r.get("values", [])
    if len(values) >= 2:
        small, big = values[0], values[-1]
        growth = big["bytes"] / small["bytes"]
        parts = []
        for kind in ("get_hit", "post"):
            a, b = small[kind], big[kind]
            if a.get("rps") and b.get("rps"):
                parts.append(f"{kind} {b['rps'] / a['rps']:.3f} x req/s, {b['mb_per_s']:,.0f} MB/s at the largest")
        out["values"] = (
            f"{growth:,.0f} x the bytes: " + "; ".join(parts) + " (expected: flat until bytes dominate, then linear)"
        )
    backlog = r.get("backlog")
    if backlog:
        rss = backlog.get("worker_peak_rss_mb")
        post = _ratio(backlog["post_during"].get("p99_ms"), backlog.get("post_after", {}).get("p99_ms"))
        out["backlog"] = (
            f"{backlog['messages']:,} messages drained in {backlog['drain_seconds']:.1f} s; worker peak RSS "
            f"{_fmt(rss, '.0f')} MB ({'met' if rss is not None and rss <= WORKER_RSS_TARGET_MB else 'missed'} "
            f"<= {WORKER_RSS_TARGET_MB:g}); POST p99 {post} during vs after"
        )
    purge = r.get("purge")
    if purge:
        out["purge"] = (
            f"{purge['deleted']:,} expired rows of {purge['rows']:,} deleted in {purge['seconds']:.1f} s; GET miss "
            f"p99 {_ratio(purge['get_miss_during']['p99_ms'], purge['get_miss_before']['p99_ms'])}, GET hit p99 "
            f"{_ratio(purge['get_hit_during']['p99_ms'], purge['get_hit_before']['p99_ms'])} during vs before"
        )
    return out


def markdown(data: dict[str, Any]) -> str:
    r, s, m = data["results"], data["settings"], data["machine"]
    lines = ["## Cost curves" + (" (SMOKE run: figures are not meaningful)" if data["smoke"] else ""), ""]
    lines.append(
        f"{data['timestamp']} · {m['cores']} cores, {m['cpu_model']}, {m['memory_gb']} GB · load tool "
        f"{s['load_tool']} on the same box, {s['connections']} connections, {s['duration_s']:g} s each · "
        f"API {s['api_workers']} x {s['api_threads']} threads, one worker (batch {s['worker_batch_size']}) · "
        f"{s['durability']}."
    )
    if r.get("rows"):
        lines += ["", "**Rows in cache_entries** (GET miss = read-through from PostgreSQL; rehydrate = "
                  "`manage.py rehydrate --all` into an empty Redis)", "",
                  "| rows | table | GET miss req/s | p50 | p99 | lookup: buffers, exec | rehydrate --all | "
                  "rows/s |", "|---:|---:|---:|---:|---:|---|---:|---:|"]  # fmt: skip
        for p in r["rows"]:
            g, h, lk = p["get_miss"], p["rehydrate"], p["lookup"]
            lines.append(
                f"| {p['rows']:,} | {p['table_mb']:,.0f} MB | {_fmt(g.get('rps'))} | "
                f"{_fmt(g.get('p50_ms'), '.2f')} ms | {_fmt(g.get('p99_ms'), '.2f')} ms | "
                f"{lk['buffers_mean']:.1f}, {lk['exec_ms_mean'] * 1000:.0f} µs | "
                f"{h['seconds']:.1f} s | {h['rate']:,.0f} |"
            )
    if r.get("values"):
        lines += ["", "**Value size** (GET hit over keys held in Redis; POST = durable write, 2xx after the PubAck)",
                  "", "| value | GET hit req/s | p99 | MB/s | POST req/s | p99 | MB/s | worker drain after POST |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for p in r["values"]:
            g, w = p["get_hit"], p["post"]
            lines.append(
                f"| {_bytes(p['bytes'])} | {_fmt(g.get('rps'))} | {_fmt(g.get('p99_ms'), '.1f')} ms | "
                f"{g['mb_per_s']:,.1f} | {_fmt(w.get('rps'))} | {_fmt(w.get('p99_ms'), '.1f')} ms | "
                f"{w['mb_per_s']:,.1f} | {p['drain_after_post_s']:.1f} s |"
                + (" **non-2xx**" if g.get("non_2xx") or w.get("non_2xx") else "")
            )
    b = r.get("backlog")
    if b:
        pb, pd, pa = b["post_before"], b.get("post_during", {}), b.get("post_after", {})
        lines += ["", f"**Backlog drain** ({b['messages']:,} persist messages published while the worker was "
                  f"stopped, in {b['fill_seconds']:.0f} s at {b['fill_rate']:,.0f}/s)", "",
                  "| drain | msgs/s | worker peak RSS | POST p50 / p99 before | during | after |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {b['drain_seconds']:.1f} s{'' if b['drained'] else ' **not drained**'} | "
                  f"{b['drain_rate']:,.0f} | {_fmt(b['worker_peak_rss_mb'], '.0f')} MB (target <= "
                  f"{b['worker_rss_target_mb']:g}) | {pb['p50_ms']:.1f} / {pb['p99_ms']:.1f} ms | "
                  f"{_fmt(pd.get('p50_ms'), '.1f')} / {_fmt(pd.get('p99_ms'), '.1f')} ms | "
                  f"{_fmt(pa.get('p50_ms'), '.1f')} / {_fmt(pa.get('p99_ms'), '.1f')} ms |"]  # fmt: skip
        lines.append(f"\nPaced POSTs at {b['write_rate']}/s: {pb['requests']:,} before, {pd.get('requests', 0):,} "
                     f"during, {pa.get('requests', 0):,} after; {b['rows_in_postgresql']:,} backlog rows in "
                     "PostgreSQL after.")  # fmt: skip
    p = r.get("purge")
    if p:
        lines += ["", f"**Purge of expired rows** ({p['expired']:,} of {p['rows']:,} rows expired; manage.py "
                  f"purge_expired: the workers' purge, {PURGE_BATCH:,} rows a transaction)", "",
                  "| purge | rows/s | GET hit p50 / p99 before | during | GET miss p50 / p99 before | during |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

        def pair(w: dict[str, Any]) -> str:
            return f"{w['p50_ms']:.1f} / {w['p99_ms']:.1f} ms ({w['requests']:,})"

        lines.append(
            f"| {p['seconds']:.1f} s | {p['rows_per_s']:,.0f} | {pair(p['get_hit_before'])} | "
            f"{pair(p['get_hit_during'])} | {pair(p['get_miss_before'])} | {pair(p['get_miss_during'])} |"
        )
    v = verdicts(r)
    if v:
        lines += ["", "Growth:"] + [f"- {name}: {text}" for name, text in v.items()]
    for note in data["notes"]:
        lines += ["", f"Note: {note}"]
    per = ", ".join(f"{k} {v:.0f} s" for k, v in data["seconds_per_curve"].items())
    lines += ["", f"Whole run: {data['seconds']:.0f} s ({per}). Command: `{data['command']}`"]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, size in (("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n // size} {unit}"
    return f"{n} B"


def plot(data: dict[str, Any], path: Path) -> None:
    """Four panels, one per curve, log-scale axes where the x axis spans decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = data["results"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    title = "Birb Nest cost curves" + (" (smoke run)" if data["smoke"] else "") + f" — {data['timestamp']}"
    fig.suptitle(title)

    ax = axes[0][0]
    rows = r.get("rows", [])
    if rows:
        xs = [p["rows"] for p in rows]
        ax.plot(xs, [p["get_miss"].get("rps", 0) for p in rows], "o-", label="GET miss req/s")
        ax.plot(xs, [p["rehydrate"]["rate"] for p in rows], "s-", label="rehydrate --all rows/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows in cache_entries")
        ax.set_ylabel("per second")
        twin = ax.twinx()
        twin.plot(xs, [p["lookup"]["buffers_mean"] for p in rows], "^--", color="grey", label="buffers per lookup")
        twin.set_ylabel("PostgreSQL buffers per lookup")
        twin.set_ylim(bottom=0)
        ax.legend(loc="lower left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
    ax.set_title("1. table size")

    ax = axes[0][1]
    values = r.get("values", [])
    if values:
        xs = [p["bytes"] for p in values]
        for kind, mark in (("get_hit", "o-"), ("post", "s-")):
            ax.plot(xs, [p[kind].get("rps", 0) for p in values], mark, label=f"{kind} req/s")
            ax.plot(xs, [p[kind]["mb_per_s"] for p in values], mark.replace("-", ":"), label=f"{kind} MB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("value size, bytes")
        ax.legend(fontsize=8)
    ax.set_title("2. value size")

    ax = axes[1][0]
    b = r.get("backlog")
    if b:
        labels, vals = [], []
        for when in ("before", "during", "after"):
            window = b.get(f"post_{when}") or {}
            labels += [f"p50 {when}", f"p99 {when}"]
            vals += [window.get("p50_ms", 0), window.get("p99_ms", 0)]
        ax.bar(labels, vals, color=["tab:blue"] * 2 + ["tab:orange"] * 2 + ["tab:green"] * 2)
        ax.set_yscale("log")
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylabel(f"POST latency at {b['write_rate']}/s, ms")
        ax.set_title(
            f"3. drain of {b['messages']:,} messages: {b['drain_seconds']:.0f} s, "
            f"worker peak {_fmt(b['worker_peak_rss_mb'], '.0f')} MB"
        )
    else:
        ax.set_title("3. backlog drain")

    ax = axes[1][1]
    p = r.get("purge")
    if p:
        labels = ["hit before", "hit during", "miss before", "miss during"]
        vals = [p["get_hit_before"]["p99_ms"], p["get_hit_during"]["p99_ms"], p["get_miss_before"]["p99_ms"],
                p["get_miss_during"]["p99_ms"]]  # fmt: skip
        ax.bar(labels, vals, color=["tab:blue", "tab:orange", "tab:blue", "tab:orange"])
        ax.set_ylabel("GET p99, ms")
        ax.set_title(f"4. purge of {p['deleted']:,} expired of {p['rows']:,} rows: {p['seconds']:.1f} s")
    else:
        ax.set_title("4. purge of expired rows")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _int_list(text: str) -> list[int]:
    return [int(float(part)) for part in text.replace("_", "").split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.curves", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=_int_list, help="row counts of the table-size curve (default 10000,1000000)")
    parser.add_argument("--large", action="store_true", help="add 10,000,000 rows (make bench-large; not in CI)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, about a second each (what the test runs)")
    parser.add_argument("--only", action="append", choices=CURVES, default=[], help="run only this curve (repeatable)")
    parser.add_argument("--backlog", type=int, help="messages in the drain backlog (default 1,000,000; smoke 2,000)")
    parser.add_argument("--install-tools", action="store_true", help="apt-get install wrk when missing (root only)")
    parser.add_argument("--out", default=str(BASE_DIR / "var" / "bench"), help="where the JSON goes (var/bench)")
    parser.add_argument(
        "--plot", help="the image (docs/bench/cost-curves.png; with --smoke, var/bench/cost-curves-smoke.png)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' data and logs")
    args = parser.parse_args(argv)
    if args.plot is None:  # a smoke run never replaces the measured image
        args.plot = str(BASE_DIR / ("var/bench/cost-curves-smoke.png" if args.smoke else "docs/bench/cost-curves.png"))
    args.command_line = " ".join(["python -m bench.curves", *(argv if argv is not None else sys.argv[1:])])
    if args.rows is None:
        args.rows = [1_000, 10_000] if args.smoke else list(DEFAULT_ROWS)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        data = Curves(args).run()
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    data["verdicts"] = verdicts(data["results"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"curves-{stamp}{'-smoke' if args.smoke else ''}.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(data, Path(args.plot))
    print(markdown(data), flush=True)
    log(f"figures written to {out}, plot to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
