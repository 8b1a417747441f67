"""The hot copy in Redis: one hash per entry, one counter per key, and the Lua scripts that keep
them consistent without a read-then-write race.

Layout (prefix ``REDIS_KEY_PREFIX``):

- ``<prefix>e:<key>`` hash: ``v`` version, ``val`` value (JSON text), ``m`` metadata (JSON text),
  ``c`` created_at, ``u`` updated_at, ``x`` expires_at in epoch milliseconds (empty = never).
  Expires by itself at ``x``. A delete leaves a tombstone hash ``{v, t=1}`` for
  ``TOMBSTONE_RETENTION`` so a late, older write cannot bring the key back and a read does not
  fall through to a PostgreSQL row the worker has not deleted yet.
  A read that found the key absent in PostgreSQL leaves a negative entry: a tombstone at version
  0, ``{v=0, t=1}``, for ``NEGATIVE_CACHE_TTL``, so the next reads answer "absent" from Redis.
  Every write and delete replaces it (its version is above 0), and it is stored only while no
  hash is there and the key's counter has not moved since before PostgreSQL was asked
  (:func:`remember_absent`): a write that came between is never hidden.
  When the worker persists a version newer than the hash, the hash becomes a stale marker
  ``{v, e=1, c}`` for ``STALE_MARK_MS``: reads treat it as a miss (and load PostgreSQL's row),
  a write still in flight with an older version is not stored over it, and a write does not
  count as creating the key.
- ``<prefix>n:<key>`` counter: the last version assigned to the key. When it is missing (new key,
  or Redis lost its data) it is seeded from the highest version PostgreSQL knows.
- ``<prefix>c:<key>`` create reservation: the version of the create-only write
  (``If-None-Match: *``) that won the key, from its version until its entry is stored; the
  other create-only writers meanwhile find the key taken. Expires by itself (a crashed writer).

**Redis Cluster** (``REDIS_CLUSTER=true`` or a ``redis+cluster://`` URL): the same hashes and
scripts, with the key as a hash tag in each name (``<prefix>e:{<key>}``, ``n:{<key>}``,
``c:{<key>}``: one slot, so every script runs on one node) and one counters-complete marker per
hash slot (see :mod:`persistence.keys`). :func:`round_trip` keeps its contract: it groups the
commands by the node serving their slot (redis-py's slot table and node pools), writes to every
node before reading, and follows MOVED / ASK and failovers for at most
:data:`CLUSTER_RETRY_SECONDS`; then the error raises (the request answers 503). A version is
handed out only once ``REDIS_CLUSTER_WAIT_REPLICAS`` replicas of its master hold it (``WAIT``
after the script, in the same round trip): else :class:`ReplicasNotReachedError` (503, nothing
published), so a replica promoted after a failover never hands out a version already
acknowledged. Entries and tombstones just stored are waited for the same way, without refusing
(the write is durable by then): a failover does not bring back a deleted value.
:func:`client` is redis-py's ``RedisCluster`` there.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django_redis import get_redis_connection
from redis import Redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import AbstractConnection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    TimeoutError,
    TryAgainError,
)
from redis.retry import Retry

from birbnest import tracing
from birbnest.env import redis_cluster_seeds
from persistence.keys import (
    counters_marker_key,
    counters_marker_keys,
    entry_key,
    key_slot,
    reservation_key,
    version_key,
)

logger = logging.getLogger(__name__)

# KEYS: counter, counters marker. ARGV: floor ('' = unknown), if_match ('' = none), counter ttl ms.
# -> {1, version} | {-1, marker exists} seed needed | {-2, current} If-Match mismatch
_ASSIGN_VERSION = """
local n = redis.call('GET', KEYS[1])
if not n then
  if ARGV[1] == '' then return {-1, redis.call('EXISTS', KEYS[2])} end
  n = ARGV[1]
end
n = tonumber(n)
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= n then return {-2, n} end
n = n + 1
redis.call('SET', KEYS[1], n, 'PX', ARGV[3])
return {1, n}
"""

# A create-only write (``If-None-Match: *``): the next version only if the key does not exist.
# KEYS: counter, counters marker, entry hash, create reservation.
# ARGV: floor ('' = unknown), counter ttl ms, reservation ttl ms, absent_at ('' = not known).
# The key exists when the hash holds a live entry, or another create-only write holds the
# reservation (it won: of concurrent create-only writers exactly one gets a version). A tombstone
# says it does not. Without either (no hash, or a stale marker) only PostgreSQL can tell: the
# caller asks it and says "absent at version n" (absent_at), which holds while the counter is n.
# The winner reserves the key until its store (STORE_ENTRY with the reservation as KEYS[2]) or
# its failure (RELEASE_RESERVATION); a crashed writer's reservation expires.
# -> {1, version} | {-1, marker exists} seed needed | {-3, current} the key exists
#    | {-4, counter} PostgreSQL must say whether the key is live at that version
_ASSIGN_CREATE = """
local n = redis.call('GET', KEYS[1])
if not n then
  if ARGV[1] == '' then return {-1, redis.call('EXISTS', KEYS[2])} end
  n = ARGV[1]
end
n = tonumber(n)
local r = redis.call('GET', KEYS[4])
if r then return {-3, tonumber(r)} end
local h = redis.call('HMGET', KEYS[3], 'v', 't', 'e')
if h[1] and not h[2] and not h[3] then return {-3, tonumber(h[1])} end
if not h[2] and (ARGV[4] == '' or tonumber(ARGV[4]) ~= n) then return {-4, n} end
n = n + 1
redis.call('SET', KEYS[1], n, 'PX', ARGV[2])
redis.call('SET', KEYS[4], n, 'PX', ARGV[3])
return {1, n}
"""

# KEYS: create reservation. ARGV: version. Drops the reservation if that write still holds it.
_RELEASE_RESERVATION = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV: version, value, metadata, created_at, updated_at, expires_at ms ('' = never).
# Stores unless the hash already holds a newer version, or this one (an entry or tombstone; a
# stale marker at this version is replaced: it stands for this very row of PostgreSQL).
# KEYS[2], when given: the create reservation this write (a create-only one) holds, dropped.
# -> {stored, is_new, created_at}
_STORE_ENTRY = """
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local cur = redis.call('HMGET', KEYS[1], 'v', 'c', 't', 'e')
local v = tonumber(ARGV[1])
if cur[1] then
  local held = tonumber(cur[1])
  if held > v or (held == v and not cur[4]) then return {0, 0, cur[2] or ARGV[4]} end
end
local created = ARGV[4]
local is_new = 1
if cur[1] and not cur[3] and cur[2] then
  created = cur[2]
  is_new = 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', v, 'val', ARGV[2], 'm', ARGV[3], 'c', created, 'u', ARGV[5], 'x', ARGV[6])
if ARGV[6] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[6]) end
return {1, is_new, created}
"""

# ARGV: version, tombstone ttl ms. -> 1 stored, 0 a newer version is already there.
_STORE_TOMBSTONE = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 't', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# A negative entry: the key is absent, as PostgreSQL said on a read that missed Redis.
# KEYS: entry hash, version counter. ARGV: the counter as read before PostgreSQL was asked
# ('' = there was none), lifetime in ms. Stored only if no hash is there (an entry, tombstone or
# stale marker stored meanwhile stands) and the counter is what it was: a write or delete that
# took a version since may not be in PostgreSQL's answer, and would be hidden.
# It is a tombstone at version 0, so every write's and delete's store replaces it. -> 1 stored, 0 not.
_STORE_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = redis.call('GET', KEYS[2])
if (n or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', '0', 't', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Drops hashes older than what PostgreSQL now holds (left by an API process that crashed
# between the PubAck and its Redis write, or by a write still on its way to Redis).
# KEYS: entry hashes. ARGV[1]: stale-marker lifetime in ms, 0 = delete outright (an operator's
# eviction); ARGV[i + 1]: the persisted version of KEYS[i]. -> the number dropped.
# With a marker, the hash becomes {v = persisted version, e = 1, c = its created_at} and expires
# within ARGV[1] ms (sooner if the entry would have): the next read misses and loads the row, and
# an older write still in flight is refused instead of being stored as if the key were new.
_EVICT_STALE = """
local mark = tonumber(ARGV[1])
local dropped = 0
for i, key in ipairs(KEYS) do
  local cur = redis.call('HMGET', key, 'v', 'c')
  local persisted = ARGV[i + 1]
  if cur[1] and tonumber(cur[1]) < tonumber(persisted) then
    dropped = dropped + 1
    if mark > 0 then
      local ttl = redis.call('PTTL', key)
      redis.call('DEL', key)
      redis.call('HSET', key, 'v', persisted, 'e', '1')
      if cur[2] then redis.call('HSET', key, 'c', cur[2]) end
      if ttl < 0 or ttl > mark then ttl = mark end
      redis.call('PEXPIRE', key, ttl)
    else
      redis.call('DEL', key)
    end
  end
end
return dropped
"""
STALE_MARK_MS = 60_000  # outlives any write still in flight (publish timeout plus a Redis call)
EVICT_CHUNK = 500  # keys per script call: bounds the time Redis spends in one call


@dataclass(frozen=True)
class StoredEntry:
    """An entry as Redis (or PostgreSQL) holds it; value and metadata stay JSON text."""

    key: str
    version: int
    value_json: bytes
    metadata_json: bytes
    created_at: str
    updated_at: str
    expires_at_ms: int | None

    def ttl(self, now_ms: int | None = None) -> int | None:
        """Seconds left (rounded up), or None for no expiry."""
        if self.expires_at_ms is None:
            return None
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return max(0, -(-(self.expires_at_ms - now_ms) // 1000))

    def to_json(self) -> bytes:
        """The contract's entry body, without decoding the value."""
        return orjson.dumps(
            {
                "key": self.key,
                "value": orjson.Fragment(self.value_json),
                "version": self.version,
                "ttl": self.ttl(),
                "metadata": orjson.Fragment(self.metadata_json),
                "created_at": self.created_at,
                "updated_at": self.updated_at,
            }
        )

    def as_dict(self) -> dict[str, Any]:
        return orjson.loads(self.to_json())


class Tombstone:
    """Marker returned by :func:`read` for a key deleted recently (Redis knows it is gone)."""


TOMBSTONE = Tombstone()


def client() -> Redis | RedisCluster:
    """The raw redis-py client: django-redis's pooled one, or on a Redis Cluster redis-py's
    ``RedisCluster`` (it routes each command to the node serving its slot, follows MOVED / ASK
    and retries a failover a few times; its errors are all ``RedisError``)."""
    if settings.BIRB.redis_cluster:
        return cluster_client()
    return get_redis_connection("default")


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


# --- the hot path: one round trip, without the client's per-command layers ----------------------


class _Pinned(threading.local):
    connection: AbstractConnection | None = None
    # On a Redis Cluster: a connection per node, by node name (host:port)
    nodes: dict[str, AbstractConnection] | None = None
    # (key, HGETALL reply) read ahead in the same round trip as the rate limiter's script
    prefetched: tuple[str, Any] | None = None


_pinned = _Pinned()


def _pinned_connection() -> AbstractConnection:
    connection = _pinned.connection
    if connection is None:
        # A connection of this thread's own, with the client's settings, not checked out of its
        # pool: the server retires idle request threads, and a connection it never returned
        # would count against the pool for good. It closes when the thread's storage is freed.
        pool = get_redis_connection("default").connection_pool
        connection = _pinned.connection = pool.connection_class(**pool.connection_kwargs)
    return connection


def _send(commands: tuple[tuple[Any, ...], ...], *, max_bytes: int | None = None) -> list[Any]:
    """Send the commands in one write and read every reply (an error reply as the
    ``ResponseError``). With ``max_bytes``, :class:`ReadTooLargeError` as soon as the replies hold
    more text than that, the rest left unread (the connection is dropped)."""
    if tracing.enabled and tracing.in_span():
        # A span per round trip of a traced operation (a request, a worker batch); background
        # round trips (the rate limiter's refresh, say) would only add traces of their own.
        with tracing.span(
            _span_name(commands),
            kind=tracing.SpanKind.CLIENT,
            attributes={"db.system.name": "redis", "db.operation.batch.size": len(commands)},
        ):
            return _send_untraced(commands, max_bytes=max_bytes)
    return _send_untraced(commands, max_bytes=max_bytes)


def _cluster_send_traced(
    commands: tuple[tuple[Any, ...], ...], *, max_bytes: int | None = None, waited: Collection[str] = ()
) -> tuple[list[Any], dict[int, int]]:
    """:func:`_cluster_send` under a span, as :func:`_send`."""
    if tracing.enabled and tracing.in_span():
        with tracing.span(
            _span_name(commands),
            kind=tracing.SpanKind.CLIENT,
            attributes={"db.system.name": "redis", "db.operation.batch.size": len(commands)},
        ):
            return _cluster_send(commands, max_bytes=max_bytes, waited=waited)
    return _cluster_send(commands, max_bytes=max_bytes, waited=waited)


def _span_name(commands: tuple[tuple[Any, ...], ...]) -> str:
    """``redis EVALSHA assign_version``, ``redis EVALSHA ratelimit_hit + HGETALL``: what one round
    trip did, scripts by name."""
    operations = []
    for command in commands[:4]:
        name = str(command[0])
        if name == "EVALSHA":
            name = f"EVALSHA {HotScript.names.get(command[1], str(command[1])[:8])}"
        if name not in operations:
            operations.append(name)
    return "redis " + " + ".join(operations) + (" ..." if len(commands) > 4 else "")


def _send_untraced(commands: tuple[tuple[Any, ...], ...], *, max_bytes: int | None = None) -> list[Any]:
    connection = _pinned_connection()
    packed = connection.pack_commands(commands)
    for attempt in (1, 2):
        try:
            connection.send_packed_command(packed)
            replies: list[Any] = []
            size = 0
            for _ in commands:
                try:
                    reply = connection.read_response()
                except ResponseError as error:  # read every reply, or the connection is out of step
                    reply = error
                if max_bytes is not None:
                    size += _reply_size(reply)
                    if size > max_bytes:
                        raise ReadTooLargeError(size=size, limit=max_bytes)
                replies.append(reply)
            return replies
        except (ConnectionError, TimeoutError):
            connection.disconnect()  # Redis restarted or the socket died: reconnect, send once more
            if attempt == 2:
                raise
        except ReadTooLargeError:
            connection.disconnect()  # replies left unread: the connection is out of step
            raise
    raise AssertionError("unreachable")


class HotScript:
    """A Lua script sent by its SHA in :func:`round_trip` (loaded on NOSCRIPT)."""

    # Script names by SHA, for span names (birbnest/tracing.py).
    names: dict[str, str] = {}

    def __init__(self, source: str, name: str = "") -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        if name:
            HotScript.names[self.sha] = name

    def command(self, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def __call__(self, keys: list[str], args: list[Any]) -> Any:
        """Run it alone (one round trip); an error reply raises."""
        return checked(round_trip(self.command(keys, args), scripts=(self,))[0])


def checked(reply: Any) -> Any:
    """A reply from :func:`round_trip`, or the ``ResponseError`` it is, raised."""
    if isinstance(reply, ResponseError):
        raise reply
    return reply


def round_trip(*commands: tuple[Any, ...], scripts: tuple[HotScript, ...] = ()) -> list[Any]:
    """Send the commands in one write and read their replies: one network round trip.

    The hot path (a cache hit, plus the rate limiter's script when it is on), the write path's
    scripts and batched work (rehydration, evict_stale) use this rather than the client:
    redis-py's pool checkout and retry wrappers around every command were a third of a cache
    hit's CPU. Each thread keeps one connection. A reply that is an error is
    returned as the ``ResponseError``, not raised; connection failures raise (``RedisError``)
    after one reconnect. ``scripts`` are loaded and everything sent again if Redis lacks one.

    On a Redis Cluster: one write per node (all written before any is read), replies in the
    commands' order; a version script's reply is :class:`ReplicasNotReachedError` when its master
    could not confirm ``REDIS_CLUSTER_WAIT_REPLICAS`` replicas have it (see the module docstring).
    """
    if settings.BIRB.redis_cluster:
        return _cluster_round_trip(commands, scripts=scripts)
    replies = _send(commands)
    if scripts and any(isinstance(reply, NoScriptError) for reply in replies):
        for script in scripts:
            client().script_load(script.source)
        replies = _send(commands)
    return replies


ASSIGN_VERSION = HotScript(_ASSIGN_VERSION, "assign_version")
ASSIGN_CREATE = HotScript(_ASSIGN_CREATE, "assign_create")
RELEASE_RESERVATION = HotScript(_RELEASE_RESERVATION, "release_reservation")
STORE_ENTRY = HotScript(_STORE_ENTRY, "store_entry")
STORE_TOMBSTONE = HotScript(_STORE_TOMBSTONE, "store_tombstone")
EVICT_STALE = HotScript(_EVICT_STALE, "evict_stale")
STORE_ABSENT = HotScript(_STORE_ABSENT, "store_absent")
ASSIGN_SCRIPTS = (ASSIGN_VERSION, ASSIGN_CREATE)


# --- Redis Cluster -------------------------------------------------------------------------------

# How long a round trip keeps following a cluster that is changing (a failover, a slot moving)
# before its error raises: a request answers 503 then rather than hang. A failover takes about
# cluster-node-timeout plus a second or two: longer than this, so clients see seconds of 503.
CLUSTER_RETRY_SECONDS = 1.0
# How long a master waits for its replicas to acknowledge a version (WAIT's timeout). Replicas on
# a working network answer in well under a millisecond; a master whose replica is gone makes each
# write wait this long before it is refused.
WAIT_TIMEOUT_MS = 1000
# Socket timeouts of the cluster client's connections, in seconds.
CLUSTER_CONNECT_TIMEOUT = 1.0
CLUSTER_SOCKET_TIMEOUT = 2.0
# Retries of a command sent through the client (not round_trip) after a connection error, a
# CLUSTERDOWN or an uncovered slot; MOVED and ASK are followed without counting.
CLUSTER_CLIENT_RETRIES = 3


class ReplicasNotReachedError(ResponseError):
    """A version script ran on a master that could not confirm, within :data:`WAIT_TIMEOUT_MS`,
    that ``REDIS_CLUSTER_WAIT_REPLICAS`` of its replicas hold the result: the version is not
    handed out (a failover to a replica without it could hand it out again)."""


class ClusterUnavailableError(ConnectionError):
    """The Redis Cluster could not be reached or does not serve the slot (redis-py raises its
    ``RedisClusterException`` for these, which is not a ``RedisError``)."""


class _Cluster(RedisCluster):
    """redis-py's cluster client, whose every failure is a ``RedisError`` (callers catch that)."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)
        except RedisClusterException as error:
            raise ClusterUnavailableError(str(error)) from error


class _ClusterHolder:
    lock = threading.Lock()
    current: tuple[str, _Cluster] | None = None
    refreshed_at = 0.0


def cluster_client() -> RedisCluster:
    """The process's ``RedisCluster`` (made on first use from ``REDIS_URL``'s seed nodes).

    :class:`ClusterUnavailableError` when no seed node answers.
    """
    url = settings.BIRB.redis_url
    current = _ClusterHolder.current
    if current is not None and current[0] == url:
        return current[1]
    with _ClusterHolder.lock:
        current = _ClusterHolder.current
        if current is not None and current[0] == url:
            return current[1]
        seeds = redis_cluster_seeds(url)
        try:
            made = _Cluster(
                startup_nodes=[ClusterNode(host, port) for host, port in seeds.nodes],
                username=seeds.username,
                password=seeds.password,
                ssl=url.startswith("rediss://"),
                socket_timeout=CLUSTER_SOCKET_TIMEOUT,
                socket_connect_timeout=CLUSTER_CONNECT_TIMEOUT,
                health_check_interval=30,
                max_connections=256,
                # A node answering while a shard is down still serves the other slots.
                require_full_coverage=False,
                retry=Retry(NoBackoff(), CLUSTER_CLIENT_RETRIES),
            )
        except RedisClusterException as error:
            raise ClusterUnavailableError(f"no Redis Cluster seed node answered: {error}") from error
        if current is not None:
            current[1].close()
        _ClusterHolder.current = (url, made)
        return made


def _refresh_topology(cluster: RedisCluster) -> None:
    """Ask the cluster again which node serves which slot (at most every 0.2 s per process)."""
    now = time.monotonic()
    if now - _ClusterHolder.refreshed_at < 0.2:
        return
    _ClusterHolder.refreshed_at = now
    try:
        cluster.nodes_manager.initialize()
    except Exception as error:  # no node answers: the next try asks again
        logger.debug("Redis Cluster topology not refreshed: %s", error)


def command_slot(command: tuple[Any, ...]) -> int | None:
    """The hash slot a command of :func:`round_trip` works on (its first key's), or None for a
    command without keys."""
    if command[0] in ("EVALSHA", "EVAL"):
        return key_slot(command[3]) if int(command[2]) > 0 else None
    return key_slot(command[1]) if len(command) > 1 else None


def group_by_node(
    commands: tuple[tuple[Any, ...], ...] | list[tuple[Any, ...]],
    node_of_slot: Any,
    *,
    default: Any = None,
    indices: list[int] | None = None,
) -> dict[Any, list[int]]:
    """The indices of the commands (all, or ``indices``) by the node serving their slot
    (``node_of_slot(slot)``), each node's in the callers' order. A command without keys goes to
    ``default``."""
    groups: dict[Any, list[int]] = {}
    for index in range(len(commands)) if indices is None else indices:
        slot = command_slot(commands[index])
        groups.setdefault(default if slot is None else node_of_slot(slot), []).append(index)
    return groups


_UNSERVED: Any = object()  # group_by_node's node for a slot no master serves now


class _Pending:
    """A reply not read yet."""


_PENDING = _Pending()
_ASKING = -1  # in a node's layout: the reply of an ASKING
_WAIT = -2  # in a node's layout: the reply of the WAIT


def _node_connection(cluster: RedisCluster, node: ClusterNode) -> AbstractConnection:
    """This thread's own connection to the node (as :func:`_pinned_connection` for one Redis)."""
    connections = _pinned.nodes
    if connections is None:
        connections = _pinned.nodes = {}
    connection = connections.get(node.name)
    if connection is None:
        pool = cluster.get_redis_connection(node).connection_pool
        connection = connections[node.name] = pool.connection_class(**pool.connection_kwargs)
    return connection


def _cluster_send(
    commands: tuple[tuple[Any, ...], ...] | list[tuple[Any, ...]],
    *,
    max_bytes: int | None = None,
    waited: Collection[str] = (),
) -> tuple[list[Any], dict[int, int]]:
    """The replies to the commands in their order (error replies as the ``ResponseError``), and,
    for each script command whose SHA is in ``waited``, how many replicas acknowledged it: a
    ``WAIT REDIS_CLUSTER_WAIT_REPLICAS`` goes after the commands of each node that ran one, on
    the same connection (WAIT counts that connection's writes).

    Every node's commands are written before any reply is read. A command answered MOVED, ASK,
    TRYAGAIN or CLUSTERDOWN, or whose node could not be reached, is sent again (to the node the
    cluster now names) until it gets a reply or :data:`CLUSTER_RETRY_SECONDS` have passed; then
    its error raises. With ``max_bytes``, :class:`ReadTooLargeError` as in :func:`_send`.
    """
    cluster = cluster_client()
    replicas = settings.BIRB.redis_cluster_wait_replicas if waited else 0
    replies: list[Any] = [_PENDING] * len(commands)
    acks: dict[int, int] = {}
    asking: dict[int, ClusterNode] = {}
    todo = list(range(len(commands)))
    deadline = 0.0
    pause = 0.0
    size = 0
    while todo:
        failure: Exception | None = None
        retry: list[int] = []

        def node_of(slot: int) -> Any:
            try:
                return cluster.nodes_manager.get_node_from_slot(slot)
            except RedisClusterException:  # SlotNotCoveredError: its master is down, no replica took over
                return _UNSERVED

        routed = [index for index in todo if index not in asking]
        groups = group_by_node(commands, node_of, default=cluster.get_default_node(), indices=routed)
        for index, node in asking.items():  # an ASK names the node for this one try
            groups.setdefault(node, []).append(index)
        unserved = groups.pop(_UNSERVED, [])
        if unserved:
            failure = ClusterUnavailableError(f"{len(unserved)} commands' slots are not served by any master")
            retry.extend(unserved)
        sent: list[tuple[AbstractConnection, list[int], list[int]]] = []
        for node, indices in groups.items():
            indices.sort()
            parts: list[tuple[Any, ...]] = []
            layout: list[int] = []
            wait = False
            for index in indices:
                if index in asking:
                    parts.append(("ASKING",))
                    layout.append(_ASKING)
                command = commands[index]
                parts.append(command)
                layout.append(index)
                wait = wait or (replicas > 0 and command[0] == "EVALSHA" and command[1] in waited)
            if wait:
                parts.append(("WAIT", replicas, WAIT_TIMEOUT_MS))
                layout.append(_WAIT)
            connection = _node_connection(cluster, node)
            try:
                connection.send_packed_command(connection.pack_commands(parts))
            except (ConnectionError, TimeoutError) as error:
                connection.disconnect()
                failure = error
                retry.extend(indices)
                continue
            sent.append((connection, indices, layout))
        asking = {}
        for position, (connection, indices, layout) in enumerate(sent):
            read: list[int] = []
            try:
                for item in layout:
                    try:
                        reply = connection.read_response()
                    except ResponseError as error:
                        reply = error
                    if item == _ASKING:
                        continue
                    if item == _WAIT:
                        for index in read:
                            acks[index] = reply if isinstance(reply, int) else 0
                        continue
                    if isinstance(reply, MovedError):
                        cluster.nodes_manager.move_slot(reply)
                        retry.append(item)
                        continue
                    if isinstance(reply, AskError):
                        target = cluster.get_node(host=reply.host, port=reply.port)
                        if target is None:
                            failure = reply
                        else:
                            asking[item] = target
                        retry.append(item)
                        continue
                    if isinstance(reply, (TryAgainError, ClusterDownError)):
                        failure = reply
                        retry.append(item)
                        continue
                    if max_bytes is not None:
                        size += _reply_size(reply)
                        if size > max_bytes:
                            for unread, *_ in sent[position:]:
                                unread.disconnect()  # replies left unread: out of step
                            raise ReadTooLargeError(size=size, limit=max_bytes)
                    replies[item] = reply
                    if commands[item][0] == "EVALSHA" and commands[item][1] in waited:
                        read.append(item)
            except (ConnectionError, TimeoutError) as error:
                # A command sent but unanswered may have run: the ones sent again here are
                # safe to repeat (a version script hands out a new version; the others are
                # idempotent or, the rate limiter's count, harmless to count twice).
                connection.disconnect()
                failure = error
                retry.extend(index for index in indices if replies[index] is _PENDING)
        todo = sorted(set(retry))
        if not todo:
            break
        now = time.monotonic()
        if not deadline:
            deadline = now + CLUSTER_RETRY_SECONDS
        elif now > deadline:
            if failure is None:
                failure = ClusterUnavailableError("the Redis Cluster kept redirecting the commands")
            raise failure
        if failure is not None:
            _refresh_topology(cluster)
            if pause:
                time.sleep(min(pause, max(0.0, deadline - now)))
            pause = min(0.4, pause * 2 or 0.05)
    return replies, acks


# Scripts whose writes a round trip on a cluster waits for: version assignment (refused when
# short), and the stores of a write just made durable (best effort).
_ASSIGN_SHAS = frozenset(script.sha for script in ASSIGN_SCRIPTS)
_STORE_SHAS = frozenset(script.sha for script in (STORE_ENTRY, STORE_TOMBSTONE, EVICT_STALE))


def _cluster_round_trip(
    commands: tuple[tuple[Any, ...], ...], *, scripts: tuple[HotScript, ...] = (), wait_stores: bool = False
) -> list[Any]:
    """:func:`round_trip` on a Redis Cluster. Version scripts are always waited for (and refused
    below ``REDIS_CLUSTER_WAIT_REPLICAS``); with ``wait_stores`` the store scripts too, only
    logged when short (they are durable already)."""
    waited = _ASSIGN_SHAS | _STORE_SHAS if wait_stores else _ASSIGN_SHAS
    replies, acks = _cluster_send_traced(commands, waited=waited)
    missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if scripts and missing:
        redis = cluster_client()
        for script in scripts:
            redis.script_load(script.source)  # every master
        again, again_acks = _cluster_send_traced(tuple(commands[index] for index in missing), waited=waited)
        for index, reply in zip(missing, again, strict=True):
            replies[index] = reply
            if index in acks:
                del acks[index]
        acks.update({missing[position]: count for position, count in again_acks.items()})
    required = settings.BIRB.redis_cluster_wait_replicas
    if required:
        released: list[tuple[Any, ...]] = []
        short = 0
        for index, command in enumerate(commands):
            if command[0] != "EVALSHA" or command[1] not in waited:
                continue
            # No count: the connection failed before WAIT answered; nothing confirms the write.
            count = acks.get(index, 0)
            reply = replies[index]
            if count >= required or isinstance(reply, ResponseError):
                continue
            if command[1] not in _ASSIGN_SHAS:
                short += 1
                continue
            if isinstance(reply, list) and reply and reply[0] == 1:  # a version was handed out
                replies[index] = ReplicasNotReachedError(
                    f"NOREPLICAS {count} of {required} replicas acknowledged the version within {WAIT_TIMEOUT_MS} ms"
                )
                if command[1] == ASSIGN_CREATE.sha:  # give the key back to the next create-only write
                    released.append(RELEASE_RESERVATION.command([command[6]], [reply[1]]))
        if short:
            logger.warning(
                "%d stored entries not confirmed by %d Redis replicas within %d ms (durable; a failover "
                "meanwhile may serve an older copy until the next write)",
                short,
                required,
                WAIT_TIMEOUT_MS,
            )
        if released:
            try:
                _cluster_round_trip(tuple(released), scripts=(RELEASE_RESERVATION,))
            except (ConnectionError, TimeoutError, ResponseError) as error:
                logger.warning("create reservations kept until they expire: %s", error)
    return replies


def read_command(key: str) -> tuple[Any, ...]:
    """The command whose reply :func:`entry_from_reply` reads."""
    return ("HGETALL", entry_key(key))


def entry_from_reply(key: str, reply: Any) -> StoredEntry | Tombstone | None:
    """The entry, a tombstone (or a negative entry: a tombstone at version 0), or None, from the
    reply to :func:`read_command`."""
    reply = checked(reply)
    if isinstance(reply, list):  # RESP2: field, value, field, value, ...
        reply = dict(zip(reply[::2], reply[1::2], strict=True))
    if not reply:
        return None
    if b"t" in reply:
        return TOMBSTONE
    if b"e" in reply:  # stale marker: PostgreSQL holds a newer version
        return None
    return _entry_from_hash(key, reply)


def prefetched_set(key: str, reply: Any) -> None:
    """Keep a reply to ``read_command(key)`` for this thread's next :func:`read` of the key."""
    _pinned.prefetched = (key, reply)


def prefetched_clear() -> None:
    _pinned.prefetched = None


def read(key: str) -> StoredEntry | Tombstone | None:
    """One round trip: the entry, a tombstone, or None when Redis does not have the key.

    No round trip at all when the rate limiter already read the key in its own (see
    ``ops.ratelimit.limiter.ratelimit_check``): the reply is used once, by the request that asked.
    """
    prefetched = _pinned.prefetched
    if prefetched is not None and prefetched[0] == key:
        _pinned.prefetched = None
        return entry_from_reply(key, prefetched[1])
    return entry_from_reply(key, round_trip(read_command(key))[0])


def version_counters(keys: list[str]) -> list[bytes | None]:
    """One round trip: each key's version counter as Redis holds it (None: no counter), read
    before PostgreSQL is asked whether the key exists, to guard :func:`remember_absent`."""
    if not keys:
        return []
    return [checked(reply) for reply in round_trip(*(("GET", version_key(key)) for key in keys))]


def remember_absent(counters: list[tuple[str, bytes | None]], *, ttl_ms: int) -> list[bool | ResponseError]:
    """Leave a negative entry for each key PostgreSQL said is absent (one round trip), given its
    counter as :func:`version_counters` read it before PostgreSQL was asked. For each: whether it
    was stored (not when a hash is there or the counter moved), or Redis's error reply."""
    commands = [
        STORE_ABSENT.command([entry_key(key), version_key(key)], [b"" if counter is None else counter, ttl_ms])
        for key, counter in counters
    ]
    replies = round_trip(*commands, scripts=(STORE_ABSENT,)) if commands else []
    return [reply if isinstance(reply, ResponseError) else bool(reply) for reply in replies]


class ReadTooLargeError(Exception):
    """The entries asked for hold more than the caller allowed; nothing is returned."""

    def __init__(self, *, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"the entries hold more than {limit} bytes (at least {size})")


def read_many(keys: list[str], *, max_bytes: int | None = None) -> list[StoredEntry | Tombstone | None]:
    """One round trip for all the keys.

    With ``max_bytes``, the replies are read one at a time and counted (value and metadata
    text); once they exceed it, :class:`ReadTooLargeError` is raised and the connection is
    dropped with the rest of the replies unread, so a request never holds more than about
    ``max_bytes`` of entries in memory.
    """
    if not keys:
        return []
    if max_bytes is None:
        replies = round_trip(*(read_command(key) for key in keys))
    elif settings.BIRB.redis_cluster:
        replies = _cluster_send_traced(tuple(read_command(key) for key in keys), max_bytes=max_bytes)[0]
    else:
        replies = _send(tuple(read_command(key) for key in keys), max_bytes=max_bytes)
    return [entry_from_reply(key, reply) for key, reply in zip(keys, replies, strict=True)]


def _reply_size(reply: Any) -> int:
    """Bytes of text in an ``HGETALL`` reply (RESP2 list or RESP3 map)."""
    if isinstance(reply, dict):
        return sum(len(field) + len(value) for field, value in reply.items())
    if isinstance(reply, list):
        return sum(len(item) for item in reply)
    return 0


def _entry_from_hash(key: str, fields: dict[bytes, bytes]) -> StoredEntry:
    expires = fields.get(b"x") or b""
    return StoredEntry(
        key=key,
        version=int(fields[b"v"]),
        value_json=fields[b"val"],
        metadata_json=fields[b"m"],
        created_at=_text(fields[b"c"]),
        updated_at=_text(fields[b"u"]),
        expires_at_ms=int(expires) if expires else None,
    )


class SeedNeededError(Exception):
    """The key has no version counter in Redis; the caller must give a floor.

    ``counters_complete`` tells whether the marker set by :func:`mark_counters_complete` is
    there: if it is, Redis has not lost its counters since, so PostgreSQL's version is a safe
    floor; if not (a new or emptied Redis), writes still in flight may carry higher versions.
    """

    def __init__(self, key: str, *, counters_complete: bool) -> None:
        self.key = key
        self.counters_complete = counters_complete
        super().__init__(key)


class VersionConflictError(Exception):
    def __init__(self, current: int) -> None:
        self.current = current
        super().__init__(f"current version is {current}")


class KeyExistsError(Exception):
    """A create-only write found the key live (or reserved by another create-only write)."""

    def __init__(self, current: int) -> None:
        self.current = current
        super().__init__(f"the key exists at version {current}")


class ExistenceUnknownError(Exception):
    """A create-only write found no entry in Redis: PostgreSQL must say whether the key is live
    at version ``counter`` (then the write is sent again with ``absent_at``)."""

    def __init__(self, counter: int) -> None:
        self.counter = counter
        super().__init__(f"is the key live at version {counter}?")


def assign_command(
    key: str,
    *,
    floor: int | None,
    if_match: int | None,
    counter_ttl_ms: int,
    create_only: bool = False,
    reservation_ttl_ms: int = 0,
    absent_at: int | None = None,
) -> tuple[Any, ...]:
    """The command whose reply :func:`assigned_version` reads: the next version of the key, with
    ``If-Match`` (``if_match``) or ``If-None-Match: *`` (``create_only``) checked in the same step."""
    floor_arg = "" if floor is None else floor
    if create_only:
        return ASSIGN_CREATE.command(
            [version_key(key), counters_marker_key(key), entry_key(key), reservation_key(key)],
            [floor_arg, counter_ttl_ms, reservation_ttl_ms, "" if absent_at is None else absent_at],
        )
    return ASSIGN_VERSION.command(
        [version_key(key), counters_marker_key(key)],
        [floor_arg, "" if if_match is None else if_match, counter_ttl_ms],
    )


def assigned_version(key: str, reply: Any) -> int:
    """The version a reply to :func:`assign_command` gives, or the reason it gives none:
    :class:`SeedNeededError`, :class:`VersionConflictError`, :class:`KeyExistsError`,
    :class:`ExistenceUnknownError` (or Redis's error reply, raised)."""
    status, number = checked(reply)
    if status == -1:
        raise SeedNeededError(key, counters_complete=bool(number))
    if status == -2:
        raise VersionConflictError(int(number))
    if status == -3:
        raise KeyExistsError(int(number))
    if status == -4:
        raise ExistenceUnknownError(int(number))
    return int(number)


def assign_version(key: str, *, floor: int | None, if_match: int | None, counter_ttl_ms: int) -> int:
    command = assign_command(key, floor=floor, if_match=if_match, counter_ttl_ms=counter_ttl_ms)
    return assigned_version(key, round_trip(command, scripts=ASSIGN_SCRIPTS)[0])


def release_reservation(key: str, version: int) -> None:
    """A create-only write that failed gives the key back to the next one."""
    RELEASE_RESERVATION([reservation_key(key)], [version])


def mark_counters_complete() -> None:
    """Record that every write still in flight is persisted, so PostgreSQL's versions are safe
    floors for counters Redis lacks (see services._version_floor). On a Redis Cluster every
    slot's marker, one write per node."""
    if not settings.BIRB.redis_cluster:
        client().set(counters_marker_key(), "1")
        return
    replies, _ = _cluster_send([("SET", name, "1") for name in counters_marker_keys()])
    for reply in replies:
        checked(reply)


def store_args(entry: StoredEntry) -> list[Any]:
    """ARGV of the store script for one entry (also used pipelined by rehydration)."""
    expires = "" if entry.expires_at_ms is None else entry.expires_at_ms
    return [entry.version, entry.value_json, entry.metadata_json, entry.created_at, entry.updated_at, expires]


def store(entry: StoredEntry) -> tuple[bool, bool, str]:
    """Store unless a newer version is there. Returns (stored, is_new, created_at)."""
    stored, is_new, created = STORE_ENTRY([entry_key(entry.key)], store_args(entry))
    return bool(stored), bool(is_new), _text(created)


def _stores_round_trip(commands: list[tuple[Any, ...]], script: HotScript) -> list[Any]:
    """The stores of writes just made durable; on a Redis Cluster their replicas are waited for
    in the same round trip (best effort: a failover then keeps what was acknowledged)."""
    if settings.BIRB.redis_cluster:
        return _cluster_round_trip(tuple(commands), scripts=(script,), wait_stores=True)
    return round_trip(*commands, scripts=(script,))


def store_written(
    entries: list[StoredEntry], *, reserved: frozenset[str] = frozenset()
) -> list[tuple[bool, bool, str] | ResponseError]:
    """Store the entries of just-made writes in one round trip, each unless a newer version is
    there: (stored, is_new, created_at) for each, or Redis's error reply. The keys in ``reserved``
    (create-only writes) give their create reservation back in the same step."""
    commands = [
        STORE_ENTRY.command(
            [entry_key(e.key), reservation_key(e.key)] if e.key in reserved else [entry_key(e.key)], store_args(e)
        )
        for e in entries
    ]
    replies = _stores_round_trip(commands, STORE_ENTRY) if commands else []
    return [
        reply if isinstance(reply, ResponseError) else (bool(reply[0]), bool(reply[1]), _text(reply[2]))
        for reply in replies
    ]


def store_tombstones(versions: list[tuple[str, int]], *, ttl_ms: int) -> list[bool | ResponseError]:
    """:func:`store_tombstone` for several keys in one round trip (or Redis's error reply)."""
    commands = [STORE_TOMBSTONE.command([entry_key(key)], [version, ttl_ms]) for key, version in versions]
    replies = _stores_round_trip(commands, STORE_TOMBSTONE) if commands else []
    return [reply if isinstance(reply, ResponseError) else bool(reply) for reply in replies]


def store_many(entries: list[StoredEntry], *, force: bool = False) -> list[bool | ResponseError]:
    """Store a batch in one round trip (rehydration); for each entry, whether it was stored (or
    Redis's error reply for it). The same version-guarded script as :func:`store`; with ``force``
    the Redis copy is deleted first, so the entry replaces whatever was there."""
    if not entries:
        return []
    commands: list[tuple[Any, ...]] = []
    for entry in entries:
        if force:
            commands.append(("DEL", entry_key(entry.key)))
        commands.append(STORE_ENTRY.command([entry_key(entry.key)], store_args(entry)))
    replies = round_trip(*commands, scripts=(STORE_ENTRY,))
    if force:
        replies = [
            delete if isinstance(delete, ResponseError) else stored
            for delete, stored in zip(replies[::2], replies[1::2], strict=True)
        ]
    return [reply if isinstance(reply, ResponseError) else bool(reply[0]) for reply in replies]


@dataclass(frozen=True)
class Held:
    """What Redis holds for a key: nothing (version None), an entry, or a tombstone."""

    version: int | None
    tombstone: bool = False

    @property
    def live(self) -> bool:
        return self.version is not None and not self.tombstone


def held_many(keys: list[str]) -> dict[str, Held]:
    """One round trip: the version Redis holds for each key, and whether it is a tombstone (the
    console's "in Redis" column). A stale marker holds no entry: not held."""
    if not keys:
        return {}
    replies = round_trip(*(("HMGET", entry_key(key), "v", "t", "e") for key in keys))
    held = {}
    for key, reply in zip(keys, replies, strict=True):
        version, tombstone, stale = checked(reply)
        held[key] = Held(None if version is None or stale is not None else int(version), tombstone is not None)
    return held


def store_tombstone(key: str, *, version: int, ttl_ms: int) -> bool:
    return bool(STORE_TOMBSTONE([entry_key(key)], [version, ttl_ms]))


def evict_stale(versions: dict[str, int], *, mark: bool = True) -> int:
    """Drop every hash older than the given persisted versions; one round trip per 500 keys.

    ``mark`` (the worker) leaves a stale marker in its place; without it (an operator's
    eviction) the hash is deleted outright.
    """
    items = list(versions.items())
    mark_ms = STALE_MARK_MS if mark else 0
    dropped = 0
    for start in range(0, len(items), EVICT_CHUNK):
        chunk = items[start : start + EVICT_CHUNK]
        if settings.BIRB.redis_cluster:
            # One script call per key (each key is a slot of its own), pipelined per node.
            commands = tuple(EVICT_STALE.command([entry_key(key)], [mark_ms, version]) for key, version in chunk)
            replies = _cluster_round_trip(commands, scripts=(EVICT_STALE,), wait_stores=True)
            dropped += sum(int(checked(reply)) for reply in replies)
        else:
            dropped += int(EVICT_STALE([entry_key(key) for key, _ in chunk], [mark_ms, *(v for _, v in chunk)]))
    return dropped


def evict(key: str) -> bool:
    return bool(client().delete(entry_key(key)))


def ping() -> bool:
    """Redis answers; on a cluster, every master (a shard down is Redis down for its keys)."""
    redis = client()
    if isinstance(redis, RedisCluster):
        return bool(redis.ping(target_nodes=RedisCluster.PRIMARIES))
    return bool(redis.ping())


def namespace_flush(*, chunk: int = 500) -> int:
    """Delete every key the service keeps in Redis (all of ``REDIS_KEY_PREFIX``: entries, version
    counters and their marker, rate-limit state, the API-key document, Django's cache) and
    nothing else: the runbook's FLUSHDB for a Redis that other programs may share. The number
    of keys deleted. Everything in it is rebuilt from PostgreSQL (see :mod:`persistence.rehydration`).

    On a Redis Cluster the SCAN goes over every master, and each UNLINK is split by slot
    (redis-py's cluster client does both)."""
    redis = client()
    pattern = settings.BIRB.redis_key_prefix.replace("\\", "\\\\")
    for special in "*?[]":
        pattern = pattern.replace(special, "\\" + special)
    deleted = 0
    batch: list[bytes] = []
    try:
        for name in redis.scan_iter(match=pattern + "*", count=1000):
            batch.append(name)
            if len(batch) >= chunk:
                deleted += int(redis.unlink(*batch))
                batch = []
        if batch:
            deleted += int(redis.unlink(*batch))
    except RedisClusterException as error:  # the cluster's per-slot pipeline: a slot not served
        raise ClusterUnavailableError(str(error)) from error
    return deleted
