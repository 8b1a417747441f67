"""A Django cache backend that stores in Birb Nest.

```python
CACHES = {
    "default": {
        "BACKEND": "birbnest_client.django.BirbNestCache",
        "LOCATION": "http://127.0.0.1:8080",
        "OPTIONS": {"API_KEY": "bn_…"},  # or the environment's BIRBNEST_API_KEY
    }
}
```

The whole cache API of Django (sync and async), on the client library: one
:class:`birbnest_client.Client` per configuration, shared by every thread (httpx's pool is
thread-safe), and one :class:`birbnest_client.AsyncClient` per configuration and event loop.

- Keys: Django's key (``KEY_PREFIX``, ``VERSION``, ``KEY_FUNCTION``, with its memcached
  warnings) behind the ``NAMESPACE`` option (default ``"django:"``). A key outside the service's
  alphabet (``A-Za-z0-9._:-``, 1-255 characters) is stored as ``<scope>h.<sha256 hex>``.
- Values: JSON values whose JSON round trip gives back an equal value of the same types are
  stored as that JSON (readable in the console); anything else is pickled and stored as base64
  text with ``metadata={"django": {"encoding": "pickle", …}}``.
- Timeouts: ``None`` never expires (TTL 0), ``0`` or less removes the key (or does not store it),
  fractions round up to whole seconds.
- ``clear()`` deletes the keys of this cache's scope only: ``NAMESPACE + KEY_PREFIX + ":"`` with
  Django's default key function, ``NAMESPACE + KEY_PREFIX`` with a custom one.
- Async: native on ``AsyncClient``; pickling and unpickling run in Django's sync thread.

The client README's "Django cache backend" section has the details and the route of each method.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import pickle
import re
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from asgiref.sync import sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, default_key_func
from django.core.exceptions import ImproperlyConfigured

from birbnest_client import AsyncClient, Client, Entry

__all__ = ["BirbNestCache", "IncrConflictError"]

#: The service's key rule (contract: 1-255 characters of ``A-Z a-z 0-9 . _ : -``).
_KEY_RE = re.compile(r"[A-Za-z0-9._:-]{1,255}")
_KEY_CHARS_RE = re.compile(r"[A-Za-z0-9._:-]*")
MAX_KEY_LENGTH = 255
#: ``h.`` + 64 hex digits: what a hashed key adds to its scope.
_HASHED_LENGTH = 2 + 64
#: The service refuses a TTL over 100 years; Django allows any number.
MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
#: The service stores signed 64-bit integers exactly (its JSON encoder's range).
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
#: Nesting the service encodes (254 levels) with room to spare; deeper values are pickled.
_MAX_JSON_DEPTH = 200
#: incr()/decr() are read + compare-and-set; a key written this often concurrently is a hot spot.
_INCR_ATTEMPTS = 50
#: The metadata that marks a pickled value (the console shows it beside the base64 text).
_META = "django"
_PICKLE = "pickle"
#: A Django timeout that means "expired already" (0 or negative); TTL 0 means "never" here.
_EXPIRED = -1

_OPTIONS = {"API_KEY", "NAMESPACE", "HTTP_TIMEOUT", "RETRIES", "PICKLE_PROTOCOL"}
_CULL_OPTIONS = {"MAX_ENTRIES", "CULL_FREQUENCY"}

_clients: dict[tuple[Any, ...], Client] = {}
_async_clients: dict[tuple[Any, ...], weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient]] = {}
_clients_lock = threading.Lock()


class IncrConflictError(RuntimeError):
    """incr()/decr() lost the compare-and-set race ``attempts`` times in a row."""

    def __init__(self, key: str, attempts: int) -> None:
        super().__init__(
            f"incr/decr of cache key {key!r} lost the race to concurrent writers {attempts} times in a row; "
            "a counter written this often needs its own key per writer (or a retry by the caller)"
        )
        self.key = key
        self.attempts = attempts


class BirbNestCache(BaseCache):
    """Django's cache API on a Birb Nest service (``LOCATION`` = its base URL)."""

    def __init__(self, server: str | list[str] | tuple[str, ...], params: dict[str, Any]) -> None:
        super().__init__(params)
        if isinstance(server, list | tuple):
            if len(server) != 1:
                raise ImproperlyConfigured(
                    f"BirbNestCache LOCATION is one base URL (e.g. 'http://127.0.0.1:8080'), got {server!r}"
                )
            server = server[0]
        if not server or not isinstance(server, str):
            raise ImproperlyConfigured(
                f"BirbNestCache LOCATION must be the service's base URL (e.g. 'http://127.0.0.1:8080'), got {server!r}"
            )
        options = dict(params.get("OPTIONS") or {})
        culling = sorted(_CULL_OPTIONS & set(options))
        if culling:
            raise ImproperlyConfigured(
                f"BirbNestCache does not cull: remove OPTIONS {', '.join(culling)} (entries leave by their "
                "timeout or delete(), never to make room)"
            )
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ImproperlyConfigured(
                f"unknown BirbNestCache OPTIONS {', '.join(unknown)}; the options are {', '.join(sorted(_OPTIONS))}"
            )
        self._location = server.rstrip("/")
        self._api_key: str | None = options.get("API_KEY")
        self._http_timeout = float(options.get("HTTP_TIMEOUT", 5.0))
        self._retries = int(options.get("RETRIES", 3))
        self._pickle_protocol = int(options.get("PICKLE_PROTOCOL", pickle.DEFAULT_PROTOCOL))
        self._namespace = str(options.get("NAMESPACE", "django:"))
        self.key_prefix = str(self.key_prefix)
        # With Django's key function every key is "<KEY_PREFIX>:<version>:<key>", so the ":" makes
        # the scope exact (KEY_PREFIX "a" does not take in KEY_PREFIX "ab"'s keys).
        separator = ":" if self.key_func is default_key_func else ""
        self._scope = self._namespace + self.key_prefix + separator
        if not _KEY_CHARS_RE.fullmatch(self._scope) or len(self._scope) + _HASHED_LENGTH > MAX_KEY_LENGTH:
            raise ImproperlyConfigured(
                f"BirbNestCache NAMESPACE + KEY_PREFIX {self._scope!r} must be at most "
                f"{MAX_KEY_LENGTH - _HASHED_LENGTH} characters of A-Z a-z 0-9 . _ : - (it starts every key)"
            )
        if not self._scope:
            raise ImproperlyConfigured(
                "BirbNestCache NAMESPACE and KEY_PREFIX are both empty: clear() would delete every key of "
                "the service; set NAMESPACE (default 'django:') or KEY_PREFIX"
            )
        self._config = (self._location, self._api_key, self._http_timeout, self._retries)

    # --- clients ---------------------------------------------------------------------------

    @property
    def _client(self) -> Client:
        """The process's client for this configuration (thread-safe: one pool for all threads)."""
        client = _clients.get(self._config)
        if client is None:
            with _clients_lock:
                client = _clients.get(self._config)
                if client is None:
                    client = Client(
                        base_url=self._location,
                        api_key=self._api_key,
                        timeout=self._http_timeout,
                        retries=self._retries,
                    )
                    _clients[self._config] = client
        return client

    @property
    def _aclient(self) -> AsyncClient:
        """The async client of this configuration for the running event loop: an httpx async
        pool belongs to the loop that opened its connections."""
        loop = asyncio.get_running_loop()
        with _clients_lock:
            per_loop = _async_clients.setdefault(self._config, weakref.WeakKeyDictionary())
            client = per_loop.get(loop)
            if client is None:
                client = AsyncClient(
                    base_url=self._location,
                    api_key=self._api_key,
                    timeout=self._http_timeout,
                    retries=self._retries,
                )
                per_loop[loop] = client
        return client

    def close(self, **kwargs: Any) -> None:
        """Django calls this at the end of every request: the shared pool stays open."""

    async def aclose(self, **kwargs: Any) -> None:
        """As :meth:`close`: nothing to do per request."""

    # --- keys, values, timeouts ------------------------------------------------------------

    def nest_key(self, key: str, version: int | None = None) -> str:
        """The Birb Nest key that stores Django's ``key`` (after KEY_FUNCTION and validation)."""
        return self._nest_key(self.make_and_validate_key(key, version=version))

    def _nest_key(self, django_key: str) -> str:
        key = self._namespace + django_key
        if len(key) <= MAX_KEY_LENGTH and _KEY_RE.fullmatch(key):
            return key
        # Deterministic and still inside this cache's scope (so clear() finds it).
        scope = self._scope if key.startswith(self._scope) else self._namespace
        digest = hashlib.sha256(django_key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{scope}h.{digest}"

    def _nest_keys(self, keys: Iterable[str], version: int | None) -> dict[str, str]:
        """Birb Nest key → Django key, in the given order, duplicates once."""
        mapped: dict[str, str] = {}
        for key in keys:
            mapped.setdefault(self.nest_key(key, version), key)
        return mapped

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> int:
        """Django's timeout as the service's TTL: 0 = never expires, :data:`_EXPIRED` = 0 or less
        (remove, do not store); seconds rounded up, at most the service's 100 years."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return 0
        if timeout <= 0:
            return _EXPIRED
        return min(MAX_TTL_SECONDS, max(1, math.ceil(float(timeout))))

    def _encode(self, value: Any) -> tuple[Any, dict[str, Any]]:
        """(the JSON value to store, its metadata)."""
        if _is_exact_json(value, 0):
            return value, {}
        blob = pickle.dumps(value, self._pickle_protocol)
        kind = type(value)
        return base64.b64encode(blob).decode("ascii"), {
            _META: {
                "encoding": _PICKLE,
                "protocol": self._pickle_protocol,
                "type": f"{kind.__module__}.{kind.__qualname__}",
            }
        }

    @staticmethod
    def _decode(entry: Entry) -> Any:
        if _is_pickled(entry):
            # As trusted as Django's own Redis cache: whoever may write these keys may run code here.
            return pickle.loads(base64.b64decode(entry.value))
        return entry.value

    async def _aencode(self, value: Any) -> tuple[Any, dict[str, Any]]:
        """:meth:`_encode` for the async API: pickling runs in Django's sync thread, as Django's
        default async methods run the whole call (pickling a QuerySet evaluates it, and any
        ``__reduce__`` may block); JSON values stay on the event loop."""
        if _is_exact_json(value, 0):
            return value, {}
        return await sync_to_async(self._encode, thread_sensitive=True)(value)

    async def _adecode(self, entry: Entry) -> Any:
        if not _is_pickled(entry):
            return entry.value
        return await sync_to_async(self._decode, thread_sensitive=True)(entry)

    async def _adecode_many(self, found: dict[str, Entry], names: dict[str, str]) -> dict[str, Any]:
        def decode_all() -> dict[str, Any]:
            return {names[key]: self._decode(found[key]) for key in names if key in found}

        if any(_is_pickled(entry) for entry in found.values()):
            return await sync_to_async(decode_all, thread_sensitive=True)()
        return decode_all()

    @staticmethod
    def _ttl_left(entry: Entry) -> int:
        """The TTL that keeps ``entry``'s expiry when it is written again (0: it never expires)."""
        return 0 if entry.ttl is None else max(1, entry.ttl)

    def _entries(
        self, data: Mapping[str, Any], ttl: int, version: int | None
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        entries: list[dict[str, Any]] = []
        names: dict[str, str] = {}
        for key, value in data.items():
            nest_key = self.nest_key(key, version)
            stored, metadata = self._encode(value)
            names[nest_key] = key
            entries.append({"key": nest_key, "value": stored, "ttl": ttl, "metadata": metadata})
        return entries, names

    async def _aentries(
        self, data: Mapping[str, Any], ttl: int, version: int | None
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        if all(_is_exact_json(value, 0) for value in data.values()):
            return self._entries(data, ttl, version)
        return await sync_to_async(self._entries, thread_sensitive=True)(data, ttl, version)

    # --- the sync API ----------------------------------------------------------------------

    def add(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        nest_key = self.nest_key(key, version)
        stored, metadata = self._encode(value)
        ttl = self.get_backend_timeout(timeout)
        if ttl == _EXPIRED:
            # Stored and expired at once: it was "added" when nothing was there.
            return self._client.get(nest_key) is None
        return self._client.add(nest_key, stored, ttl=ttl, metadata=metadata) is not None

    def get(self, key: str, default: Any = None, version: int | None = None) -> Any:
        entry = self._client.get(self.nest_key(key, version))
        return default if entry is None else self._decode(entry)

    def set(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        nest_key = self.nest_key(key, version)
        stored, metadata = self._encode(value)
        ttl = self.get_backend_timeout(timeout)
        if ttl == _EXPIRED:
            self._client.delete(nest_key)
        else:
            self._client.set(nest_key, stored, ttl=ttl, metadata=metadata)

    def touch(self, key: str, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        nest_key = self.nest_key(key, version)
        ttl = self.get_backend_timeout(timeout)
        if ttl == _EXPIRED:
            return self._client.delete(nest_key)
        return self._client.touch(nest_key, ttl) is not None

    def delete(self, key: str, version: int | None = None) -> bool:
        return self._client.delete(self.nest_key(key, version))

    def get_many(self, keys: Iterable[str], version: int | None = None) -> dict[str, Any]:
        names = self._nest_keys(keys, version)
        if not names:
            return {}
        found = self._client.get_many(list(names))
        return {names[nest_key]: self._decode(found[nest_key]) for nest_key in names if nest_key in found}

    def has_key(self, key: str, version: int | None = None) -> bool:
        return self._client.get(self.nest_key(key, version)) is not None

    def incr(self, key: str, delta: int = 1, version: int | None = None) -> Any:
        nest_key = self.nest_key(key, version)
        for attempt in range(_INCR_ATTEMPTS):
            entry = self._client.get(nest_key)
            if entry is None:
                raise ValueError(f"Key '{key}' not found.")
            new_value = self._decode(entry) + delta
            stored, metadata = self._encode(new_value)
            written = self._client.compare_and_set(
                nest_key, stored, version=entry.version, ttl=self._ttl_left(entry), metadata=metadata
            )
            if written is not None:
                return new_value
            time.sleep(min(0.1, 0.002 * 2**attempt))
        raise IncrConflictError(key, _INCR_ATTEMPTS)

    def set_many(
        self, data: Mapping[str, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[str]:
        if not data:
            return []
        ttl = self.get_backend_timeout(timeout)
        entries, names = self._entries(data, ttl, version)
        if ttl == _EXPIRED:
            self._client.delete_many(list(names))
            return []
        return [names[result.key] for result in self._client.set_many(entries) if not result.ok]

    def delete_many(self, keys: Iterable[str], version: int | None = None) -> None:
        names = self._nest_keys(keys, version)
        if names:
            self._client.delete_many(list(names))

    def clear(self) -> None:
        """Delete every key of this cache's scope (NAMESPACE + KEY_PREFIX), nothing else."""
        for batch in _chunked(self._client.scan(self._scope), 1000):
            self._client.delete_many(batch)

    # --- the async API (native, on AsyncClient) ---------------------------------------------

    async def aadd(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        nest_key = self.nest_key(key, version)
        stored, metadata = await self._aencode(value)
        ttl = self.get_backend_timeout(timeout)
        if ttl == _EXPIRED:
            return await self._aclient.get(nest_key) is None
        return await self._aclient.add(nest_key, stored, ttl=ttl, metadata=metadata) is not None

    async def aget(self, key: str, default: Any = None, version: int | None = None) -> Any:
        entry = await self._aclient.get(self.nest_key(key, version))
        return default if entry is None else await self._adecode(entry)

    async def aset(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        nest_key = self.nest_key(key, version)
        stored, metadata = await self._aencode(value)
        ttl = self.get_backend_timeout(timeout)
        if ttl == _EXPIRED:
            await self._aclient.delete(nest_key)
        else:
            await self._aclient.set(nest_key, stored, ttl=ttl, metadata=metadata)

    async def atouch(self, key: str, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        nest_key = self.nest_key(key, version)
        ttl = self.get_backend_timeout(timeout)
        if ttl == _EXPIRED:
            return await self._aclient.delete(nest_key)
        return await self._aclient.touch(nest_key, ttl) is not None

    async def adelete(self, key: str, version: int | None = None) -> bool:
        return await self._aclient.delete(self.nest_key(key, version))

    async def aget_many(self, keys: Iterable[str], version: int | None = None) -> dict[str, Any]:
        names = self._nest_keys(keys, version)
        if not names:
            return {}
        found = await self._aclient.get_many(list(names))
        return await self._adecode_many(found, names)

    async def ahas_key(self, key: str, version: int | None = None) -> bool:
        return await self._aclient.get(self.nest_key(key, version)) is not None

    async def aincr(self, key: str, delta: int = 1, version: int | None = None) -> Any:
        nest_key = self.nest_key(key, version)
        for attempt in range(_INCR_ATTEMPTS):
            entry = await self._aclient.get(nest_key)
            if entry is None:
                raise ValueError(f"Key '{key}' not found.")
            new_value = await self._adecode(entry) + delta
            stored, metadata = await self._aencode(new_value)
            written = await self._aclient.compare_and_set(
                nest_key, stored, version=entry.version, ttl=self._ttl_left(entry), metadata=metadata
            )
            if written is not None:
                return new_value
            await asyncio.sleep(min(0.1, 0.002 * 2**attempt))
        raise IncrConflictError(key, _INCR_ATTEMPTS)

    async def aset_many(
        self, data: Mapping[str, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[str]:
        if not data:
            return []
        ttl = self.get_backend_timeout(timeout)
        entries, names = await self._aentries(data, ttl, version)
        if ttl == _EXPIRED:
            await self._aclient.delete_many(list(names))
            return []
        return [names[result.key] for result in await self._aclient.set_many(entries) if not result.ok]

    async def adelete_many(self, keys: Iterable[str], version: int | None = None) -> None:
        names = self._nest_keys(keys, version)
        if names:
            await self._aclient.delete_many(list(names))

    async def aclear(self) -> None:
        client = self._aclient
        batch: list[str] = []
        async for key in client.scan(self._scope):
            batch.append(key)
            if len(batch) == 1000:
                await client.delete_many(batch)
                batch = []
        if batch:
            await client.delete_many(batch)


def _is_pickled(entry: Entry) -> bool:
    marker = entry.metadata.get(_META)
    return isinstance(marker, dict) and marker.get("encoding") == _PICKLE


def _is_exact_json(value: Any, depth: int) -> bool:
    """True when storing ``value`` as JSON gives back an equal value of the same types."""
    kind = type(value)
    if value is None or kind is bool:
        return True
    if kind is str:
        return _is_storable_text(value)
    if kind is int:
        return bool(_INT_MIN <= value <= _INT_MAX)
    if kind is float:
        return math.isfinite(value)
    if depth >= _MAX_JSON_DEPTH:
        return False
    if kind is list:
        return all(_is_exact_json(item, depth + 1) for item in value)
    if kind is dict:
        return all(
            type(name) is str and _is_storable_text(name) and _is_exact_json(item, depth + 1)
            for name, item in value.items()
        )
    return False


def _is_storable_text(text: str) -> bool:
    # JSON text is UTF-8 (a lone surrogate is not), and PostgreSQL's jsonb refuses U+0000.
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
