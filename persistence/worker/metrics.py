"""The worker's own Prometheus metrics, served on ``WORKER_METRICS_PORT`` (off when 0).

Each worker process has its own registry and its own port (Prometheus scrapes every copy and
sums): the worker does not share the API's multiprocess directory, which may be on another host.
What the alert rules in ``deploy/prometheus/`` read:

- ``birb_worker_messages_total{outcome}``: messages taken off the stream, by what became of
  them (``persisted`` = acknowledged after commit, ``dead_lettered``).
- ``birb_worker_batches_total`` and ``birb_worker_batch_duration_seconds``: batches written.
- ``birb_worker_rows_purged_total``: rows deleted because they expired or were deleted longer
  than ``TOMBSTONE_RETENTION`` ago (every ``WORKER_EXPIRED_PURGE_INTERVAL``).
- ``birb_worker_persist_lag_seconds``: per batch, the age of its oldest message at commit
  (time stored in JetStream -> committed in PostgreSQL).
- ``birb_worker_backlog_messages``: messages waiting in the stream for this consumer, as the
  last fetched message reported (0 after a fetch that found nothing).
- ``birb_worker_last_fetch_timestamp_seconds`` / ``birb_worker_last_commit_timestamp_seconds``:
  the loop's heartbeat and its last commit (a stuck worker stops moving the first).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

logger = logging.getLogger("persistence.worker")

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes & co. (the dashboard's RSS panel)
MESSAGES = Counter("birb_worker_messages", "Messages taken off the stream, by outcome", ["outcome"], registry=REGISTRY)
BATCHES = Counter("birb_worker_batches", "Batches written to PostgreSQL", registry=REGISTRY)
ROWS_PURGED = Counter(
    "birb_worker_rows_purged",
    "Rows deleted as expired or deleted longer than TOMBSTONE_RETENTION ago",
    registry=REGISTRY,
)
BATCH_DURATION = Histogram(
    "birb_worker_batch_duration_seconds",
    "Time to write and acknowledge one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
PERSIST_LAG = Histogram(
    "birb_worker_persist_lag_seconds",
    "Age of a batch's oldest message when its batch committed (stored in JetStream -> in PostgreSQL)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
    registry=REGISTRY,
)
BACKLOG = Gauge("birb_worker_backlog_messages", "Messages waiting in the stream for this consumer", registry=REGISTRY)
LAST_FETCH = Gauge(
    "birb_worker_last_fetch_timestamp_seconds", "When the loop last fetched (or found nothing)", registry=REGISTRY
)
LAST_COMMIT = Gauge(
    "birb_worker_last_commit_timestamp_seconds", "When a batch last committed to PostgreSQL", registry=REGISTRY
)
for _outcome in ("persisted", "dead_lettered"):  # both series exist from the start (rate() needs them)
    MESSAGES.labels(_outcome)


def _metadata(msg: Any) -> Any:
    try:
        return msg.metadata
    except Exception:  # not a JetStream message (a unit test's fake): no figures from it
        return None


def fetched(batch: Sequence[tuple[Any, Any]]) -> None:
    """After each fetch of (message, decoded) pairs: the heartbeat, and the backlog the last reported."""
    LAST_FETCH.set_to_current_time()
    if not batch:
        BACKLOG.set(0)
        return
    pending = getattr(_metadata(batch[-1][0]), "num_pending", None)
    if isinstance(pending, int):
        BACKLOG.set(pending)


def batch_committed(batch: Sequence[tuple[Any, Any]], *, persisted: int, started: float) -> None:
    """After a batch's acknowledgements: counts, duration and the oldest message's lag."""
    now = time.time()
    BATCHES.inc()
    MESSAGES.labels("persisted").inc(persisted)
    BATCH_DURATION.observe(time.perf_counter() - started)
    LAST_COMMIT.set(now)
    stored = getattr(_metadata(batch[0][0]), "timestamp", None) if batch else None
    if isinstance(stored, datetime):
        PERSIST_LAG.observe(max(0.0, now - stored.astimezone(UTC).timestamp()))


def dead_lettered() -> None:
    MESSAGES.labels("dead_lettered").inc()


def serve(*, host: str, port: int) -> None:
    """Serve ``/metrics`` on a daemon thread (prometheus_client's own server)."""
    start_http_server(port, addr=host, registry=REGISTRY)
    logger.info("worker metrics on http://%s:%d/metrics", host, port)
