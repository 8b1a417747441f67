"""The worker loop: fetch a batch, keep the highest version per key, write it in one statement,
acknowledge after commit.

Failure policy:
- Transient (PostgreSQL unreachable, timeout, serialization failure, deadlock, a missing
  table): keep the batch, tell JetStream we are still working on it, retry with backoff; never
  acknowledge, never dead-letter, never drop. Deliveries are not used up.
- Permanent (a payload that cannot be decoded; a row PostgreSQL rejects: bad data, a constraint,
  a trigger): the rest of the batch is written, and the bad message is copied to
  ``cache.dlq.<reason>`` with its payload, headers and the error, then terminated.
- A message JetStream gave up on (``WORKER_MAX_DELIVER`` deliveries without an ack, e.g. it
  crashed several workers) is dead-lettered from the server's advisory, so nothing is dropped
  silently.
Signals: SIGTERM / SIGINT finish the batch in hand, acknowledge it, flush, exit 0. SIGUSR1
reloads batch size, batch timeout and log level between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from django import db
from django.conf import settings
from redis.exceptions import RedisError

from birbnest import tracing
from persistence import jetstream, redis_store
from persistence.messages import OP_SET, PersistWrite, PoisonMessageError, decode, isoformat, latest_per_key
from persistence.worker import metrics as worker_metrics
from persistence.worker.config import WorkerConfig, reload_config
from persistence.write_behind import cache_entries_purge, cache_entries_upsert_many

logger = logging.getLogger("persistence.worker")
# How long a partial batch waits for more messages before it is written (see fetch_ahead).
BATCH_LINGER = 0.02
# A connection NATS closed for good is noticed by the main loop between two fetches; if the loop
# is still waiting on something this long after the close, the wait is abandoned (see
# run_until_closed) and the worker connects again.
# Longest a worker spends deleting expired rows between two batches (the rest goes next time).
PURGE_MAX_SECONDS = 2.0
CLOSED_GRACE = 5.0
CLOSED_CHECK_INTERVAL = 0.5

# SQLSTATEs that say "this row can never be written": data exceptions (class 22: bad value,
# out of range, untranslatable character), constraint violations (23), and a rejection raised
# by a trigger or function (P0001 raise_exception, P0004 assert_failure). The message goes to
# the DLQ. Every other database error is transient (retried, the batch kept): a lost connection,
# a serialization failure or deadlock (40), a timeout (57014), and also a missing table or a
# permissions problem (42), which an operator fixes without a message being lost.
PERMANENT_SQLSTATE_CLASSES = ("22", "23")
PERMANENT_SQLSTATES = ("P0001", "P0004")


def decode_or_error(payload: bytes) -> PersistWrite | PoisonMessageError:
    try:
        return decode(payload)
    except PoisonMessageError as error:
        return error


def is_permanent(error: db.Error) -> bool:
    sqlstate = getattr(error.__cause__, "sqlstate", None) or ""
    return sqlstate[:2] in PERMANENT_SQLSTATE_CLASSES or sqlstate in PERMANENT_SQLSTATES


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run_until_closed(worker: Worker, js: jetstream.JetStream) -> None:
    """``worker.run()``, abandoned when the connection has been closed for :data:`CLOSED_GRACE`
    and it has not returned by itself.

    The loop checks the connection between two fetches, but an await under way when NATS closes
    the connection may never end: nats-py's close can stop half-way (a reset socket while it
    flushes) before it cancels the subscription's waits. Unacknowledged messages come back after
    the ack wait, as with any lost connection.
    """
    task = asyncio.create_task(worker.run())
    closed_since: float | None = None
    while True:
        done, _ = await asyncio.wait({task}, timeout=CLOSED_CHECK_INTERVAL)
        if done:
            return task.result()
        if not js.is_closed:
            closed_since = None
            continue
        closed_since = closed_since or time.monotonic()
        if time.monotonic() - closed_since < CLOSED_GRACE:
            continue
        logger.error(
            "NATS closed the connection %.0f s ago and the worker is still waiting; giving the wait up: %s",
            time.monotonic() - closed_since,
            _awaiting(task),
        )
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        worker.connection_lost = True
        return


def _awaiting(task: asyncio.Task[Any]) -> str:
    """Where a task waits: its chain of awaited coroutines, outermost first."""
    frames = []
    awaited: Any = task.get_coro()
    while awaited is not None and getattr(awaited, "cr_frame", None) is not None:
        frame = awaited.cr_frame
        frames.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
        awaited = awaited.cr_await
    return " > ".join(frames) or "?"


class _StoppingError(Exception):
    """Asked to stop while PostgreSQL is unavailable: leave the batch to JetStream."""


class Worker:
    def __init__(self, config: WorkerConfig, js: jetstream.JetStream, stop: asyncio.Event) -> None:
        self.config = config
        self.js = js
        self.stop = stop
        # Django's ORM is synchronous and its connections are per thread: one thread keeps one.
        self.db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-db")
        # Redis clean-up runs beside the next batch's write, never on the drain's critical path.
        self.redis_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-redis")
        self.evicting: asyncio.Future[Any] | None = None
        # The next batch, fetched while the one in hand is written (see run()).
        self.fetched_ahead: list[Any] = []
        self.reload_requested = False
        self.persisted = 0
        self.dead_lettered = 0
        # With tracing on: the span of each write of the batch in hand, by id() of its message.
        self.write_spans: dict[int, tracing.Span] = {}
        # Set when NATS closed the connection for good (nats-py does not reconnect after some
        # server errors): run() returns and run_async connects again.
        self.connection_lost = False

    # --- plumbing ---------------------------------------------------------------------------

    async def in_db_thread(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # The batch span, as the parent of the PostgreSQL span. Not by running the call in a copy
        # of this context: Django keeps the thread's connection in a context variable, and a copy
        # per call would lose it (a new connection per batch).
        parent = tracing.current_context() if tracing.enabled else None

        def call() -> Any:
            token = tracing.attach(parent) if parent is not None else None
            # The thread keeps its connection from one batch to the next (taking it from the
            # pool for each batch cost a health-check round trip). After any database error it
            # is given back, so a connection broken by a server restart is not used again.
            try:
                return fn(*args, **kwargs)
            except db.Error:
                db.connection.close()
                raise
            finally:
                if token is not None:
                    tracing.detach(token)

        return await asyncio.get_running_loop().run_in_executor(self.db_thread, call)

    def touch_liveness(self) -> None:
        """Docker's health check looks at this file's age (see docker-compose.yml)."""
        path = self.config.liveness_file
        if path:
            try:
                Path(path).touch()
            except OSError as error:
                logger.warning("cannot touch liveness file %s: %s", path, error)

    @contextlib.asynccontextmanager
    async def holding(self, msgs: list[Any]) -> AsyncIterator[None]:
        """While the body runs, tell JetStream every ACK_WAIT / 3 that these are still ours."""

        async def keep() -> None:
            while True:
                await asyncio.sleep(jetstream.ACK_WAIT / 3)
                self.touch_liveness()
                # The batch fetched ahead waits on this one: it must not be redelivered either.
                for msg in [*msgs, *self.fetched_ahead]:
                    with contextlib.suppress(Exception):  # reconnecting: the next round tries again
                        await msg.in_progress()

        task = asyncio.create_task(keep())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        subscription = await self.js.pull_subscription()
        advisories = await self.js.subscribe(
            jetstream.max_deliveries_advisory_subject(self.js.names), self.on_max_deliveries
        )
        last_purge = last_expired_purge = time.monotonic()
        # One fetch is always in flight while a batch is written: the fetch waits on NATS, the
        # write on PostgreSQL. Acknowledgements still follow each batch's commit, and the
        # version guard makes the order of two batches irrelevant. A fetch under way when a
        # stop is requested is finished and its batch written, as the one in hand is.
        fetching: asyncio.Task[list[tuple[Any, PersistWrite | PoisonMessageError]]] | None = None
        try:
            while not self.stop.is_set() or fetching is not None:
                if self.js.is_closed:
                    # Messages in hand cannot be acknowledged any more: they come back after the
                    # ack wait, to this worker once it has connected again, or to another.
                    logger.error("NATS closed the connection (%s); connecting again", self.js.last_error)
                    self.connection_lost = True
                    break
                self.touch_liveness()
                if self.reload_requested:
                    self.reload()
                fetched = await (fetching or self.fetch_ahead(subscription))
                worker_metrics.fetched(fetched)
                self.fetched_ahead = []
                fetching = None if self.stop.is_set() else asyncio.create_task(self.fetch_ahead(subscription))
                if fetched:
                    try:
                        await self.handle_batch(fetched)
                    except Exception:
                        # Unacknowledged messages come back after the ack wait; keep consuming.
                        logger.exception("batch of %d messages failed; they will be redelivered", len(fetched))
                        await sleep_unless_stopped(self.stop, 1)
                if time.monotonic() - last_purge > self.config.purge_interval:
                    last_purge = time.monotonic()
                    try:
                        await self.js.purge_acknowledged()
                    except Exception as error:  # a failed purge only delays it
                        logger.warning("purge of acknowledged messages failed: %s", error)
                if self.config.expired_purge_interval and (
                    time.monotonic() - last_expired_purge > self.config.expired_purge_interval
                ):
                    last_expired_purge = time.monotonic()
                    await self.purge_expired_rows()
        finally:
            if fetching is not None:  # only on an error: its messages come back after the ack wait
                fetching.cancel()
            if self.evicting is not None:
                with contextlib.suppress(Exception):
                    await self.evicting
        with contextlib.suppress(Exception):
            await advisories.unsubscribe()
        with contextlib.suppress(Exception):
            await self.in_db_thread(db.connection.close)
        self.db_thread.shutdown(wait=True)
        self.redis_thread.shutdown(wait=True)

    async def purge_expired_rows(self) -> None:
        """Delete the rows expired or deleted longer than TOMBSTONE_RETENTION ago, for at most
        PURGE_MAX_SECONDS between two batches (what is left goes next time)."""
        before = datetime.now(UTC) - timedelta(seconds=settings.BIRB.tombstone_retention)
        try:
            purged = await self.in_db_thread(cache_entries_purge, before=before, max_seconds=PURGE_MAX_SECONDS)
        except Exception as error:  # a failed purge only delays it
            logger.warning("purge of expired rows failed: %s", error)
            return
        if purged:
            worker_metrics.ROWS_PURGED.inc(purged)
            logger.info("purged %d rows expired or deleted before %s", purged, isoformat(before))

    async def fetch_ahead(self, subscription: Any) -> list[tuple[Any, PersistWrite | PoisonMessageError]]:
        """The next batch, decoded (here, while the batch before it is being written)."""
        size = self.config.batch_size
        msgs = await self.js.fetch(subscription, batch=size, timeout=self.config.batch_timeout)
        self.fetched_ahead = msgs
        if msgs and len(msgs) < size and BATCH_LINGER > 0 and not self.stop.is_set():
            # A partial batch: give it a moment to fill. Under a steady trickle of writes this
            # turns one statement, commit and ack round per message into one per few dozen
            # (the CPU it saves goes to the API on a shared machine), for BATCH_LINGER of lag.
            await asyncio.sleep(BATCH_LINGER)
            msgs = msgs + await self.js.fetch(subscription, batch=size - len(msgs), timeout=BATCH_LINGER)
            self.fetched_ahead = msgs
        return [(msg, decode_or_error(msg.data)) for msg in msgs]

    def request_reload(self) -> None:
        self.reload_requested = True

    def reload(self) -> None:
        """SIGUSR1: new batch size, batch timeout and log level, applied between two batches."""
        self.reload_requested = False
        try:
            config, level, changes = reload_config(self.config)
        except ValueError as error:
            logger.error("configuration not reloaded: %s", error, extra={"error": str(error)})
            return
        self.config = config
        logging.getLogger().setLevel(level.upper())
        logger.info("configuration reloaded: %s", ", ".join(changes) if changes else "nothing changed")

    async def handle_batch(self, fetched: list[tuple[Any, PersistWrite | PoisonMessageError]]) -> None:
        if not tracing.enabled:
            await self._handle_batch(fetched)
            return
        # The batch span starts a trace of its own and links to the span of every write it
        # carries (the API's publish, from the message's traceparent); its PostgreSQL statement
        # is its child. Each write's own trace goes on in a span from here to its ack or dead
        # letter (with a link back to the batch), so a write is one trace from request to disk.
        # Messages without a traceparent (published with tracing off) are only counted.
        traced = []
        for msg, _ in fetched:
            context = tracing.extract(msg.headers)
            link = tracing.link_of(context)
            if link is not None:
                traced.append((msg, context, link))
        with tracing.span(
            "process batch",
            kind=tracing.SpanKind.CONSUMER,
            links=[link for _, _, link in traced],
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": self.js.names.persist_subjects,
                "messaging.batch.message_count": len(fetched),
            },
        ) as batch_span:
            back = [tracing.Link(batch_span.get_span_context())]
            self.write_spans = {
                id(msg): tracing.start_span(
                    f"process {msg.subject}",
                    kind=tracing.SpanKind.CONSUMER,
                    context=context,
                    links=back,
                    attributes={
                        "messaging.system": "nats",
                        "messaging.operation.type": "process",
                        "messaging.destination.name": msg.subject,
                        "messaging.message.id": (msg.headers or {}).get("Nats-Msg-Id", ""),
                    },
                )
                for msg, context, _ in traced
            }
            try:
                await self._handle_batch(fetched)
            finally:
                spans, self.write_spans = self.write_spans, {}
                for write_span in spans.values():
                    write_span.end()

    async def _handle_batch(self, fetched: list[tuple[Any, PersistWrite | PoisonMessageError]]) -> None:
        started = time.perf_counter()
        decoded: list[tuple[Any, PersistWrite]] = []
        for msg, write in fetched:
            if isinstance(write, PoisonMessageError):
                await self.dead_letter_delivered(msg, write.reason, write.detail)
            else:
                decoded.append((msg, write))
        batch = latest_per_key([write for _, write in decoded])
        async with self.holding([msg for msg, _ in decoded]):
            rejected = await self.write(batch)
        if rejected is None:  # stopping while PostgreSQL is down: let JetStream redeliver them
            for msg, _ in decoded:
                with contextlib.suppress(Exception):
                    await msg.nak()
            return
        # A rejected write takes its key's older versions in the batch with it to the DLQ.
        rejected_keys = {write.key: reason_detail for write, reason_detail in rejected.items()}
        done = []
        for msg, write in decoded:
            if write.key in rejected_keys:
                reason, detail = rejected_keys[write.key]
                await self.dead_letter_delivered(msg, reason, detail)
            else:
                done.append(msg)
        await self.acknowledge(done)
        worker_metrics.batch_committed(fetched, persisted=len(done), started=started)
        self.persisted += len(batch) - len(rejected)
        logger.debug("persisted %d writes from %d messages", len(batch) - len(rejected), len(fetched))
        await self.evict_stale([w for w in batch if w.key not in rejected_keys])

    async def acknowledge(self, msgs: list[Any]) -> None:
        """Ack after commit. A lost ack only means a redelivery, which the version guard absorbs."""
        for msg in msgs:
            try:
                await msg.ack()
            except Exception as error:
                logger.warning("ack failed (%s); the messages will be redelivered", error)
                return

    async def write(self, batch: list[PersistWrite]) -> dict[PersistWrite, tuple[str, str]] | None:
        """Write the batch. Returns the writes PostgreSQL rejects for good (each isolated in a
        transaction of its own), or None when stopping while PostgreSQL is unavailable."""
        try:
            error = await self.upsert_retrying(batch)
            if error is None:
                return {}
            logger.warning("batch rejected (%s); writing its rows one by one", error)
            rejected = {}
            for write in batch:
                error = await self.upsert_retrying([write])
                if error is not None:
                    rejected[write] = ("rejected_by_database", error)
            return rejected
        except _StoppingError:
            return None

    async def upsert_retrying(self, writes: list[PersistWrite]) -> str | None:
        """Upsert, retrying transient errors with backoff; the permanent error's text, or None."""
        delay = 0.2
        while True:
            try:
                await self.in_db_thread(cache_entries_upsert_many, writes=writes)
                return None
            except db.Error as error:
                if is_permanent(error):
                    return str(error).strip()
                logger.warning(
                    "PostgreSQL unavailable, %d writes kept for retry in %.1fs: %s",
                    len(writes),
                    delay,
                    str(error).strip(),
                    extra={"error": str(error).strip()},
                )
            if self.stop.is_set():
                raise _StoppingError
            await sleep_unless_stopped(self.stop, delay)
            self.touch_liveness()
            delay = min(delay * 2, self.config.max_backoff)

    # --- dead letters -----------------------------------------------------------------------

    async def dead_letter_delivered(self, msg: Any, reason: str, detail: str) -> None:
        """Copy a delivered message to the DLQ stream with the error, then terminate it."""
        write_span = self.write_spans.get(id(msg))
        if write_span is None:
            await self._dead_letter_delivered(msg, reason, detail)
            return
        # In the write's own trace: the log line says which request's write this was.
        write_span.set_status(tracing.StatusCode.ERROR, f"dead-lettered: {reason}")
        write_span.set_attribute("birb.dead_letter.reason", reason)
        with tracing.used(write_span):
            await self._dead_letter_delivered(msg, reason, detail)

    async def _dead_letter_delivered(self, msg: Any, reason: str, detail: str) -> None:
        meta = msg.metadata
        copied = await self.dead_letter(
            data=msg.data,
            headers=dict(msg.headers or {}),
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            deliveries=meta.num_delivered,
            reason=reason,
            detail=detail,
        )
        if copied:
            with contextlib.suppress(Exception):  # not terminated = redelivered = dead-lettered again (same id)
                await msg.term()
        else:
            with contextlib.suppress(Exception):
                await msg.nak()

    async def dead_letter(
        self,
        *,
        data: bytes,
        headers: dict[str, str],
        subject: str,
        stream_seq: int,
        deliveries: int,
        reason: str,
        detail: str,
    ) -> bool:
        """Publish to ``cache.dlq.<reason>``; False only if stopping before JetStream took it."""
        now = isoformat(datetime.now(UTC))
        original_id = headers.pop("Nats-Msg-Id", "")
        headers.update(
            {
                "Birb-Original-Subject": subject,
                "Birb-Original-Msg-Id": original_id,
                "Birb-Original-Seq": str(stream_seq),
                "Birb-Error": detail[:1000],
                "Birb-Reason": reason,
                "Birb-Deliveries": str(deliveries),
                "Birb-First-Failure": headers.get("Birb-First-Failure", now),
                "Birb-Last-Failure": now,
                # One dead letter per stored message, however often this is retried.
                "Nats-Msg-Id": f"dlq:{self.js.names.stream}:{stream_seq}",
            }
        )
        while True:
            try:
                await self.js.publish(self.js.names.dlq_subject(reason), data, headers=headers, timeout=5)
                break
            except jetstream.PublishError as error:
                if self.stop.is_set():
                    return False
                logger.error("cannot dead-letter message %s yet: %s", stream_seq, error)
                await sleep_unless_stopped(self.stop, 1)
        self.dead_lettered += 1
        worker_metrics.dead_lettered()
        logger.error(
            "dead-lettered message %s (%s): %s",
            stream_seq,
            reason,
            detail,
            extra={"error": detail, "reason": reason, "stream_seq": stream_seq},
        )
        return True

    async def on_max_deliveries(self, advisory: Any) -> None:
        """JetStream stopped delivering a message: keep it, in the DLQ."""
        try:
            event = orjson.loads(advisory.data)
            seq = int(event["stream_seq"])
            stored = await self.js.get_message(seq)
        except Exception as error:
            logger.error("max-deliveries advisory not handled: %s", error, extra={"error": str(error)})
            return
        await self.dead_letter(
            data=stored.data or b"",
            headers=dict(stored.headers or {}),
            subject=stored.subject,
            stream_seq=seq,
            deliveries=int(event.get("deliveries", 0)),
            reason="max_deliveries",
            detail=f"not acknowledged after {event.get('deliveries')} deliveries",
        )

    async def evict_stale(self, batch: list[PersistWrite]) -> None:
        """Best effort: drop Redis copies older than what was just committed.

        Runs in the background while the next batch is fetched and written; at most one runs
        at a time. First versions are checked too: a GET that found the key absent leaves a
        negative entry (version 0) that a first write whose own store failed would not replace.
        """
        versions = {w.key: w.version for w in batch if w.op == OP_SET}
        if self.evicting is not None:
            await self.evicting
            self.evicting = None
        if versions:
            parent = tracing.current_context() if tracing.enabled else None
            self.evicting = asyncio.get_running_loop().run_in_executor(self.redis_thread, self._evict, versions, parent)

    @staticmethod
    def _evict(versions: dict[str, int], parent: Any = None) -> None:
        token = tracing.attach(parent) if parent is not None else None  # under the batch span
        try:
            redis_store.evict_stale(versions)
        except RedisError as error:
            logger.warning("could not check Redis for stale copies: %s", error)
        finally:
            if token is not None:
                tracing.detach(token)


async def _connect_until_ready(stop: asyncio.Event) -> jetstream.JetStream | None:
    delay = 0.5
    while not stop.is_set():
        try:
            js = await jetstream.JetStream.connect(name=f"birb-nest-worker-{os.getpid()}")
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
    persisted = dead_lettered = 0
    while True:
        worker = Worker(config, js, stop)
        with contextlib.suppress(ValueError, RuntimeError):
            loop.add_signal_handler(signal.SIGUSR1, worker.request_reload)
        try:
            await run_until_closed(worker, js)
        except Exception as error:
            if not js.is_closed:
                raise
            # Closed for good before the loop's own check could see it (while subscribing, say):
            # the same as a connection lost mid-run.
            logger.error("NATS closed the connection (%s: %s); connecting again", type(error).__name__, error)
            worker.connection_lost = True
        finally:
            await js.close()
        persisted, dead_lettered = persisted + worker.persisted, dead_lettered + worker.dead_lettered
        if not worker.connection_lost or stop.is_set():
            break
        config = worker.config  # keeps what SIGUSR1 reloaded
        reconnected = await _connect_until_ready(stop)
        if reconnected is None:
            break
        js = reconnected
        logger.info("worker consuming %s again after reconnecting", n.stream)
    logger.info("worker stopped: %d writes persisted, %d dead-lettered", persisted, dead_lettered)
    return 0


def run(config: WorkerConfig) -> int:
    """Run until SIGTERM/SIGINT; the exit code of `manage.py runworker`."""
    # A signal that arrives before the event loop is up must still mean "stop cleanly", and a
    # SIGUSR1 then must not kill the process.
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    signal.signal(signal.SIGUSR1, lambda *_: None)
    tracing.configure(settings.BIRB, component="worker")
    try:
        return asyncio.run(run_async(config, stop_requested=stop_requested))
    finally:
        tracing.shutdown()  # the last batches' spans: sent, or given up after the export timeout
