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


class PayloadTooLargeError(Exception):
    """A write whose persist message (value, metadata, key, envelope and headers) would be
    larger than the NATS server accepts; refused before anything was changed."""

    def __init__(self, *, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"write message of up to {size} bytes exceeds the {limit} bytes NATS accepts")


class BatchTooLargeError(Exception):
    """A batch read whose entries hold more than the answer may carry (``MAX_BATCH_RESPONSE_SIZE``)."""

    def __init__(self, *, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"the entries hold at least {size} bytes; an answer may carry {limit}")


class PreconditionFailedError(Exception):
    """A create-only write (``If-None-Match: *``) found the key live; nothing was changed."""

    def __init__(self, key: str, *, current: int) -> None:
        self.key = key
        self.current = current
        super().__init__(f"key {key!r} exists (version {current})")
