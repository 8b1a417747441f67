"""Typed results: :class:`Entry` (a cache entry) and :class:`BatchResult` (one key of a batch write)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from birbnest_client import errors


def _timestamp(raw: Any) -> datetime:
    # The service writes ISO 8601 in UTC with a "Z" ("2026-12-01T03:04:05.123456Z").
    return datetime.fromisoformat(str(raw).replace("Z", "+00:00"))


@dataclass(frozen=True)
class Entry:
    """A cache entry as the service answers it.

    ``value`` is the decoded JSON value, ``version`` the key's version (it only grows),
    ``ttl`` the seconds left (None: never expires), ``metadata`` the entry's metadata object,
    ``created_at`` / ``updated_at`` aware UTC datetimes.
    """

    key: str
    value: Any
    version: int
    ttl: int | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(
            key=data["key"],
            value=data["value"],
            version=int(data["version"]),
            ttl=None if data.get("ttl") is None else int(data["ttl"]),
            metadata=dict(data.get("metadata") or {}),
            created_at=_timestamp(data["created_at"]),
            updated_at=_timestamp(data["updated_at"]),
        )


@dataclass(frozen=True)
class BatchResult:
    """One key's result in a batch write (``set_many`` / ``delete_many``), in request order.

    ``status`` is the per-key HTTP status (201 created, 200 replaced, 204 deleted, 404, 409, 412,
    503…); ``version`` the version written (or deleted at); ``created`` for writes, ``deleted``
    for deletes; ``error`` the per-key error as an exception object (not raised), else None.
    """

    key: str
    status: int
    version: int | None = None
    created: bool | None = None
    deleted: bool | None = None
    error: errors.BirbNestError | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        """True when this key's write or delete was made (2xx)."""
        return 200 <= self.status < 300

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchResult:
        status = int(data["status"])
        error = None
        if not 200 <= status < 300:
            error = errors.from_answer(status, data)
        version = data.get("version")
        return cls(
            key=data["key"],
            status=status,
            version=None if version is None else int(version),
            created=data.get("created"),
            deleted=data.get("deleted"),
            error=error,
        )


__all__ = ["BatchResult", "Entry"]
