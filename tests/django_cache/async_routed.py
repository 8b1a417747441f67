"""``BirbNestCache`` whose sync methods run its async ones, so that Django's sync test suite
checks the async API too (Django's own async cache tests cover only the dummy backend).

The coroutines run on one event loop in a thread of its own (one ``AsyncClient`` for the run),
the way an ASGI server keeps one loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from birbnest_client.django import BirbNestCache
from django.core.cache.backends.base import DEFAULT_TIMEOUT

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """The coroutine's result (or exception), run on the shared loop."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="async-routed-cache", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _loop).result(60)


class AsyncRoutedBirbNestCache(BirbNestCache):
    """Every method of Django's cache API goes through its ``a…`` twin."""

    def add(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return run(self.aadd(key, value, timeout, version))

    def get(self, key: str, default: Any = None, version: int | None = None) -> Any:
        return run(self.aget(key, default, version))

    def set(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        run(self.aset(key, value, timeout, version))

    def touch(self, key: str, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return run(self.atouch(key, timeout, version))

    def delete(self, key: str, version: int | None = None) -> bool:
        return run(self.adelete(key, version))

    def get_many(self, keys: Iterable[str], version: int | None = None) -> dict[str, Any]:
        return run(self.aget_many(keys, version))

    def get_or_set(self, key: str, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> Any:
        return run(self.aget_or_set(key, default, timeout, version))

    def has_key(self, key: str, version: int | None = None) -> bool:
        return run(self.ahas_key(key, version))

    def incr(self, key: str, delta: int = 1, version: int | None = None) -> Any:
        return run(self.aincr(key, delta, version))

    def decr(self, key: str, delta: int = 1, version: int | None = None) -> Any:
        return run(self.adecr(key, delta, version))

    def set_many(
        self, data: Mapping[str, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[str]:
        return run(self.aset_many(data, timeout, version))

    def delete_many(self, keys: Iterable[str], version: int | None = None) -> None:
        run(self.adelete_many(keys, version))

    def clear(self) -> None:
        run(self.aclear())

    def incr_version(self, key: str, delta: int = 1, version: int | None = None) -> int:
        return run(self.aincr_version(key, delta, version))

    def decr_version(self, key: str, delta: int = 1, version: int | None = None) -> int:
        return run(self.adecr_version(key, delta, version))

    def close(self, **kwargs: Any) -> None:
        run(self.aclose(**kwargs))
