"""JetStream side of the benchmark: filling a backlog, the bare nats-py fetch+ack and publish
references, watching the worker's consumer drain, and the persist-lag poller on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats
from nats.js import api

REF_CONSUMER = "bench-ref"  # the reference's durable consumer, on the worker's stream


def servers(nats_url: str) -> list[str]:
    """NATS_URL's servers (one, or a cluster's comma-separated list): nats-py wants a list."""
    return [url.strip() for url in nats_url.split(",") if url.strip()]


def persist_messages(key_prefix: str, count: int, value_json: str) -> list[tuple[bytes, dict[str, str]]]:
    """``count`` persist messages, as the API publishes them: ``set`` of key ``<prefix><i>`` v1."""
    from persistence.messages import PersistWrite, encode, message_id

    now = datetime.now(UTC)
    out = []
    for i in range(count):
        write = PersistWrite("set", f"{key_prefix}{i}", 1, value_json, "{}", None, now, now)
        out.append((encode(write), {"Nats-Msg-Id": message_id(write)}))
    return out


async def publish_all(nats_url: str, subject: str, messages: list[tuple[bytes, dict[str, str]]]) -> float:
    """Publish concurrently (publish_async, PubAck awaited for every message); msgs/s."""
    nc = await nats.connect(servers=servers(nats_url), name="birb-bench-fill")
    js = nc.jetstream()
    began = time.perf_counter()
    failed = 0
    try:
        for start in range(0, len(messages), 2000):
            futures = [
                await js.publish_async(subject, payload, headers=dict(headers))
                for payload, headers in messages[start : start + 2000]
            ]
            for outcome in await asyncio.gather(*futures, return_exceptions=True):
                failed += isinstance(outcome, BaseException)
    finally:
        await nc.close()
    if failed:
        raise RuntimeError(f"{failed} of {len(messages)} publishes to {subject} were not acknowledged")
    return len(messages) / (time.perf_counter() - began)


async def publish_in_flight(
    nats_url: str, seconds: float, in_flight: int, payload: bytes, *, replicas: int = 1
) -> dict[str, Any]:
    """The floor of a durable write: ``in_flight`` publishers, each awaiting its PubAck before
    the next publish, on a stream of its own with the worker stream's storage and ``replicas``
    (R3 on a cluster: the PubAck follows a quorum's store), for ``seconds``."""
    nc = await nats.connect(servers=servers(nats_url), name="birb-bench-publish")
    js = nc.jetstream()
    stream = "BIRB_BENCH_PUBLISH"
    await js.add_stream(
        api.StreamConfig(
            name=stream, subjects=["birbbench.publish.>"], storage=api.StorageType.FILE, num_replicas=replicas
        )
    )
    latencies: list[float] = []
    failed = 0
    deadline = time.perf_counter() + seconds

    async def publisher(i: int) -> None:
        nonlocal failed
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                await js.publish(f"birbbench.publish.{i}", payload, timeout=5)
            except Exception:
                failed += 1
                continue
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(publisher(i) for i in range(in_flight)))
        elapsed = time.perf_counter() - began
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        await nc.close()
    latencies.sort()
    return {
        "rate": round(len(latencies) / elapsed, 1),
        "in_flight": in_flight,
        "seconds": round(elapsed, 2),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
        "failed": failed,
    }


async def last_seq(nats_url: str, stream: str) -> int:
    nc = await nats.connect(servers=servers(nats_url), name="birb-bench-ref")
    try:
        return int((await nc.jetstream().stream_info(stream)).state.last_seq)
    finally:
        await nc.close()


async def create_reference_consumer(nats_url: str, stream: str, subjects: str, first_seq: int) -> None:
    """A second durable pull consumer on the worker's stream, reading the same backlog (from
    ``first_seq``) with the worker consumer's ack settings; the worker's consumer is untouched."""
    nc = await nats.connect(servers=servers(nats_url), name="birb-bench-ref")
    try:
        await nc.jetstream().add_consumer(
            stream,
            api.ConsumerConfig(
                durable_name=REF_CONSUMER,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=first_seq,
                ack_wait=10.0,
                max_ack_pending=20000,
                filter_subject=subjects,
            ),
        )
    finally:
        await nc.close()


async def delete_reference_consumer(nats_url: str, stream: str) -> None:
    nc = await nats.connect(servers=servers(nats_url), name="birb-bench-ref")
    try:
        await nc.jetstream().delete_consumer(stream, REF_CONSUMER)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


async def bare_fetch_ack(
    nats_url: str, stream: str, count: int, batch: int = 500, timeout: float = 120.0
) -> dict[str, Any]:
    """The reference: a bare nats-py pull consumer, ``fetch(batch)`` then ``ack()`` each, until
    ``count`` messages are acknowledged and the server has no ack pending."""
    nc = await nats.connect(servers=servers(nats_url), name="birb-bench-ref")
    js = nc.jetstream()
    try:
        psub = await js.pull_subscribe_bind(durable=REF_CONSUMER, stream=stream)
        began = time.perf_counter()
        deadline = began + timeout
        got = 0
        while got < count and time.perf_counter() < deadline:
            try:
                msgs = await psub.fetch(batch, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        await nc.flush()
        while time.perf_counter() < deadline:
            info = await js.consumer_info(stream, REF_CONSUMER)
            if not info.num_pending and not info.num_ack_pending:
                break
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - began
    finally:
        await nc.close()
    return {"messages": got, "seconds": round(seconds, 3), "rate": round(got / seconds, 1), "batch": batch}


async def consumer_state(nats_url: str, stream: str, consumer: str) -> dict[str, int]:
    nc = await nats.connect(servers=servers(nats_url), name="birb-bench-watch")
    try:
        info = await nc.jetstream().consumer_info(stream, consumer)
        return {"pending": int(info.num_pending or 0), "ack_pending": int(info.num_ack_pending or 0)}
    finally:
        await nc.close()


async def wait_drained(
    nats_url: str, stream: str, consumer: str, *, timeout: float, started: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Poll the consumer every 20 ms until nothing is pending or awaiting an ack.

    With ``started``, the clock starts when ``started()`` first returns true (the worker said
    it is consuming), so process start-up is not counted as drain time.
    """
    nc = await nats.connect(servers=servers(nats_url), name="birb-bench-watch")
    js = nc.jetstream()
    began = time.perf_counter()
    deadline = began + timeout
    clock: float | None = None if started else began
    try:
        while True:
            now = time.perf_counter()
            if clock is None and started is not None and started():
                clock = now
            info = await js.consumer_info(stream, consumer)
            pending, ack_pending = int(info.num_pending or 0), int(info.num_ack_pending or 0)
            if clock is not None and pending == 0 and ack_pending == 0:
                return {"drained": True, "seconds": round(time.perf_counter() - clock, 3)}
            if now > deadline:
                return {"drained": False, "seconds": round(now - (clock or began), 3), "pending": pending,
                        "ack_pending": ack_pending}  # fmt: skip
            await asyncio.sleep(0.02)
    finally:
        await nc.close()


class LagPoller(threading.Thread):
    """Polls PostgreSQL every ``interval`` for keys acknowledged by the API and not yet seen there.

    A row in a query's result was committed before the query's snapshot, so the time recorded
    for it is the moment just before the query was sent.
    """

    def __init__(self, database_url: str, interval: float = 0.02) -> None:
        super().__init__(name="lag-poller", daemon=True)
        self.database_url = database_url
        self.interval = interval
        self.lock = threading.Lock()
        self.acked: dict[str, tuple[int, float]] = {}  # key -> (version, monotonic time of the 2xx)
        self.seen: dict[str, float] = {}
        self.stopping = threading.Event()
        self.error: Exception | None = None

    def ack(self, key: str, version: int, at: float) -> None:
        with self.lock:
            self.acked[key] = (version, at)

    def outstanding(self) -> int:
        with self.lock:
            return len(self.acked) - len(self.seen)

    def run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                while not self.stopping.is_set():
                    with self.lock:
                        pending = {k: v for k, (v, _) in self.acked.items() if k not in self.seen}
                    if pending:
                        before = time.monotonic()
                        rows = conn.execute(
                            "SELECT key, version FROM cache_entries WHERE key = ANY(%s)", (list(pending),)
                        ).fetchall()
                        with self.lock:
                            for key, version in rows:
                                if version >= pending[key]:
                                    self.seen[key] = before
                    time.sleep(self.interval)
        except Exception as error:  # reported with the figures
            self.error = error

    def lags_ms(self) -> list[float]:
        with self.lock:
            return [(self.seen[k] - at) * 1000 for k, (_, at) in self.acked.items() if k in self.seen]
