"""Cache keys: what a client may use, and every Redis key name the service writes.

:func:`redis_key` is the one builder: it puts ``REDIS_KEY_PREFIX`` in front of a subsystem's own
parts. Each subsystem names its keys through it (entries and counters here, the rate limiter's
in ``ops/ratelimit``, the job runner's lock in ``ops/console/jobs.py``). Django's cache
(``CACHES["default"]["KEY_PREFIX"]``) uses the same prefix plus ``django``.
"""

from __future__ import annotations

import re

from django.conf import settings

KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,255}")
KEY_RULE = "1-255 characters from A-Z a-z 0-9 . _ : -"


def is_valid_key(key: str) -> bool:
    return KEY_PATTERN.fullmatch(key) is not None


def redis_key(*parts: str) -> str:
    """``<REDIS_KEY_PREFIX><part>:<part>…``: the name of a Redis key the service writes."""
    return settings.BIRB.redis_key_prefix + ":".join(parts)


def entry_key(key: str) -> str:
    """Redis hash holding the entry (or its tombstone)."""
    return redis_key("e", key)


def version_key(key: str) -> str:
    """Redis counter holding the last version assigned to the key."""
    return redis_key("n", key)


def strip_entry_prefix(name: str) -> str:
    """The cache key of an entry hash's name (the inverse of :func:`entry_key`)."""
    return name[len(entry_key("")) :]


def counters_marker_key() -> str:
    """Present while Redis holds every version counter assigned since the backlog last drained."""
    return redis_key("meta", "counters-complete")
