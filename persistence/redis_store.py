"""The hot copy in Redis: one hash per entry, one counter per key, and the Lua scripts that keep
them consistent without a read-then-write race.

Layout (prefix ``REDIS_KEY_PREFIX``):

- ``<prefix>e:<key>`` hash: ``v`` version, ``val`` value (JSON text), ``m`` metadata (JSON text),
  ``c`` created_at, ``u`` updated_at, ``x`` expires_at in epoch milliseconds (empty = never).
  Expires by itself at ``x``. A delete leaves a tombstone hash ``{v, t=1}`` for
  ``TOMBSTONE_RETENTION`` so a late, older write cannot bring the key back and a read does not
  fall through to a PostgreSQL row the worker has not deleted yet.
  When the worker persists a version newer than the hash, the hash becomes a stale marker
  ``{v, e=1, c}`` for ``STALE_MARK_MS``: reads treat it as a miss (and load PostgreSQL's row),
  a write still in flight with an older version is not stored over it, and a write does not
  count as creating the key.
- ``<prefix>n:<key>`` counter: the last version assigned to the key. When it is missing (new key,
  or Redis lost its data) it is seeded from the highest version PostgreSQL knows.
- ``<prefix>c:<key>`` create reservation: the version of the create-only write
  (``If-None-Match: *``) that won the key, from its version until its entry is stored; the
  other create-only writers meanwhile find the key taken. Expires by itself (a crashed writer).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django_redis import get_redis_connection
from redis import Redis
from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from birbnest import tracing
from persistence.keys import counters_marker_key, entry_key, redis_key, version_key

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


def client() -> Redis:
    """The raw redis-py client, from django-redis's connection pool."""
    return get_redis_connection("default")


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


# --- the hot path: one round trip, without the client's per-command layers ----------------------


class _Pinned(threading.local):
    connection: AbstractConnection | None = None
    # (key, HGETALL reply) read ahead in the same round trip as the rate limiter's script
    prefetched: tuple[str, Any] | None = None


_pinned = _Pinned()


def _pinned_connection() -> AbstractConnection:
    connection = _pinned.connection
    if connection is None:
        # A connection of this thread's own, with the client's settings, not checked out of its
        # pool: the server retires idle request threads, and a connection it never returned
        # would count against the pool for good. It closes when the thread's storage is freed.
        pool = client().connection_pool
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
    """
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


def read_command(key: str) -> tuple[Any, ...]:
    """The command whose reply :func:`entry_from_reply` reads."""
    return ("HGETALL", entry_key(key))


def entry_from_reply(key: str, reply: Any) -> StoredEntry | Tombstone | None:
    """The entry, a tombstone, or None, from the reply to :func:`read_command`."""
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


def reservation_key(key: str) -> str:
    """Held by the create-only write that won the key until its entry is stored (or it failed)."""
    return redis_key("c", key)


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
            [version_key(key), counters_marker_key(), entry_key(key), reservation_key(key)],
            [floor_arg, counter_ttl_ms, reservation_ttl_ms, "" if absent_at is None else absent_at],
        )
    return ASSIGN_VERSION.command(
        [version_key(key), counters_marker_key()], [floor_arg, "" if if_match is None else if_match, counter_ttl_ms]
    )


ASSIGN_SCRIPTS = (ASSIGN_VERSION, ASSIGN_CREATE)


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
    floors for counters Redis lacks (see services._version_floor)."""
    client().set(counters_marker_key(), "1")


def store_args(entry: StoredEntry) -> list[Any]:
    """ARGV of the store script for one entry (also used pipelined by rehydration)."""
    expires = "" if entry.expires_at_ms is None else entry.expires_at_ms
    return [entry.version, entry.value_json, entry.metadata_json, entry.created_at, entry.updated_at, expires]


def store(entry: StoredEntry) -> tuple[bool, bool, str]:
    """Store unless a newer version is there. Returns (stored, is_new, created_at)."""
    stored, is_new, created = STORE_ENTRY([entry_key(entry.key)], store_args(entry))
    return bool(stored), bool(is_new), _text(created)


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
    replies = round_trip(*commands, scripts=(STORE_ENTRY,)) if commands else []
    return [
        reply if isinstance(reply, ResponseError) else (bool(reply[0]), bool(reply[1]), _text(reply[2]))
        for reply in replies
    ]


def store_tombstones(versions: list[tuple[str, int]], *, ttl_ms: int) -> list[bool | ResponseError]:
    """:func:`store_tombstone` for several keys in one round trip (or Redis's error reply)."""
    commands = [STORE_TOMBSTONE.command([entry_key(key)], [version, ttl_ms]) for key, version in versions]
    replies = round_trip(*commands, scripts=(STORE_TOMBSTONE,)) if commands else []
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
        dropped += int(EVICT_STALE([entry_key(key) for key, _ in chunk], [mark_ms, *(v for _, v in chunk)]))
    return dropped


def evict(key: str) -> bool:
    return bool(client().delete(entry_key(key)))


def ping() -> bool:
    return bool(client().ping())


def namespace_flush(*, chunk: int = 500) -> int:
    """Delete every key the service keeps in Redis (all of ``REDIS_KEY_PREFIX``: entries, version
    counters and their marker, rate-limit state, the API-key document, Django's cache) and
    nothing else: the runbook's FLUSHDB for a Redis that other programs may share. The number
    of keys deleted. Everything in it is rebuilt from PostgreSQL (see :mod:`persistence.rehydration`)."""
    redis = client()
    pattern = settings.BIRB.redis_key_prefix.replace("\\", "\\\\")
    for special in "*?[]":
        pattern = pattern.replace(special, "\\" + special)
    deleted = 0
    batch: list[bytes] = []
    for name in redis.scan_iter(match=pattern + "*", count=1000):
        batch.append(name)
        if len(batch) >= chunk:
            deleted += int(redis.unlink(*batch))
            batch = []
    if batch:
        deleted += int(redis.unlink(*batch))
    return deleted
