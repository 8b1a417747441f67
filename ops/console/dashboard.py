"""The live dashboard: a sampler of the service's vital signs, its websocket, and its page.

One :class:`Sampler` per dashboard process (``manage.py rundashboard``, ASGI) builds a snapshot
every second and keeps the last five minutes; :data:`hub` runs it as one asyncio task, started by
the first websocket, and hands each snapshot to every connected :class:`DashboardConsumer`. The
page itself (:func:`dashboard_page`) is an ordinary admin view on the WSGI API.

Every external call runs in a daemon thread and is awaited for at most ``PROBE_TIMEOUT``: a
server that is down or hung shows as unhealthy within a sample, and the other figures still
update. A call that is still running is not started again, so a hung server costs one thread.

Request rates, hit rate and latency come from the API processes' prometheus_client
multiprocess files (the dashboard is another process, so it reads them from the API's
directory), as differences between two samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from ops import health
from persistence import jetstream, streams_admin

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL = 1.0  # seconds between snapshots
HISTORY_SECONDS = 300  # what a newly connected page gets, and what its charts span
PROBE_TIMEOUT = 1.0  # the longest one sample waits for any external call
WORKER_STALE_AFTER = 5.0  # seconds without a liveness touch before the worker shows as down
PERMISSION = "ops.view_dashboard"
WEBSOCKET_PATH = "ws/dashboard/"


def dashboard_port() -> int:
    """DASHBOARD_PORT, or API_PORT + 1 when it is 0."""
    config = settings.BIRB
    return config.dashboard_port or config.api_port + 1


def api_metrics_dir(*, port: int | None = None) -> Path:
    """Where the API's processes keep their metrics: what `manage.py runapi` uses."""
    config = settings.BIRB
    exported = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if exported and port is None:
        return Path(exported)
    return config.data_dir / "metrics" / f"api-{port or config.api_port}"


# --- probes: one blocking call at a time, in a daemon thread, awaited with a deadline ----------


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".rstrip(": ")


@dataclass
class _Probe:
    """A blocking call awaited for at most ``timeout``; (ok, value or error message).

    Daemon threads rather than an executor: a call stuck on a hung server must neither block
    the next sample nor keep the process from exiting on SIGTERM.
    """

    name: str
    call: Callable[[], Any]
    timeout: float = PROBE_TIMEOUT
    busy_since: float | None = None
    last_error: str | None = None

    async def __call__(self) -> tuple[bool, Any]:
        if self.busy_since is not None:
            ok, value = False, f"no answer for {time.monotonic() - self.busy_since:.0f} s (previous call still running)"
        else:
            ok, value = await self._run()
        self._log_transition(ok, value)
        return ok, value

    async def _run(self) -> tuple[bool, Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()

        def resolve(result: tuple[bool, Any]) -> None:
            if not future.done():
                future.set_result(result)

        def target() -> None:
            try:
                result: tuple[bool, Any] = (True, self.call())
            except Exception as error:
                result = (False, _describe(error))
            finally:
                self.busy_since = None
            with contextlib.suppress(RuntimeError):  # the loop is gone (test ended, server stopping)
                loop.call_soon_threadsafe(resolve, result)

        self.busy_since = time.monotonic()
        threading.Thread(target=target, name=f"dashboard-{self.name}", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            return False, f"no answer within {self.timeout:g} s"

    def _log_transition(self, ok: bool, value: Any) -> None:
        error = None if ok else str(value)
        if ok and isinstance(value, dict) and value.get("status") == "unhealthy":  # a health check's verdict
            error = str(value.get("error") or "unhealthy")
        if error and not self.last_error:
            logger.warning("dashboard: %s failing: %s", self.name, error)
        elif self.last_error and not error:
            logger.info("dashboard: %s recovered", self.name)
        self.last_error = error


def _database_check() -> tuple[bool, str]:
    try:
        return health.check_database()
    finally:
        # This thread will not run a request cycle: give the connection back to the pool now.
        connection.close()


def _api_check(port: int) -> tuple[bool, str]:
    """Is an API process listening? A TCP connect, so the probe adds nothing to the API's metrics."""
    config = settings.BIRB
    host = "127.0.0.1" if config.api_host in ("", "0.0.0.0") else config.api_host
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT / 2):
            return True, ""
    except OSError as error:
        return False, f"nothing listening on {host}:{port} ({error.strerror or error})"


def _worker_check() -> tuple[bool, str]:
    """Has a worker touched its liveness file lately? (Every worker touches it on every loop.)"""
    config = settings.BIRB
    path = Path(config.worker_liveness_file or config.data_dir / "worker.alive")
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False, f"no worker has run here ({path} missing)"
    stale_after = max(WORKER_STALE_AFTER, 3 * config.worker_batch_timeout)
    if age > stale_after:
        return False, f"no worker alive: {path} last touched {age:.0f} s ago"
    return True, ""


def health_checks(*, api_port: int) -> dict[str, Callable[[], tuple[bool, str]]]:
    """Each server's check: ops.health's own for the three servers (its wording), one probe
    each, so that one hung server does not hold up the others."""
    return {
        "api": functools.partial(_api_check, api_port),
        "worker": _worker_check,
        "database": _database_check,
        "redis": health.check_redis,
        "nats": health.check_nats,
    }


HEALTH_NAMES = ("api", "worker", "database", "redis", "nats")


# --- metrics: cumulative totals from the API's files, differences between samples -------------


@dataclass(frozen=True)
class MetricTotals:
    """Cumulative counters summed over every API process, read at ``at`` (monotonic)."""

    at: float
    requests: float
    errors: float
    hits: float
    misses: float
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count


def read_metric_totals(metrics_dir: Path) -> MetricTotals:
    from prometheus_client.multiprocess import MultiProcessCollector

    if not metrics_dir.is_dir():
        raise FileNotFoundError(f"no API metrics in {metrics_dir}: is the API running (manage.py runapi)?")
    requests = errors = hits = misses = 0.0
    buckets: dict[float, float] = {}
    for family in MultiProcessCollector(None, path=str(metrics_dir)).collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "http_requests_total":
                requests += value
                if labels.get("status", "").startswith("5"):
                    errors += value
            elif name == "cache_hits_total":
                hits += value
            elif name == "cache_misses_total":
                misses += value
            elif name == "http_request_duration_seconds_bucket":
                bound = float(labels["le"])  # "+Inf" -> inf
                buckets[bound] = buckets.get(bound, 0.0) + value
    return MetricTotals(time.monotonic(), requests, errors, hits, misses, buckets)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``buckets``; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # beyond the last finite bucket: that bound is all we know
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def interval_rates(previous: MetricTotals, current: MetricTotals) -> dict[str, float | None]:
    """Requests/s, hit rate, error rate and p99 between two readings (None where undefined)."""
    elapsed = current.at - previous.at
    requests = current.requests - previous.requests
    if elapsed <= 0 or requests < 0 or current.hits < previous.hits:
        # The API restarted (runapi wipes its metrics): no honest figure for this interval.
        return {"requests_per_second": None, "hit_rate": None, "error_rate": None, "p99_ms": None}
    reads = (current.hits - previous.hits) + (current.misses - previous.misses)
    deltas = {bound: count - previous.buckets.get(bound, 0.0) for bound, count in current.buckets.items()}
    p99 = histogram_quantile(0.99, deltas)
    return {
        "requests_per_second": round(requests / elapsed, 2),
        "hit_rate": round((current.hits - previous.hits) / reads, 4) if reads > 0 else None,
        "error_rate": round((current.errors - previous.errors) / requests, 4) if requests > 0 else None,
        "p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
    }


# --- JetStream: backlog, consumer, persist lag, dead letters ----------------------------------


def read_jetstream() -> dict[str, Any]:
    """Stream depth, consumer counts, persist lag and DLQ depth (raises if NATS cannot answer)."""
    n = jetstream.names()
    stream = streams_admin.stream_info(name=n.stream).state
    figures: dict[str, Any] = {"stream_messages": stream.messages}
    try:
        figures["dlq_depth"] = streams_admin.stream_info(name=n.dlq_stream).state.messages
    except streams_admin.StreamNotFoundError:
        figures["dlq_depth"] = 0  # the API creates it with the stream; no dead letters before that
    try:
        consumer = streams_admin.consumer_info(stream=n.stream, consumer=n.consumer)
    except streams_admin.ConsumerNotFoundError:
        # No worker has ever started: every stored message is waiting to be persisted.
        consumer = None
    if consumer is None:
        pending, ack_pending, redelivered, floor = stream.messages, 0, 0, stream.first_seq - 1
    else:
        pending, ack_pending = consumer.num_pending, consumer.num_ack_pending
        redelivered, floor = consumer.num_redelivered, consumer.ack_floor_stream_seq
    figures["consumer"] = {"pending": pending, "ack_pending": ack_pending, "redelivered": redelivered}
    figures["stream_depth"] = pending + ack_pending
    figures["persist_lag_seconds"] = 0.0
    if pending + ack_pending > 0:
        # The oldest message not yet acknowledged is the first one after the ack floor.
        oldest = streams_admin.stream_view(name=n.stream, start_seq=max(floor + 1, 1), limit=1).messages
        if oldest and oldest[0].time is not None:
            figures["persist_lag_seconds"] = round(max(0.0, time.time() - oldest[0].time.timestamp()), 3)
    return figures


# --- the sampler --------------------------------------------------------------------------------

JETSTREAM_FIELDS = ("stream_depth", "stream_messages", "consumer", "persist_lag_seconds", "dlq_depth")
RATE_FIELDS = ("requests_per_second", "hit_rate", "error_rate", "p99_ms")


class Sampler:
    """Builds one snapshot per call of :meth:`sample` and keeps the last ``history_seconds``.

    A snapshot (JSON-ready)::

        {"time": <epoch seconds>, "health": {name: {"status": "healthy"|"unhealthy", "error"?}},
         "requests_per_second", "hit_rate", "error_rate", "p99_ms",        # over the last interval
         "stream_depth", "stream_messages", "consumer": {"pending", "ack_pending", "redelivered"},
         "persist_lag_seconds", "dlq_depth", "errors": {source: message}}

    A figure that could not be read is None, and ``errors`` says why.
    """

    def __init__(
        self,
        *,
        api_port: int | None = None,
        metrics_dir: Path | None = None,
        interval: float = SAMPLE_INTERVAL,
        history_seconds: float = HISTORY_SECONDS,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.api_port = api_port or settings.BIRB.api_port
        self.metrics_dir = metrics_dir or api_metrics_dir(port=api_port)
        self.interval = interval
        self.history: deque[dict[str, Any]] = deque(maxlen=max(1, int(history_seconds / interval)))
        self._previous_totals: MetricTotals | None = None
        self._health = {
            name: _Probe(name, functools.partial(health.timed, check), probe_timeout)
            for name, check in health_checks(api_port=self.api_port).items()
        }
        self._metrics = _Probe("metrics", lambda: read_metric_totals(self.metrics_dir), probe_timeout)
        self._jetstream = _Probe("jetstream", read_jetstream, probe_timeout)

    async def sample(self) -> dict[str, Any]:
        names = list(self._health)
        *health_results, metrics_result, jetstream_result = await asyncio.gather(
            *(self._health[name]() for name in names), self._metrics(), self._jetstream()
        )
        snapshot: dict[str, Any] = {"time": round(time.time(), 3), "health": {}, "errors": {}}
        for name, (ok, value) in zip(names, health_results, strict=True):
            snapshot["health"][name] = value if ok else {"status": "unhealthy", "error": value}

        ok, value = metrics_result
        snapshot.update(dict.fromkeys(RATE_FIELDS))
        if ok:
            if self._previous_totals is not None:
                snapshot.update(interval_rates(self._previous_totals, value))
            self._previous_totals = value
        else:
            snapshot["errors"]["metrics"] = value
            self._previous_totals = None

        ok, value = jetstream_result
        if ok:
            snapshot.update(value)
        else:
            snapshot.update(dict.fromkeys(JETSTREAM_FIELDS))
            snapshot["consumer"] = {"pending": None, "ack_pending": None, "redelivered": None}
            snapshot["errors"]["jetstream"] = value

        self.history.append(snapshot)
        return snapshot


# --- one sampler per process, broadcast to every connected page ---------------------------------


class Hub:
    """Runs the process's :class:`Sampler` on the event loop of the first subscriber and hands
    each snapshot to every subscriber's queue (a slow page drops its oldest snapshots)."""

    QUEUE_SIZE = 10

    def __init__(self, make_sampler: Callable[[], Sampler] = Sampler) -> None:
        self._make_sampler = make_sampler
        self.sampler: Sampler | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> tuple[list[dict[str, Any]], asyncio.Queue[dict[str, Any]]]:
        """The history so far, and a queue that receives every new snapshot."""
        sampler = self._ensure_running()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=self.QUEUE_SIZE)
        self._subscribers.add(queue)
        return list(sampler.history), queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    def stop(self) -> None:
        task, loop = self._task, self._loop
        self._task = self._loop = None
        self._subscribers.clear()
        if task is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    def _ensure_running(self) -> Sampler:
        if self.sampler is None:
            self.sampler = self._make_sampler()
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            # A new loop (a test's, or after the old one closed): subscribers of the old one are gone.
            self._subscribers.clear()
            self._loop, self._task = loop, loop.create_task(self._run(self.sampler), name="dashboard-sampler")
        return self.sampler

    async def _run(self, sampler: Sampler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                self._broadcast(await sampler.sample())
            except Exception:
                logger.exception("dashboard: sample failed")
            await asyncio.sleep(max(0.0, sampler.interval - (loop.time() - started)))

    def _broadcast(self, snapshot: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(snapshot)


hub = Hub()


# --- the websocket ------------------------------------------------------------------------------


def may_view_dashboard(user: Any) -> bool:
    return bool(user and user.is_authenticated and user.is_active and user.is_staff and user.has_perm(PERMISSION))


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    """``ws/dashboard/``: the history on connect, then every snapshot. Staff with
    ``ops.view_dashboard`` only (the session cookie of the admin login identifies them)."""

    queue: asyncio.Queue[dict[str, Any]] | None = None
    forwarder: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        allowed: Callable[[Any], Awaitable[bool]] = database_sync_to_async(may_view_dashboard)
        if not await allowed(self.scope.get("user")):
            await self.close()  # before accept: the handshake is refused with 403
            return
        await self.accept()
        history, self.queue = hub.subscribe()
        await self.send_json({"type": "history", "interval": SAMPLE_INTERVAL, "snapshots": history})
        self.forwarder = asyncio.create_task(self._forward(self.queue))

    async def disconnect(self, code: int) -> None:
        if self.queue is not None:
            hub.unsubscribe(self.queue)
        if self.forwarder is not None:
            self.forwarder.cancel()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The page sends nothing that matters; ignore it."""

    async def _forward(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            snapshot = await queue.get()
            await self.send_json({"type": "snapshot", "snapshot": snapshot})


# --- the page (served by the WSGI API) ----------------------------------------------------------

_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]*\]|[^:]+)(?::\d+)?$")


def websocket_url(request: HttpRequest) -> str:
    """The dashboard server on the host the browser used for this page, at DASHBOARD_PORT."""
    match = _HOST_PORT.match(request.get_host())
    host = match.group("host") if match else "127.0.0.1"
    scheme = "wss" if request.is_secure() else "ws"
    return f"{scheme}://{host}:{dashboard_port()}/{WEBSOCKET_PATH}"


def dashboard_page(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied
    context = {
        **admin.site.each_context(request),
        "title": "Live dashboard",
        "dashboard_config": {
            "websocket_url": websocket_url(request),
            "interval": SAMPLE_INTERVAL,
            "history_seconds": HISTORY_SECONDS,
            "health_names": list(HEALTH_NAMES),
        },
    }
    return TemplateResponse(request, "admin/dashboard.html", context)
