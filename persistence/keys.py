"""Cache keys: what a client may use, and every Redis key name the service writes.

:func:`redis_key` is the one builder: it puts ``REDIS_KEY_PREFIX`` in front of a subsystem's own
parts. Each subsystem names its keys through it (entries and counters here, the rate limiter's
in ``ops/ratelimit``, the job runner's lock in ``ops/console/jobs.py``). Django's cache
(``CACHES["default"]["KEY_PREFIX"]``) uses the same prefix plus ``django``.

**On a Redis Cluster** (``settings.BIRB.redis_cluster``) the names of one cache key's entry hash,
version counter and create reservation carry the key as a hash tag (``<prefix>e:{<key>}``,
``n:{<key>}``, ``c:{<key>}``): they live in one hash slot, so the scripts that touch several of
them run on one node. Cache keys cannot contain braces (:data:`KEY_PATTERN`), nor can the prefix
(``REDIS_KEY_PREFIX`` is refused at start), so the tag is exactly the key. The counters-complete
marker is one per hash slot there (:func:`counters_marker_key`). On a single Redis the names stay
without braces, as they always were: an upgrade keeps using the counters, entries and marker it
finds, and processes of the old and the new version can run side by side.
"""

from __future__ import annotations

import re
from binascii import crc_hqx
from functools import cache

from django.conf import settings

KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,255}")
KEY_RULE = "1-255 characters from A-Z a-z 0-9 . _ : -"

SLOTS = 16384  # Redis Cluster's hash slots


def is_valid_key(key: str) -> bool:
    return KEY_PATTERN.fullmatch(key) is not None


def redis_key(*parts: str) -> str:
    """``<REDIS_KEY_PREFIX><part>:<part>…``: the name of a Redis key the service writes."""
    return settings.BIRB.redis_key_prefix + ":".join(parts)


def _per_key(kind: str, key: str) -> str:
    """``<prefix><kind>:<key>``, or ``<prefix><kind>:{<key>}`` on a Redis Cluster."""
    config = settings.BIRB
    if config.redis_cluster:
        return f"{config.redis_key_prefix}{kind}:{{{key}}}"
    return f"{config.redis_key_prefix}{kind}:{key}"


def entry_key(key: str) -> str:
    """Redis hash holding the entry (or its tombstone)."""
    return _per_key("e", key)


def version_key(key: str) -> str:
    """Redis counter holding the last version assigned to the key."""
    return _per_key("n", key)


def reservation_key(key: str) -> str:
    """Held by the create-only write that won the key until its entry is stored (or it failed)."""
    return _per_key("c", key)


def strip_entry_prefix(name: str) -> str:
    """The cache key of an entry hash's name (the inverse of :func:`entry_key`)."""
    key = name[len(redis_key("e", "")) :]
    if settings.BIRB.redis_cluster and key.startswith("{") and key.endswith("}"):
        return key[1:-1]
    return key


def key_slot(name: str | bytes) -> int:
    """The Redis Cluster hash slot of a Redis key name (its hash tag's, when it has one)."""
    raw = name.encode() if isinstance(name, str) else name
    start = raw.find(b"{")
    if start > -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc_hqx(raw, 0) % SLOTS


@cache
def slot_tags() -> tuple[str, ...]:
    """For each hash slot, a short tag (three letters or digits) whose slot it is: ``{tag}`` in a
    name puts the name in that slot. The same table in every process (about 20 ms, once)."""
    alphabet = [bytes([c]) for c in range(48, 123) if chr(c).isalnum()]
    tags: list[bytes] = [b""] * SLOTS
    left = SLOTS
    for a in alphabet:
        crc_a = crc_hqx(a, 0)
        for b in alphabet:
            crc_b = crc_hqx(b, crc_a)
            for c in alphabet:
                slot = crc_hqx(c, crc_b) % SLOTS
                if not tags[slot]:
                    tags[slot] = a + b + c
                    left -= 1
                    if not left:
                        return tuple(tag.decode() for tag in tags)
    raise AssertionError("three characters reach every slot")


def counters_marker_key(key: str | None = None) -> str:
    """Present while Redis holds every version counter assigned since the backlog last drained.

    One key on a single Redis. On a Redis Cluster one per hash slot, in that slot (``key`` says
    whose slot): a script reads it next to the counter (both on one node), and a shard that loses
    its data loses exactly the markers of its own slots.
    """
    if key is None or not settings.BIRB.redis_cluster:
        return redis_key("meta", "counters-complete")
    return counters_marker_key_of_slot(key_slot(key))


def counters_marker_key_of_slot(slot: int) -> str:
    """The counters-complete marker of one hash slot (Redis Cluster)."""
    return redis_key("meta", "counters-complete", f"{{{slot_tags()[slot]}}}")


def counters_marker_keys() -> list[str]:
    """Every marker :func:`counters_marker_key` can name: one, or one per slot on a cluster."""
    if not settings.BIRB.redis_cluster:
        return [counters_marker_key()]
    return [counters_marker_key_of_slot(slot) for slot in range(SLOTS)]
