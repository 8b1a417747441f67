"""Domain errors raised by the services; cache_api/errors.py maps them to HTTP."""

from __future__ import annotations

from typing import Any


class KeyNotFoundError(Exception):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"key {key!r} not found")


class VersionMismatchError(Exception):
    def __init__(self, key: str, *, expected: int, current: int) -> None:
        self.key = key
        self.expected = expected
        self.current = current
        super().__init__(f"key {key!r} is at version {current}, not {expected}")


class ServiceUnavailableError(Exception):
    """A dependency needed for this operation is down; nothing was changed (or made visible)."""

    def __init__(self, message: str, *, dependency: str, details: Any = None) -> None:
        self.message = message
        self.dependency = dependency
        self.details = details
        super().__init__(message)
