"""NATS JetStream: the only module that imports ``nats``.

Two ways in:

- :func:`publisher` for synchronous callers (the WSGI API, management commands): one asyncio
  loop per process in a daemon thread, one connection, and publishes submitted to it from any
  thread; concurrent requests therefore publish concurrently on one connection, and no request
  starts a loop or a thread.
- :class:`JetStream` for asyncio callers (the worker).

Streams and the consumer are declared here, idempotently, from the settings.

On a NATS cluster (``NATS_URL`` lists several servers) the connection goes to one of them and
moves to another when that one dies (nats-py's server pool, which the cluster's own gossip
extends); both streams get ``JETSTREAM_REPLICAS`` replicas (R3 on three nodes), and the durable
consumer follows its stream's. A publish is answered by the stream's leader only once a quorum
of replicas has stored the message (JetStream's PubAck on a replicated stream), so an
acknowledged write survives the loss of any minority of the nodes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from django.conf import settings
from nats.js import api

from birbnest import tracing

logger = logging.getLogger(__name__)

T = TypeVar("T")

DLQ_MAX_AGE = 7 * 24 * 3600.0
DUPLICATE_WINDOW = 120.0
# A delivery not acknowledged within ACK_WAIT is redelivered (a worker died holding it); the
# worker reports progress every ACK_WAIT / 3 while it waits for PostgreSQL, so a live worker
# never loses its batch. Redeliveries after that back off (REDELIVERY_BACKOFF[i] before the
# (i+2)-th delivery); after WORKER_MAX_DELIVER deliveries the worker dead-letters the message.
ACK_WAIT = 10.0
REDELIVERY_BACKOFF = (10.0, 20.0, 40.0, 60.0)
# After a failed connect, callers fail at once for this long, then one tries again; the wait
# doubles up to RECONNECT_MAX while NATS stays unreachable.
RECONNECT_INTERVAL = 0.25
RECONNECT_MAX = 2.0
# A server that stops answering without closing the connection (a host powered off, a network
# partition) is given up after PING_INTERVAL * (MAX_OUTSTANDING_PINGS + 1) or so, and the
# connection moves to another server of NATS_URL. (A process that dies closes its sockets:
# that is noticed at once.)
PING_INTERVAL = 2
MAX_OUTSTANDING_PINGS = 2
# While a replicated stream elects a new leader (its leader died: a few seconds), nothing answers
# its subjects; a publish retries within its timeout, this often at first, then less.
NO_LEADER_RETRY = 0.05
NO_LEADER_RETRY_MAX = 0.5
# How long a publish that found no stream waits for the check whether it exists (see
# JetStream._check_streams); an immediate answer when it was deleted, none while it is leaderless.
STREAM_CHECK_WAIT = 0.5
# A publish that finds the connection down waits this long for nats-py to reconnect (to another
# server of a cluster: about half a second) instead of answering 503 at once; only in the first
# RECONNECT_GRACE of an outage, so while NATS stays down writes fail fast as before.
RECONNECT_GRACE = 1.0
# A worker whose fetches keep coming back empty checks this often that its consumer still
# exists: a stream deleted at runtime (`nats stream rm`, the JetStream API) takes the consumer
# with it, and the worker creates both again (see JetStream.fetch).
CONSUMER_CHECK_INTERVAL = 2.0
# Room left in every persist message for the headers the worker adds when it dead-letters it
# (Birb-Error holds up to 1,000 characters), so any message the API sends fits the DLQ too.
DEAD_LETTER_HEADROOM = 2048


class PublishError(Exception):
    """A message could not be made durable (no PubAck in time, stream missing, server down).

    ``reason`` is a stable word for clients and metrics (``not_connected``, ``timeout``,
    ``no_stream``, ``duplicate``, ``unreachable``, ``error``); the message has the details,
    for the logs.
    """

    def __init__(self, message: str, *, reason: str = "error") -> None:
        self.reason = reason
        super().__init__(message)


class MessageTooLargeError(Exception):
    """The message with its headers would exceed the server's ``max_payload``; not sent.

    Sending it anyway would make the server close the connection ("maximum payload exceeded").
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message of {size} bytes with headers exceeds the NATS server's max_payload of {limit}")


def message_size(payload: bytes, headers: dict[str, str] | None) -> int:
    """Bytes the server counts against ``max_payload``: payload plus the header block as nats-py
    writes it (``NATS/1.0\\r\\n``, ``Name: value\\r\\n`` each, a blank line)."""
    if not headers:
        return len(payload)
    block = 12 + sum(len(name.encode()) + len(value.encode()) + 4 for name, value in headers.items())
    return len(payload) + block


@dataclass(frozen=True)
class Names:
    stream: str
    dlq_stream: str
    subject_prefix: str
    consumer: str

    @property
    def persist_subjects(self) -> str:
        return f"{self.subject_prefix}.persist.*"

    @property
    def dlq_subjects(self) -> str:
        return f"{self.subject_prefix}.dlq.*"

    def persist_subject(self, op: str) -> str:
        return f"{self.subject_prefix}.persist.{op}"

    def dlq_subject(self, reason: str) -> str:
        return f"{self.subject_prefix}.dlq.{reason}"


def names() -> Names:
    config = settings.BIRB
    return Names(
        stream=config.birb_stream,
        dlq_stream=config.birb_dlq_stream,
        subject_prefix=config.birb_subject_prefix,
        consumer=config.worker_consumer_group,
    )


def replicas() -> int:
    """JETSTREAM_REPLICAS: replicas of both streams (1 on a single server, 3 on a three-node cluster)."""
    return int(settings.BIRB.jetstream_replicas)


def stream_config(n: Names) -> api.StreamConfig:
    # Limits retention as the contract says; acknowledged messages are purged by the worker
    # (JetStream.purge_acknowledged), and when the stream is full new publishes are refused
    # (discard=new, so the writer gets a 503) instead of old, unpersisted messages being dropped.
    return api.StreamConfig(
        name=n.stream,
        subjects=[n.persist_subjects],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.NEW,
        max_msgs=-1,
        max_bytes=-1,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=replicas(),
    )


def dlq_stream_config(n: Names) -> api.StreamConfig:
    return api.StreamConfig(
        name=n.dlq_stream,
        subjects=[n.dlq_subjects],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=DLQ_MAX_AGE,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=replicas(),
    )


def redelivery_backoff(max_deliver: int) -> list[float] | None:
    """JetStream wants fewer backoff steps than deliveries; the first step is the ack wait."""
    steps = list(REDELIVERY_BACKOFF[: max(0, max_deliver - 1)])
    return steps or None


def consumer_config(n: Names) -> api.ConsumerConfig:
    # No num_replicas: 0 means "as many as the stream", so the consumer follows its stream's
    # replicas, also when JETSTREAM_REPLICAS changes them later.
    max_deliver = settings.BIRB.worker_max_deliver
    return api.ConsumerConfig(
        durable_name=n.consumer,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=ACK_WAIT,
        max_deliver=max_deliver,
        backoff=redelivery_backoff(max_deliver),
        filter_subject=n.persist_subjects,
        max_ack_pending=20000,
    )


def max_deliveries_advisory_subject(n: Names) -> str:
    """Published by the server when a message reached max_deliver without being acknowledged."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{n.stream}.{n.consumer}"


def _reason(error: BaseException) -> str:
    """The stable reason word of a failed publish (see :class:`PublishError`)."""
    if isinstance(error, TimeoutError):  # nats.errors.TimeoutError is one too
        return "timeout"
    if isinstance(error, nats.js.errors.NoStreamResponseError):
        return "no_stream"
    if isinstance(error, nats.errors.ConnectionClosedError | nats.errors.ConnectionReconnectingError | OSError):
        return "not_connected"
    return "error"


def _log_failed_check(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("could not check the streams: %s", task.exception())


async def _log_error(error: Exception) -> None:
    logger.warning("NATS: %s: %s", type(error).__name__, error, extra={"error": str(error)})


async def _log_disconnected() -> None:
    logger.info("NATS: disconnected")


async def _log_reconnected() -> None:
    logger.info("NATS: reconnected")


async def _connect(servers: Sequence[str], *, name: str, timeout: float = 3.0) -> Any:
    """Connect to one of ``servers``, or raise within ``timeout`` (nats-py retries forever)."""
    return await asyncio.wait_for(_client_connect(servers, name=name), timeout=timeout)


async def _client_connect(servers: Sequence[str], *, name: str) -> Any:
    return await nats.connect(
        # A list, never the comma-separated string: nats-py takes a string for one server.
        servers=list(servers),
        name=name,
        error_cb=_log_error,
        disconnected_cb=_log_disconnected,
        reconnected_cb=_log_reconnected,
        # With several servers, one that does not answer must leave time for the next within
        # _connect's timeout (a live server accepts and sends its INFO in milliseconds).
        connect_timeout=2 if len(servers) <= 1 else 1,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        ping_interval=PING_INTERVAL,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        # Publishes made while reconnecting wait in this buffer; their PubAck wait still bounds them.
        pending_size=8 * 1024 * 1024,
    )


class JetStream:
    """Asyncio wrapper of one NATS connection and its JetStream context."""

    def __init__(self, nc: Any, n: Names) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.names = n
        # One re-creation at a time: the API publishes concurrently on this connection, and
        # every publish that finds the stream gone waits for the same one.
        self._recreating = asyncio.Lock()
        self._stream_check: asyncio.Future[None] | None = None
        self._consumer_checked_at = time.monotonic()

    @classmethod
    async def connect(cls, *, name: str = "birb-nest") -> JetStream:
        n = names()
        nc = await _connect(settings.BIRB.nats_servers, name=name)
        return cls(nc, n)

    async def ensure_streams(self) -> list[str]:
        """Create both streams if missing; leave existing ones as the operator configured them,
        except their replicas, which follow JETSTREAM_REPLICAS (see :meth:`_ensure_replicas`).
        The names of the streams created."""
        created = []
        for config in (stream_config(self.names), dlq_stream_config(self.names)):
            try:
                info = await self.js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                try:
                    await self.js.add_stream(config)
                    logger.info("created stream %s with %d replica(s)", config.name, config.num_replicas)
                    created.append(str(config.name))
                    continue
                except nats.js.errors.BadRequestError as error:
                    try:  # another process created it between our two calls?
                        info = await self.js.stream_info(config.name)
                    except nats.js.errors.NotFoundError:
                        # Refused for its own reason, e.g. more replicas than the cluster has
                        # nodes (a single server has 1): that is the error to report.
                        raise error from None
            await self._ensure_replicas(info, int(config.num_replicas or 1))
        return created

    async def _ensure_replicas(self, info: Any, wanted: int) -> None:
        """Bring an existing stream to ``wanted`` replicas in place (JetStream moves the data);
        nothing else of its configuration changes. A refused update is logged, and the stream
        keeps serving with the replicas it has: the next connection tries again."""
        have = int(info.config.num_replicas or 1)
        if have == wanted:
            return
        logger.warning(
            "stream %s has %d replica(s), JETSTREAM_REPLICAS is %d: updating it in place",
            info.config.name,
            have,
            wanted,
        )
        try:
            await self.js.update_stream(replace(info.config, num_replicas=wanted))
        except nats.js.errors.Error as error:
            logger.error(
                "stream %s kept %d replica(s): JetStream refused %d (%s); check that the cluster has "
                "that many nodes with JetStream, or set JETSTREAM_REPLICAS to what it has",
                info.config.name,
                have,
                wanted,
                error,
                extra={"error": str(error)},
            )
            return
        logger.info("stream %s now has %d replica(s)", info.config.name, wanted)

    async def recreate_streams(self) -> None:
        """A publish found no stream: it was deleted while this process runs. Create both again
        with the contract's settings (once for all the publishes that noticed together)."""
        async with self._recreating:
            created = await self.ensure_streams()
        if created:
            logger.warning(
                "stream %s was missing (deleted while the service ran); created it again",
                " and ".join(created),
                extra={"error": "stream missing"},
            )

    async def recreate_consumer_if_missing(self) -> bool:
        """The worker's check: if our consumer is gone (its stream was deleted, or `nats consumer
        rm`), create the streams and the consumer again. True if it did."""
        self._consumer_checked_at = time.monotonic()
        try:
            await self.js.consumer_info(self.names.stream, self.names.consumer)
            return False
        except nats.js.errors.NotFoundError:
            pass
        except Exception:  # NATS unreachable: not a missing consumer; the fetches retry
            return False
        async with self._recreating:
            created = await self.ensure_streams()
            await self.ensure_consumer()
        logger.warning(
            "consumer %s on %s was missing (deleted while the worker ran); created it again%s",
            self.names.consumer,
            self.names.stream,
            f", with stream {' and '.join(created)}" if created else "",
            extra={"error": "consumer missing"},
        )
        return True

    async def ensure_consumer(self) -> None:
        """Create the durable consumer, or bring an existing one to the configured delivery
        policy (ack wait, max deliver, backoff can change in place)."""
        config = consumer_config(self.names)
        try:
            await self.js.consumer_info(self.names.stream, self.names.consumer)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(self.names.stream, config)
            logger.info("created consumer %s on %s", self.names.consumer, self.names.stream)
            return
        try:
            await self.js.add_consumer(self.names.stream, config)
        except nats.js.errors.Error as error:
            logger.warning("consumer %s kept as it is (%s)", self.names.consumer, error)

    async def get_message(self, seq: int, stream: str | None = None) -> Any:
        """A stored message by stream sequence (``.data``, ``.headers``, ``.subject``)."""
        return await self.js.get_msg(stream or self.names.stream, seq)

    async def delete_message(self, seq: int, stream: str) -> None:
        await self.js.delete_msg(stream, seq)

    async def subscribe(self, subject: str, callback: Any) -> Any:
        """A core NATS subscription (advisories); ``callback(msg)`` is a coroutine."""
        return await self.nc.subscribe(subject, cb=callback)

    async def publish(
        self, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float, new_only: bool = False
    ) -> int:
        """Publish and wait for the PubAck; the stream sequence. ``new_only``: a message JetStream
        de-duplicates (its ``Nats-Msg-Id`` was seen within the window) is an error.

        A message over the server's ``max_payload`` raises :class:`MessageTooLargeError` without
        being sent: nats-py checks only the payload, and the server drops the connection for good.
        """
        size, limit = message_size(payload, headers), self.max_payload
        if size > limit:
            raise MessageTooLargeError(size, limit)
        deadline = time.monotonic() + timeout
        try:
            ack = await self._publish_until_answered(subject, payload, headers=headers, deadline=deadline)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as error:
            raise PublishError(f"{type(error).__name__}: {error}".rstrip(": "), reason=_reason(error)) from error
        if new_only and ack.duplicate:
            # JetStream already holds a message with this id, so this one was dropped. Every
            # write has its own id (key:version): a duplicate means a version collision, and
            # answering 2xx would acknowledge a write that will never be applied.
            raise PublishError(
                f"JetStream dropped the message as a duplicate of {headers.get('Nats-Msg-Id')}", reason="duplicate"
            )
        return int(ack.seq)

    async def _publish_until_answered(
        self, subject: str, payload: bytes, *, headers: dict[str, str], deadline: float
    ) -> Any:
        """The PubAck, or the error of the last attempt before ``deadline``.

        "No responders" means no server took the message, so it is safe to send again: either
        the stream was deleted at runtime (created again here, once), or, on a cluster, it has
        no leader while its replicas elect one (its leader died): then the publish is retried
        until the new leader answers or the time is up. A timeout is not retried: the message
        may have been stored, and only its PubAck was lost.
        """
        checked, wait = False, NO_LEADER_RETRY
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await self.js.publish(subject, payload, timeout=max(remaining, 0.1), headers=headers)
            except nats.js.errors.NoStreamResponseError:
                if not checked:
                    checked = True
                    await self._check_streams(min(deadline - time.monotonic(), STREAM_CHECK_WAIT))
                    continue
                if time.monotonic() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)
                wait = min(wait * 2, NO_LEADER_RETRY_MAX)

    async def _check_streams(self, timeout: float) -> None:
        """Create the streams again if they are gone, waiting at most ``timeout`` for that.

        One check at a time, shared by every publish that asks meanwhile. A stream without a
        leader does not answer its info request until it has one again (nats-py gives up after
        its 5 s API timeout): the check then goes on in the background, and the publishes retry.
        """
        task = self._stream_check
        if task is None or task.done():
            task = self._stream_check = asyncio.ensure_future(self.recreate_streams())
            task.add_done_callback(_log_failed_check)
        if timeout <= 0:
            return
        with contextlib.suppress(Exception):  # the publish that follows answers for the stream
            await asyncio.wait_for(asyncio.shield(task), timeout)

    @property
    def is_closed(self) -> bool:
        """Closed for good: nats-py will not reconnect it (see :meth:`SyncJetStream.client`)."""
        return bool(self.nc.is_closed)

    @property
    def last_error(self) -> str:
        return str(self.nc.last_error or "closed")

    @property
    def max_payload(self) -> int:
        """The connected server's limit on one message, headers included (its INFO)."""
        return int(self.nc.max_payload)

    async def pull_subscription(self) -> Any:
        return await self.js.pull_subscribe_bind(durable=self.names.consumer, stream=self.names.stream)

    async def fetch(self, subscription: Any, *, batch: int, timeout: float) -> list[Any]:
        """Up to ``batch`` messages; an empty list when none came within ``timeout`` (idle).

        Connection trouble (NATS restarting, reconnecting) also yields an empty list after the
        timeout: the caller's loop simply asks again, and nats-py reconnects underneath.

        A consumer deleted at runtime (with its stream) makes fetches fail ("no responders") or
        come back empty: then, and every CONSUMER_CHECK_INTERVAL while idle, the consumer is
        looked up and created again if it is gone, streams included. The subscription stays
        valid: it pulls from the consumer by name.
        """
        try:
            msgs = list(await subscription.fetch(batch, timeout=timeout))
        except TimeoutError:  # nats.errors.TimeoutError is a subclass
            if time.monotonic() - self._consumer_checked_at > CONSUMER_CHECK_INTERVAL:
                await self.recreate_consumer_if_missing()
            return []
        except (nats.errors.Error, nats.js.errors.Error, OSError) as error:
            if await self.recreate_consumer_if_missing():
                return []
            logger.warning("fetch failed (%s: %s); retrying", type(error).__name__, error)
            await asyncio.sleep(timeout)
            return []
        self._consumer_checked_at = time.monotonic()
        return msgs

    async def consumer_state(self) -> dict[str, int]:
        info = await self.js.consumer_info(self.names.stream, self.names.consumer)
        return {
            "num_pending": int(info.num_pending or 0),
            "num_ack_pending": int(info.num_ack_pending or 0),
            "num_redelivered": int(info.num_redelivered or 0),
            "ack_floor_stream_seq": int(info.ack_floor.stream_seq if info.ack_floor else 0),
        }

    async def stream_state(self, stream: str | None = None) -> dict[str, int]:
        info = await self.js.stream_info(stream or self.names.stream)
        return {
            "messages": int(info.state.messages),
            "bytes": int(info.state.bytes),
            "last_seq": int(info.state.last_seq),
        }

    async def purge_acknowledged(self) -> None:
        """Remove messages every worker has acknowledged (below the consumer's ack floor)."""
        state = await self.consumer_state()
        floor = state["ack_floor_stream_seq"]
        if floor > 0:
            await self.js.purge_stream(self.names.stream, seq=floor + 1)

    async def close(self) -> None:
        """Flush what is buffered (acknowledgements) and close.

        Not ``nc.drain()``: with a pull subscription it waits for messages that never come and
        only returns after its 30 s timeout.
        """
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=2)
            except Exception as error:
                logger.warning("NATS flush on close failed: %s", error)
        await self.nc.close()


class _Job:
    """A coroutine submitted to the loop by :meth:`SyncJetStream.run`; ``done`` is released
    (from the loop's thread) once its task has finished."""

    __slots__ = ("cancelled", "coro", "done", "error", "task")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.task: asyncio.Task[Any] | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.done = threading.Lock()
        self.done.acquire()

    def finished(self, _task: asyncio.Task[Any]) -> None:
        self.done.release()

    def cancel(self) -> None:
        """On the loop: the caller stopped waiting."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


class SyncJetStream:
    """Runs :class:`JetStream` on a private event loop so synchronous code can use it."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jetstream-loop", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._client: JetStream | None = None
        self._retry_at = 0.0
        self._retry_wait = RECONNECT_INTERVAL
        self._down_since: float | None = None  # when a publish first found the connection down
        self._queue: collections.deque[_Job] = collections.deque()
        self._wakeup_pending = False

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait (at most ``timeout``, then TimeoutError and the
        coroutine is cancelled) for its result or exception.

        The hand-off is lighter than ``asyncio.run_coroutine_threadsafe``: the coroutine joins a
        queue that the loop empties in one wake-up (one self-pipe write for all the requests
        that submit meanwhile), and the caller waits on a bare lock that the task's completion
        releases (no ``concurrent.futures.Future`` and its ``Condition`` per call).
        """
        job = _Job(coro)
        self._queue.append(job)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            try:
                self._loop.call_soon_threadsafe(self._start_queued)
            except BaseException:
                self._wakeup_pending = False
                raise
        if not job.done.acquire(timeout=timeout):
            self._loop.call_soon_threadsafe(job.cancel)
            raise TimeoutError
        if job.task is None:  # the loop could not start it
            raise job.error or RuntimeError("the coroutine was not started")
        return job.task.result()

    def _start_queued(self) -> None:
        """On the loop: a task for every coroutine submitted since the last wake-up."""
        self._wakeup_pending = False  # first: a job queued from now on schedules another wake-up
        queue, loop = self._queue, self._loop
        while queue:
            job = queue.popleft()
            if job.cancelled:
                job.coro.close()
                continue
            try:
                job.task = task = loop.create_task(job.coro)
            except Exception as error:  # not a coroutine: the caller gets the error, the others go on
                job.error = error
                job.done.release()
                continue
            task.add_done_callback(job.finished)

    def client(self) -> JetStream:
        """The connection, connecting first if there is none or the one there was is closed.

        nats-py reconnects a dropped connection by itself, but it closes one for good after some
        server errors (a message over ``max_payload``, an authorization error) and then never
        comes back: such a connection is replaced here, so a process is never cut off NATS.
        """
        client = self._client
        if client is not None and not client.is_closed:
            return client
        with self._lock:
            client = self._client
            if client is not None and client.is_closed:
                logger.warning("NATS connection is closed (%s); connecting again", client.last_error)
                self._client = client = None
            if client is None:
                # While NATS is unreachable, callers fail at once instead of each waiting out
                # a connect timeout; one attempt per wait goes through, the wait doubling.
                now = time.monotonic()
                if now < self._retry_at:
                    raise PublishError("NATS is unreachable (retrying)", reason="unreachable")
                try:
                    client = self.run(JetStream.connect(name=f"birb-nest-api-{os.getpid()}"), timeout=4)
                    self.run(client.ensure_streams(), timeout=5)
                except Exception:
                    self._retry_at = time.monotonic() + self._retry_wait
                    self._retry_wait = min(self._retry_wait * 2, RECONNECT_MAX)
                    raise
                self._retry_wait = RECONNECT_INTERVAL
                self._client = client
        return client

    def _connected(self, client: JetStream, timeout: float) -> bool:
        """Whether the connection is up, waiting (at most ``timeout``) for a reconnection that
        began less than :data:`RECONNECT_GRACE` ago: a cluster node died and nats-py is moving
        to another one. Nothing is published meanwhile, so nothing waits in nats-py's buffer."""
        if client.nc.is_connected:
            self._down_since = None
            return True
        now = time.monotonic()
        down_since = self._down_since = self._down_since or now
        until = min(down_since + RECONNECT_GRACE, now + timeout)
        while time.monotonic() < until and not client.is_closed:
            time.sleep(0.01)
            if client.nc.is_connected:
                self._down_since = None
                return True
        return False

    def message_limit(self) -> int | None:
        """The largest persist message (payload + headers) this process may send: the server's
        ``max_payload`` less :data:`DEAD_LETTER_HEADROOM`; None while not connected."""
        try:
            client = self.client()
        except Exception:  # unreachable: the publish that follows answers for it
            return None
        if not client.nc.is_connected:
            return None
        return client.max_payload - DEAD_LETTER_HEADROOM

    def close(self, timeout: float = 3.0) -> None:
        """Close the connection, if any; the next call connects again."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            self.run(client.close(), timeout)

    def publish(
        self, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float, new_only: bool = False
    ) -> int:
        """Publish and wait for the PubAck (see :meth:`JetStream.publish`); the stream sequence.

        With tracing on, a PRODUCER span covers it and the message carries its W3C
        ``traceparent``, which the worker continues (here, in the caller's thread: the span
        current in a request is not current on the publisher's loop).
        """
        if tracing.enabled:
            with tracing.span(
                f"send {subject}",
                kind=tracing.SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": subject,
                    "messaging.message.id": headers.get("Nats-Msg-Id", ""),
                    "messaging.message.body.size": len(payload),
                },
            ) as span:
                headers = dict(headers)
                tracing.inject(headers)
                seq = self._publish(subject, payload, headers=headers, timeout=timeout, new_only=new_only)
                span.set_attribute("messaging.nats.stream.sequence", seq)
                return seq
        return self._publish(subject, payload, headers=headers, timeout=timeout, new_only=new_only)

    def _publish(
        self, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float, new_only: bool = False
    ) -> int:
        try:
            client = self.client()
        except PublishError:
            raise
        except Exception as error:
            raise PublishError(
                f"cannot connect to NATS: {type(error).__name__}: {error}", reason="unreachable"
            ) from error
        if not self._connected(client, timeout):
            # nats-py would buffer the message until it reconnects; a write must not wait on that.
            raise PublishError("not connected to NATS (reconnecting)", reason="not_connected")
        try:
            return self.run(
                client.publish(subject, payload, headers=headers, timeout=timeout, new_only=new_only), timeout + 1
            )
        except TimeoutError as error:
            raise PublishError("no PubAck within the publish timeout", reason="timeout") from error

    def publish_many(
        self, messages: list[tuple[str, bytes, dict[str, str]]], *, timeout: float, new_only: bool = False
    ) -> list[int | PublishError | MessageTooLargeError]:
        """Publish every ``(subject, payload, headers)`` concurrently on the connection and wait
        for each PubAck (see :meth:`JetStream.publish`): for each message, in order, its stream
        sequence or why it is not durable. One traced PRODUCER span covers them all."""
        if not messages:
            return []
        if tracing.enabled:
            with tracing.span(
                f"send {messages[0][0]} x{len(messages)}",
                kind=tracing.SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": messages[0][0],
                    "messaging.batch.message_count": len(messages),
                },
            ):
                traced = []
                for subject, payload, headers in messages:
                    headers = dict(headers)
                    tracing.inject(headers)
                    traced.append((subject, payload, headers))
                return self._publish_many(traced, timeout=timeout, new_only=new_only)
        return self._publish_many(messages, timeout=timeout, new_only=new_only)

    def _publish_many(
        self, messages: list[tuple[str, bytes, dict[str, str]]], *, timeout: float, new_only: bool
    ) -> list[int | PublishError | MessageTooLargeError]:
        try:
            client = self.client()
        except PublishError as error:
            return [error] * len(messages)
        except Exception as error:
            failed = PublishError(f"cannot connect to NATS: {type(error).__name__}: {error}", reason="unreachable")
            return [failed] * len(messages)
        if not self._connected(client, timeout):
            return [PublishError("not connected to NATS (reconnecting)", reason="not_connected")] * len(messages)

        async def publish_all() -> list[Any]:
            return await asyncio.gather(
                *(
                    client.publish(subject, payload, headers=headers, timeout=timeout, new_only=new_only)
                    for subject, payload, headers in messages
                ),
                return_exceptions=True,
            )

        try:
            results = self.run(publish_all(), timeout + 1)
        except TimeoutError:
            return [PublishError("no PubAck within the publish timeout", reason="timeout")] * len(messages)
        answers: list[int | PublishError | MessageTooLargeError] = []
        for result in results:
            if isinstance(result, int | PublishError | MessageTooLargeError):
                answers.append(result)
            else:  # not raised by JetStream.publish itself: a bug, but still "not durable"
                answers.append(PublishError(f"{type(result).__name__}: {result}", reason="error"))
        return answers

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the worker has acknowledged (or dead-lettered) every message published so
        far; False if that did not happen within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            client = self.client()
            target = self.run(client.stream_state(), 2)["last_seq"]
            while True:
                state = self.run(client.consumer_state(), 2) if target else {}
                # Drained: acknowledged up to the target, or nothing left to deliver and nothing
                # awaiting an ack (the floor can stay below the target when messages after it
                # were purged or deleted, e.g. after the consumer was recreated).
                if (
                    target == 0
                    or state["ack_floor_stream_seq"] >= target
                    or (state["num_pending"] == 0 and state["num_ack_pending"] == 0)
                ):
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
        except Exception as error:
            logger.warning("cannot tell whether the persist backlog drained: %s", error)
            return False

    def healthy(self, timeout: float = 1.0) -> tuple[bool, str]:
        try:
            client = self.client()
            if not client.nc.is_connected:
                return False, "not connected to NATS"
            try:
                self.run(client.js.stream_info(client.names.stream), timeout)
            except nats.js.errors.NotFoundError:
                # Deleted while we run: create it again rather than report it missing until
                # the next write does.
                self.run(client.recreate_streams(), timeout)
                self.run(client.js.stream_info(client.names.stream), timeout)
        except Exception as error:
            return False, f"{type(error).__name__}: {error}".rstrip(": ")
        return True, ""


_publisher: SyncJetStream | None = None
_publisher_lock = threading.Lock()


def publisher() -> SyncJetStream:
    """This process's synchronous JetStream client (a new one after fork)."""
    global _publisher
    if _publisher is None or _publisher._pid != os.getpid():
        with _publisher_lock:
            if _publisher is None or _publisher._pid != os.getpid():
                _publisher = SyncJetStream()
    return _publisher


def close_publisher() -> None:
    """Close this process's publisher connection, if it has one."""
    if _publisher is not None and _publisher._pid == os.getpid():
        _publisher.close()
