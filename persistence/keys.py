"""Cache keys: what a client may use, and the Redis key names built from them (the only place)."""

from __future__ import annotations

import re

from django.conf import settings

KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,255}")
KEY_RULE = "1-255 characters from A-Z a-z 0-9 . _ : -"


def is_valid_key(key: str) -> bool:
    return KEY_PATTERN.fullmatch(key) is not None


def entry_key(key: str) -> str:
    """Redis hash holding the entry (or its tombstone)."""
    return f"{settings.BIRB.redis_key_prefix}e:{key}"


def version_key(key: str) -> str:
    """Redis counter holding the last version assigned to the key."""
    return f"{settings.BIRB.redis_key_prefix}n:{key}"


def strip_entry_prefix(redis_key: str) -> str:
    return redis_key[len(settings.BIRB.redis_key_prefix) + 2 :]


def counters_marker_key() -> str:
    """Present while Redis holds every version counter assigned since the backlog last drained."""
    return f"{settings.BIRB.redis_key_prefix}meta:counters-complete"
