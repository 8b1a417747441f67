"""Inspect and repair JetStream the way the runbook does with the `nats` CLI.

Thin callers: `manage.py jetstream` and the admin console. Every function is synchronous and
runs its requests on the event loop of :func:`persistence.jetstream.publisher`, over a
connection of its own: the publisher's ``client()`` creates the streams when it connects, and
a diagnostic tool must report a missing stream as missing rather than quietly create it.
Only :func:`streams_ensure` creates anything.

Failures are :class:`JetStreamAdminError` subclasses whose message names the stream, consumer
or server and says what to do.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from django.conf import settings

from persistence import jetstream
from persistence.jetstream import JetStream, SyncJetStream

T = TypeVar("T")

REQUEST_TIMEOUT = 6.0  # above nats-py's own 5 s JetStream API timeout, so its error wins
CONNECT_TIMEOUT = 4.0
VIEW_MAX = 1000
LIST_PAGE = 256  # the server's page size for stream and consumer lists

# JetStream API error codes (nats-server's errors.json).
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
NO_MESSAGE_FOUND = 10037


class JetStreamAdminError(Exception):
    """A JetStream inspection or repair request failed; the message says why and what to do."""


class NatsUnavailableError(JetStreamAdminError):
    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach NATS at {url or '(NATS_URL unset)'}: {reason}. "
            "Is nats-server running with JetStream (-js)? Check NATS_URL, or start the dev stack with `make run`."
        )


class StreamNotFoundError(JetStreamAdminError):
    def __init__(self, stream: str, *, existing: list[str]) -> None:
        self.stream = stream
        self.existing = existing
        known = ", ".join(existing) if existing else "none"
        super().__init__(
            f"stream {stream!r} not found (streams on this server: {known}). Stream names are case-sensitive; "
            "to create ours, run `manage.py jetstream ensure` (the API also creates them on its first write)."
        )


class ConsumerNotFoundError(JetStreamAdminError):
    def __init__(self, stream: str, consumer: str, *, existing: list[str]) -> None:
        self.stream = stream
        self.consumer = consumer
        self.existing = existing
        known = ", ".join(existing) if existing else "none"
        super().__init__(
            f"consumer {consumer!r} not found on stream {stream!r} (its consumers: {known}). "
            "Workers create theirs when they start; or run `manage.py jetstream ensure`."
        )


class JetStreamRequestError(JetStreamAdminError):
    def __init__(self, what: str, *, code: int | None, err_code: int | None, description: str) -> None:
        self.code = code
        self.err_code = err_code
        self.description = description
        super().__init__(f"{what}: JetStream refused the request: {description} (code {code}, err_code {err_code})")


@dataclass(frozen=True)
class AccountSummary:
    """`nats account info`: this account's JetStream usage and limits (-1 = unlimited)."""

    server_url: str
    server_version: str
    domain: str | None
    memory: int
    storage: int
    streams: int
    consumers: int
    max_memory: int
    max_storage: int
    max_streams: int
    max_consumers: int
    api_requests: int
    api_errors: int


@dataclass(frozen=True)
class PeerSummary:
    """A replica of a stream or consumer on another node (its leader's view of it)."""

    name: str
    current: bool  # caught up with the leader
    offline: bool
    active: float | None  # seconds since the leader last heard from it
    lag: int  # operations behind the leader


@dataclass(frozen=True)
class ClusterSummary:
    """Where a stream or consumer lives on a NATS cluster: its leader (None while one is being
    elected) and its other replicas. A single server reports itself as the leader, no replicas."""

    name: str | None
    leader: str | None
    replicas: list[PeerSummary]
    leader_since: datetime | None = None


@dataclass(frozen=True)
class StreamSummary:
    """One row of `nats stream ls` / `nats stream report`."""

    name: str
    subjects: list[str]
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    deleted: int
    consumers: int
    replicas: int = 1
    cluster: ClusterSummary | None = None


@dataclass(frozen=True)
class StreamConfigSummary:
    retention: str
    storage: str
    discard: str
    max_msgs: int
    max_bytes: int
    max_age: float  # seconds, 0 = unlimited
    max_msg_size: int
    duplicate_window: float
    replicas: int


@dataclass(frozen=True)
class StreamDetail:
    """`nats stream info`: the stream's state and configuration."""

    state: StreamSummary
    config: StreamConfigSummary
    created: datetime | None


@dataclass(frozen=True)
class ConsumerSummary:
    """`nats consumer info` (and one row of `nats consumer report`)."""

    stream: str
    name: str
    created: datetime | None
    filter_subject: str | None
    ack_policy: str
    deliver_policy: str
    ack_wait: float | None
    max_deliver: int | None
    max_ack_pending: int | None
    num_pending: int
    num_ack_pending: int
    num_redelivered: int
    num_waiting: int
    delivered_stream_seq: int
    delivered_consumer_seq: int
    ack_floor_stream_seq: int
    ack_floor_consumer_seq: int
    last_active: datetime | None
    replicas: int = 1  # the stream's when the consumer's own is 0 (it follows its stream)
    cluster: ClusterSummary | None = None


@dataclass(frozen=True)
class StreamMessage:
    """One stored message; ``data`` is the decoded JSON, else the text, else base64 (``encoding`` says)."""

    seq: int
    subject: str
    time: datetime | None
    headers: dict[str, str]
    size: int
    encoding: str  # "json" | "text" | "base64"
    data: Any


@dataclass(frozen=True)
class StreamView:
    """`nats stream view`: messages read by sequence, without a consumer."""

    stream: str
    first_seq: int
    last_seq: int
    messages: list[StreamMessage] = field(default_factory=list)


@dataclass(frozen=True)
class EnsureReport:
    """What `streams_ensure` found and created."""

    stream: str
    dlq_stream: str
    consumer: str
    created: list[str]


# --- the connection ---------------------------------------------------------------------------

_lock = threading.Lock()
_cached: tuple[SyncJetStream, str, JetStream] | None = None


def _loop_and_client() -> tuple[SyncJetStream, JetStream]:
    """The publisher's loop and this module's connection on it (a new one after fork or a URL change)."""
    global _cached
    sync = jetstream.publisher()
    url = settings.BIRB.nats_url
    with _lock:
        if _cached is not None and _cached[0] is sync and _cached[1] == url and not _cached[2].nc.is_closed:
            return sync, _cached[2]
        try:
            client = sync.run(JetStream.connect(name=f"birb-nest-admin-{os.getpid()}"), timeout=CONNECT_TIMEOUT)
        except TimeoutError as error:
            raise NatsUnavailableError(url, "no connection within the connect timeout") from error
        except Exception as error:
            raise NatsUnavailableError(url, f"{type(error).__name__}: {error}".rstrip(": ")) from error
        previous, _cached = _cached, (sync, url, client)
    if previous is not None and previous[0] is sync:
        with contextlib.suppress(Exception):  # the old connection is abandoned either way
            sync.run(previous[2].close(), timeout=2)
    return sync, client


def close_connection() -> None:
    """Close this module's connection, if it has one (the next request connects again)."""
    global _cached
    with _lock:
        cached, _cached = _cached, None
    if cached is not None and cached[0]._pid == os.getpid():
        cached[0].run(cached[2].close(), timeout=2)


def _run(
    request: Callable[[JetStream], Coroutine[Any, Any, T]],
    *,
    stream: str | None = None,
    consumer: str | None = None,
) -> T:
    """Run one request; JetStream and connection errors become :class:`JetStreamAdminError`."""
    sync, client = _loop_and_client()
    try:
        return sync.run(request(client), timeout=REQUEST_TIMEOUT)
    except TimeoutError as error:
        raise NatsUnavailableError(settings.BIRB.nats_url, "no reply within the request timeout") from error
    except Exception as error:
        translated = _translate(error, stream=stream, consumer=consumer)
        if translated is error:
            raise
        raise translated from error


def _translate(error: Exception, *, stream: str | None, consumer: str | None) -> Exception:
    """The :class:`JetStreamAdminError` for a nats-py error (matched by its attributes: only
    :mod:`persistence.jetstream` imports nats); any other exception is returned unchanged."""
    err_code = getattr(error, "err_code", None)
    description = getattr(error, "description", None)
    if stream and err_code == STREAM_NOT_FOUND:
        return StreamNotFoundError(stream, existing=_names_or_empty(_stream_names))
    if stream and consumer and err_code == CONSUMER_NOT_FOUND:
        return ConsumerNotFoundError(stream, consumer, existing=_names_or_empty(lambda: _consumer_names(stream)))
    if hasattr(error, "err_code") and hasattr(error, "code"):  # any other JetStream API error
        what = f"consumer {consumer!r} on stream {stream!r}" if consumer else f"stream {stream!r}"
        return JetStreamRequestError(
            what, code=getattr(error, "code", None), err_code=err_code, description=description or str(error)
        )
    if isinstance(error, OSError) or type(error).__module__.startswith("nats."):
        # nats.errors.NoRespondersError: connected, but nothing answers $JS.API (no -js).
        reason = f"{type(error).__name__}: {error}".rstrip(": ")
        return NatsUnavailableError(settings.BIRB.nats_url, reason)
    return error


def _names_or_empty(names: Callable[[], list[str]]) -> list[str]:
    try:
        return names()
    except Exception:
        return []


def _stream_names() -> list[str]:
    return [s.name for s in streams_report()]


def _consumer_names(stream: str) -> list[str]:
    return [c.name for c in consumers_report(stream=stream)]


# --- reports ----------------------------------------------------------------------------------


def _value(enum_or_str: Any) -> str:
    return str(getattr(enum_or_str, "value", enum_or_str) or "")


def _cluster_summary(cluster: Any) -> ClusterSummary | None:
    if cluster is None:
        return None
    return ClusterSummary(
        name=cluster.name,
        leader=cluster.leader or None,
        replicas=[
            PeerSummary(
                name=str(peer.name),
                current=bool(peer.current),
                offline=bool(peer.offline),
                active=peer.active / 1e9 if peer.active else None,  # the server says nanoseconds
                lag=int(peer.lag or 0),
            )
            for peer in cluster.replicas or []
        ],
        leader_since=getattr(cluster, "leader_since", None),
    )


def _stream_summary(info: Any) -> StreamSummary:
    state = info.state
    return StreamSummary(
        name=info.config.name,
        subjects=list(info.config.subjects or []),
        messages=int(state.messages or 0),
        bytes=int(state.bytes or 0),
        first_seq=int(state.first_seq or 0),
        last_seq=int(state.last_seq or 0),
        deleted=int(state.num_deleted or 0),
        consumers=int(state.consumer_count or 0),
        replicas=int(info.config.num_replicas or 1),
        cluster=_cluster_summary(info.cluster),
    )


def _consumer_summary(info: Any) -> ConsumerSummary:
    config = info.config
    delivered, floor = info.delivered, info.ack_floor
    return ConsumerSummary(
        stream=info.stream_name,
        name=info.name,
        created=info.created,
        filter_subject=config.filter_subject,
        ack_policy=_value(config.ack_policy),
        deliver_policy=_value(config.deliver_policy),
        ack_wait=config.ack_wait,
        max_deliver=config.max_deliver,
        max_ack_pending=config.max_ack_pending,
        num_pending=int(info.num_pending or 0),
        num_ack_pending=int(info.num_ack_pending or 0),
        num_redelivered=int(info.num_redelivered or 0),
        num_waiting=int(info.num_waiting or 0),
        delivered_stream_seq=int(delivered.stream_seq if delivered else 0),
        delivered_consumer_seq=int(delivered.consumer_seq if delivered else 0),
        ack_floor_stream_seq=int(floor.stream_seq if floor else 0),
        ack_floor_consumer_seq=int(floor.consumer_seq if floor else 0),
        last_active=delivered.last_active if delivered else None,
        # 0 = as many as the stream: then the leader and its peers tell how many there are.
        replicas=int(config.num_replicas or 0) or _group_size(info.cluster),
        cluster=_cluster_summary(info.cluster),
    )


def _group_size(cluster: Any) -> int:
    """Nodes holding a replica: the leader and its peers (while there is no leader, every peer is listed)."""
    if cluster is None:
        return 1
    members = {peer.name for peer in cluster.replicas or []} | ({cluster.leader} if cluster.leader else set())
    return max(len(members), 1)


def account_info() -> AccountSummary:
    """`nats account info`: the server we are connected to and the account's JetStream usage."""
    info = _run(lambda c: c.js.account_info())
    _, client = _loop_and_client()
    uri, version = client.nc.connected_url, client.nc.connected_server_version
    # Scheme, host and port only: the URL may carry credentials.
    server_url = f"{uri.scheme}://{uri.hostname}:{uri.port}" if uri else ""
    limits = info.limits
    return AccountSummary(
        server_url=server_url,
        server_version=f"{version.major}.{version.minor}.{version.patch}",
        domain=info.domain,
        memory=int(info.memory),
        storage=int(info.storage),
        streams=int(info.streams),
        consumers=int(info.consumers),
        max_memory=int(limits.max_memory),
        max_storage=int(limits.max_storage),
        max_streams=int(limits.max_streams),
        max_consumers=int(limits.max_consumers),
        api_requests=int(info.api.total),
        api_errors=int(info.api.errors),
    )


def streams_report() -> list[StreamSummary]:
    """`nats stream ls` / `nats stream report`: every stream of the account, by name."""
    summaries: list[StreamSummary] = []
    while True:
        offset = len(summaries)
        # _run awaits the request before returning: this iteration's offset is the one sent.
        page = _run(lambda c: c.js.streams_info(offset=offset))  # noqa: B023
        summaries.extend(_stream_summary(info) for info in page)
        if len(page) < LIST_PAGE:
            return sorted(summaries, key=lambda s: s.name)


def stream_info(*, name: str) -> StreamDetail:
    """`nats stream info NAME`."""
    info = _run(lambda c: c.js.stream_info(name), stream=name)
    config = info.config
    return StreamDetail(
        state=_stream_summary(info),
        config=StreamConfigSummary(
            retention=_value(config.retention),
            storage=_value(config.storage),
            discard=_value(config.discard),
            max_msgs=int(config.max_msgs if config.max_msgs is not None else -1),
            max_bytes=int(config.max_bytes if config.max_bytes is not None else -1),
            max_age=float(config.max_age or 0),
            max_msg_size=int(config.max_msg_size if config.max_msg_size is not None else -1),
            duplicate_window=float(config.duplicate_window or 0),
            replicas=int(config.num_replicas or 1),
        ),
        created=info.created,
    )


def consumer_info(*, stream: str, consumer: str) -> ConsumerSummary:
    """`nats consumer info STREAM CONSUMER`."""
    info = _run(lambda c: c.js.consumer_info(stream, consumer), stream=stream, consumer=consumer)
    return _consumer_summary(info)


def consumers_report(*, stream: str) -> list[ConsumerSummary]:
    """`nats consumer report STREAM`: every consumer of the stream, by name."""
    summaries: list[ConsumerSummary] = []
    while True:
        offset = len(summaries)
        # _run awaits the request before returning: this iteration's offset is the one sent.
        page = _run(lambda c: c.js.consumers_info(stream, offset=offset), stream=stream)  # noqa: B023
        summaries.extend(_consumer_summary(info) for info in page)
        if len(page) < LIST_PAGE:
            return sorted(summaries, key=lambda s: s.name)


def _decode(payload: bytes) -> tuple[str, Any]:
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return "base64", base64.b64encode(payload).decode()
    try:
        return "json", json.loads(text)
    except ValueError:
        return "text", text


def _message(raw: Any) -> StreamMessage:
    payload = raw.data or b""
    encoding, data = _decode(payload)
    return StreamMessage(
        seq=int(raw.seq),
        subject=raw.subject or "",
        time=raw.time,
        headers={str(k): str(v) for k, v in (raw.headers or {}).items()},
        size=len(payload),
        encoding=encoding,
        data=data,
    )


def _read_forward(name: str, *, start: int, stop: int, limit: int) -> list[StreamMessage]:
    """Up to ``limit`` messages with ``start <= seq <= stop``, skipping deleted sequences."""
    messages: list[StreamMessage] = []
    seq = start
    while len(messages) < limit and seq <= stop:
        try:
            # The first message at or after `seq` on any subject: one request per message, gaps skipped.
            # _run awaits the request before returning, so `seq` cannot move under it.
            raw = _run(lambda c: c.js.get_msg(name, seq, subject=">", next=True), stream=name)  # noqa: B023
        except JetStreamRequestError as error:
            if error.err_code == NO_MESSAGE_FOUND or error.code == 404:
                break  # nothing at or after `seq` (purged meanwhile, or past the end)
            raise
        if raw.seq > stop:
            break
        messages.append(_message(raw))
        seq = raw.seq + 1
    return messages


def stream_view(*, name: str, last: int | None = None, limit: int = 20, start_seq: int | None = None) -> StreamView:
    """`nats stream view NAME`: the last ``last`` messages, or up to ``limit`` from ``start_seq``
    (default: the first stored message). Reads by sequence number; creates no consumer, so a
    worker's delivery state is untouched.
    """
    if last is not None and start_seq is not None:
        raise ValueError("give either last or start_seq, not both")
    count = last if last is not None else limit
    if not 1 <= count <= VIEW_MAX:
        raise ValueError(f"can show 1 to {VIEW_MAX} messages, not {count}")
    if start_seq is not None and start_seq < 1:
        raise ValueError(f"sequence numbers start at 1, not {start_seq}")
    state = stream_info(name=name).state
    messages: list[StreamMessage] = []
    if state.messages == 0:
        pass
    elif last is None:
        start = max(start_seq or state.first_seq, state.first_seq)
        messages = _read_forward(name, start=start, stop=state.last_seq, limit=count)
    else:
        # The last `count` sequences may include deleted ones: step back until we have enough.
        stop = state.last_seq
        while len(messages) < count and stop >= state.first_seq:
            start = max(state.first_seq, stop - (count - len(messages)) + 1)
            messages = _read_forward(name, start=start, stop=stop, limit=count) + messages
            stop = start - 1
    return StreamView(stream=name, first_seq=state.first_seq, last_seq=state.last_seq, messages=messages[-count:])


# --- repairs ----------------------------------------------------------------------------------


def consumer_delete(*, stream: str, consumer: str) -> None:
    """`nats consumer rm STREAM CONSUMER`. Workers recreate our consumer when they start; it
    then delivers every message still in the stream again (the version check makes that harmless).
    """
    _run(lambda c: c.js.delete_consumer(stream, consumer), stream=stream, consumer=consumer)


def streams_ensure() -> EnsureReport:
    """`nats stream add` for both streams and the worker's durable consumer, as configured in
    :mod:`persistence.jetstream`; what already exists is left as it is.
    """
    n = jetstream.names()
    existing = set(_stream_names())
    consumer_existed = n.stream in existing and n.consumer in _consumer_names(n.stream)

    async def ensure(client: JetStream) -> None:
        await client.ensure_streams()
        await client.ensure_consumer()

    _run(ensure, stream=n.stream)
    created = [f"stream {name}" for name in (n.stream, n.dlq_stream) if name not in existing]
    if not consumer_existed:
        created.append(f"consumer {n.consumer} on {n.stream}")
    return EnsureReport(stream=n.stream, dlq_stream=n.dlq_stream, consumer=n.consumer, created=created)


# --- single messages (the dead-letter service builds on these) --------------------------------


@dataclass(frozen=True)
class RawMessage:
    """A stored message byte for byte, for republishing."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


def message_get(*, stream: str, seq: int) -> RawMessage:
    raw = _run(lambda c: c.js.get_msg(stream, seq), stream=stream)
    return RawMessage(
        seq=int(raw.seq),
        subject=raw.subject or "",
        headers={str(k): str(v) for k, v in (raw.headers or {}).items()},
        data=raw.data or b"",
    )


def message_delete(*, stream: str, seq: int) -> None:
    _run(lambda c: c.js.delete_msg(stream, seq), stream=stream)


def stream_purge(*, name: str) -> None:
    _run(lambda c: c.js.purge_stream(name), stream=name)
