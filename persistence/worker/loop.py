"""The worker loop: fetch a batch, keep the highest version per key, write it in one statement,
acknowledge after commit.

Failure policy:
- PostgreSQL unreachable / timeout / serialization failure (transient): keep the batch, tell
  JetStream we are still working on it, retry with backoff; never acknowledge, never drop.
- A message that cannot be decoded, or a row PostgreSQL rejects (permanent): dead-letter it
  to ``cache.dlq.<reason>`` with its payload, headers and the error, then terminate it; the rest
  of the batch is written.
SIGTERM / SIGINT: finish the batch in hand, acknowledge it, drain the connection, return 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from django import db
from django.db import DatabaseError, InterfaceError, OperationalError
from redis.exceptions import RedisError

from persistence import jetstream, redis_store
from persistence.services import cache_entries_upsert_many
from persistence.worker.config import WorkerConfig
from persistence.worker.messages import PersistWrite, PoisonMessageError, decode, latest_per_key

logger = logging.getLogger("persistence.worker")

TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)


class Worker:
    def __init__(self, config: WorkerConfig, js: jetstream.JetStream, stop: asyncio.Event) -> None:
        self.config = config
        self.js = js
        self.stop = stop
        # Django's ORM is synchronous and its connections are per thread: one thread keeps one.
        self.db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-db")
        self.persisted = 0
        self.dead_lettered = 0

    async def in_db_thread(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            db.close_old_connections()
            try:
                return fn(*args, **kwargs)
            finally:
                db.close_old_connections()

        return await asyncio.get_running_loop().run_in_executor(self.db_thread, call)

    async def run(self) -> None:
        subscription = await self.js.pull_subscription()
        last_purge = time.monotonic()
        while not self.stop.is_set():
            msgs = await self.js.fetch(subscription, batch=self.config.batch_size, timeout=self.config.batch_timeout)
            if msgs:
                try:
                    await self.handle_batch(msgs)
                except Exception:
                    # Unacknowledged messages come back after the ack wait; keep consuming.
                    logger.exception("batch of %d messages failed; they will be redelivered", len(msgs))
                    await asyncio.sleep(1)
            if time.monotonic() - last_purge > self.config.purge_interval:
                last_purge = time.monotonic()
                try:
                    await self.js.purge_acknowledged()
                except Exception as error:  # a failed purge only delays it
                    logger.warning("purge of acknowledged messages failed: %s", error)
        self.db_thread.shutdown(wait=True)

    async def handle_batch(self, msgs: list[Any]) -> None:
        writes: list[PersistWrite] = []
        good: list[Any] = []
        for msg in msgs:
            try:
                writes.append(decode(msg.data))
                good.append(msg)
            except PoisonMessageError as error:
                await self.dead_letter(msg, error.reason, error.detail)
        batch = latest_per_key(writes)
        if batch:
            rejected = await self.write(batch, good)
            if rejected is None:  # stopping while PostgreSQL is down: the messages come back later
                return
            for write, reason, detail in rejected:
                for msg, decoded in zip(good, writes, strict=True):
                    if decoded.key == write.key and decoded.version == write.version:
                        await self.dead_letter(msg, reason, detail)
            rejected_ids = {(w.key, w.version) for w, _, _ in rejected}
            good = [m for m, w in zip(good, writes, strict=True) if (w.key, w.version) not in rejected_ids]
        await self.acknowledge(good)
        self.persisted += len(batch)
        logger.debug("persisted %d writes from %d messages", len(batch), len(msgs))
        await self.evict_stale(batch)

    async def acknowledge(self, msgs: list[Any]) -> None:
        """Ack after commit. A lost ack only means a redelivery, which the version guard absorbs."""
        for msg in msgs:
            try:
                await msg.ack()
            except Exception as error:
                logger.warning(
                    "ack of message %s failed (%s); it will be redelivered", msg.metadata.sequence.stream, error
                )
                return

    async def write(self, batch: list[PersistWrite], msgs: list[Any]) -> list[tuple[PersistWrite, str, str]] | None:
        """Write the batch; returns the writes PostgreSQL rejected for good, or None if stopping."""
        delay = 0.2
        last_progress = time.monotonic()
        while True:
            try:
                await self.in_db_thread(cache_entries_upsert_many, writes=batch)
                return []
            except TRANSIENT_DB_ERRORS as error:
                logger.warning(
                    "PostgreSQL unavailable, batch of %d kept for retry in %.1fs: %s",
                    len(batch),
                    delay,
                    error,
                    extra={"error": str(error)},
                )
            except DatabaseError as error:
                logger.warning("batch rejected (%s); writing its rows one by one", error)
                return await self.write_one_by_one(batch)
            if self.stop.is_set():
                for msg in msgs:
                    await msg.nak()
                return None
            # Keep the messages ours while we wait (ack wait would otherwise redeliver them).
            if time.monotonic() - last_progress > jetstream.ACK_WAIT / 3:
                last_progress = time.monotonic()
                for msg in msgs:
                    await msg.in_progress()
            await sleep_unless_stopped(self.stop, delay)
            delay = min(delay * 2, self.config.max_backoff)

    async def write_one_by_one(self, batch: list[PersistWrite]) -> list[tuple[PersistWrite, str, str]]:
        rejected = []
        for write in batch:
            while True:
                try:
                    await self.in_db_thread(cache_entries_upsert_many, writes=[write])
                    break
                except TRANSIENT_DB_ERRORS as error:
                    logger.warning("PostgreSQL unavailable while isolating a bad row: %s", error)
                    await asyncio.sleep(1)
                except DatabaseError as error:
                    rejected.append((write, "rejected_by_database", str(error).strip()))
                    break
        return rejected

    async def dead_letter(self, msg: Any, reason: str, detail: str) -> None:
        """Copy the message to the DLQ stream with the error, then terminate the original."""
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        meta = msg.metadata
        headers = dict(msg.headers or {})
        original_id = headers.pop("Nats-Msg-Id", "")
        headers.update(
            {
                "Birb-Original-Subject": msg.subject,
                "Birb-Original-Msg-Id": original_id,
                "Birb-Original-Seq": str(meta.sequence.stream),
                "Birb-Error": detail[:1000],
                "Birb-Reason": reason,
                "Birb-Deliveries": str(meta.num_delivered),
                "Birb-First-Failure": headers.get("Birb-First-Failure", now),
                "Birb-Last-Failure": now,
                # One dead letter per original message, even if this is retried.
                "Nats-Msg-Id": f"dlq:{self.js.names.stream}:{meta.sequence.stream}",
            }
        )
        while True:
            try:
                await self.js.publish(self.js.names.dlq_subject(reason), msg.data, headers=headers, timeout=5)
                break
            except jetstream.PublishError as error:
                if self.stop.is_set():
                    await msg.nak()
                    return
                logger.error("cannot dead-letter message %s yet: %s", meta.sequence.stream, error)
                await asyncio.sleep(1)
        await msg.term()
        self.dead_lettered += 1
        logger.error(
            "dead-lettered message %s: %s",
            meta.sequence.stream,
            detail,
            extra={"error": detail, "reason": reason},
        )

    async def evict_stale(self, batch: list[PersistWrite]) -> None:
        """Best effort: drop Redis copies older than what was just committed."""
        try:
            await self.in_db_thread(redis_store.evict_stale, {w.key: w.version for w in batch if w.op == "set"})
        except RedisError as error:
            logger.warning("could not check Redis for stale copies: %s", error)


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _connect_until_ready(stop: asyncio.Event) -> jetstream.JetStream | None:
    delay = 0.5
    while not stop.is_set():
        try:
            js = await jetstream.JetStream.connect(name="birb-nest-worker")
            await js.ensure_streams()
            await js.ensure_consumer()
            return js
        except Exception as error:
            logger.warning("NATS JetStream not ready (%s); retrying in %.1fs", error, delay)
            await sleep_unless_stopped(stop, delay)
            delay = min(delay * 2, 10.0)
    return None


async def run_async(
    config: WorkerConfig, stop: asyncio.Event | None = None, stop_requested: threading.Event | None = None
) -> int:
    stop = stop or asyncio.Event()
    if stop_requested is not None and stop_requested.is_set():
        stop.set()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: tests drive the loop
            loop.add_signal_handler(sig, stop.set)
    js = await _connect_until_ready(stop)
    if js is None:
        return 0
    n = js.names
    logger.info(
        "worker consuming %s as %s (batch size %d, batch timeout %.3fs)",
        n.stream,
        n.consumer,
        config.batch_size,
        config.batch_timeout,
    )
    worker = Worker(config, js, stop)
    try:
        await worker.run()
    finally:
        await js.close()
    logger.info("worker stopped: %d writes persisted, %d dead-lettered", worker.persisted, worker.dead_lettered)
    return 0


def run(config: WorkerConfig) -> int:
    """Run until SIGTERM/SIGINT; the exit code of `manage.py runworker`."""
    # A signal that arrives before the event loop is up must still mean "stop cleanly".
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    return asyncio.run(run_async(config, stop_requested=stop_requested))
