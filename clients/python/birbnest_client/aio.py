"""The asynchronous client: :class:`AsyncClient`, one ``httpx.AsyncClient`` (one connection pool)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any

import httpx

from birbnest_client import _core, errors
from birbnest_client._core import DEFAULT_BASE_URL, MAX_BATCH_KEYS, Call
from birbnest_client._retry import Attempts
from birbnest_client.models import BatchResult, Entry


class AsyncClient:
    """The asynchronous Birb Nest client: the methods of :class:`birbnest_client.Client` as
    coroutines. Keep one per event loop and reuse it.

    ``api_key`` defaults to the environment variable ``BIRBNEST_API_KEY`` (none: no key is sent,
    which a fresh service accepts from loopback). ``timeout`` is seconds (float) or an
    ``httpx.Timeout``. ``retries`` is how many more attempts a failed call may make, where that is
    safe (see the README, "Retries"). ``transport`` is an ``httpx.AsyncBaseTransport`` (tests, proxies).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 5.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_retry_after: float = 30.0,
        max_batch_keys: int = MAX_BATCH_KEYS,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = _core.make_settings(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_retry_after=max_retry_after,
            max_batch_keys=max_batch_keys,
            headers=headers,
        )
        self._http = httpx.AsyncClient(
            base_url=self._settings.base_url,
            headers=self._settings.headers,
            timeout=self._settings.timeout,
            transport=transport,
        )

    # --- plumbing ----------------------------------------------------------------------------

    async def _send(self, call: Call) -> httpx.Response:
        """Send ``call``, again where the retry policy allows; the final answer (any status)."""
        policy = self._settings.policy if call.retries is None else replace(self._settings.policy, retries=call.retries)
        attempts = Attempts(policy, call.safety)
        kwargs = call.request_kwargs()
        while True:
            try:
                response = await self._http.request(call.method, call.path, **kwargs)
            except httpx.RequestError as error:
                await asyncio.sleep(attempts.on_transport_error(error))
                continue
            delay = attempts.on_response(response)
            if delay is None:
                return response
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (the name httpx and contextlib.aclosing use)."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    def __repr__(self) -> str:
        return f"<AsyncClient {self._settings.base_url}>"

    # --- single keys -------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        """The entry, or None when the key does not exist."""
        return _core.entry_or_none(await self._send(_core.get_call(key)))

    async def get_entry(self, key: str) -> Entry:
        """The entry; raises :class:`errors.NotFound` when the key does not exist."""
        return _core.entry_of(await self._send(_core.get_call(key)))

    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        if_match: int | None = None,
        if_none_match: bool = False,
    ) -> Entry:
        """Create or replace; the written entry. ``ttl`` seconds (0 = never expires, None = the
        service's default); ``if_match``: only if the key is at that version (else
        :class:`errors.VersionMismatch`); ``if_none_match``: only if the key does not exist
        (else :class:`errors.PreconditionFailed`)."""
        call = _core.set_call(key, value, ttl=ttl, metadata=metadata, if_match=if_match, if_none_match=if_none_match)
        return _core.entry_of(await self._send(call))

    async def add(
        self, key: str, value: Any, *, ttl: int | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Entry | None:
        """Create only: the new entry, or None when the key already exists."""
        try:
            return await self.set(key, value, ttl=ttl, metadata=metadata, if_none_match=True)
        except errors.PreconditionFailed:
            return None

    async def compare_and_set(
        self, key: str, value: Any, *, version: int, ttl: int | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Entry | None:
        """Replace only if the key is at ``version``: the new entry, or None when it is not."""
        try:
            return await self.set(key, value, ttl=ttl, metadata=metadata, if_match=version)
        except errors.VersionMismatch:
            return None

    async def delete(self, key: str) -> bool:
        """True when a live entry was deleted, False when the key did not exist."""
        return _core.deleted(await self._send(_core.delete_call(key)))

    async def touch(self, key: str, ttl: int, *, if_match: int | None = None) -> Entry | None:
        """A new TTL without resending the value (a new version): the entry, or None when absent."""
        return _core.entry_or_none(await self._send(_core.touch_call(key, ttl, if_match=if_match)))

    # --- batches -----------------------------------------------------------------------------

    async def get_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        """``{key: entry}`` for the keys that exist, in the order asked (batch gets of
        ``max_batch_keys`` each; a chunk whose answer is over the service's size cap is split)."""
        wanted = _core.unique_keys(keys)
        found: dict[str, Entry] = {}
        for chunk in _core.chunks(wanted, self._settings.max_batch_keys):
            found.update(await self._get_chunk(chunk))
        return {key: found[key] for key in wanted if key in found}

    async def _get_chunk(self, keys: list[str]) -> dict[str, Entry]:
        try:
            return _core.batch_entries(await self._send(_core.batch_get_call(keys)))
        except errors.PayloadTooLarge:
            if len(keys) == 1:
                raise
            half = len(keys) // 2
            return {**await self._get_chunk(keys[:half]), **await self._get_chunk(keys[half:])}

    async def set_many(self, entries: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> list[BatchResult]:
        """Write many entries (batch sets of ``max_batch_keys`` each): one result per entry, in
        order. ``entries``: ``{key: value}`` or dicts with key, value, ttl, metadata, if_match,
        if_none_match. Per-key 503 results (not made durable) are sent again where retries allow."""
        items = _core.normalize_entries(entries)
        results: list[BatchResult] = []
        for chunk in _core.chunks(items, self._settings.max_batch_keys):
            try:
                results.extend(await self._batch_write(_core.batch_set_call, chunk, [item["key"] for item in chunk]))
            except errors.BirbNestError as error:
                error.completed = results
                raise
        return results

    async def delete_many(self, keys: Iterable[str]) -> list[BatchResult]:
        """Delete many keys (batch deletes of ``max_batch_keys`` each): one result per key, in order
        (``deleted`` True; False with a per-key ``NOT_FOUND`` error for a key that did not exist)."""
        wanted = _core.unique_keys(keys)
        results: list[BatchResult] = []
        for chunk in _core.chunks(wanted, self._settings.max_batch_keys):
            try:
                results.extend(await self._batch_write(_core.batch_delete_call, chunk, chunk))
            except errors.BirbNestError as error:
                error.completed = _core.mark_absent(results)
                raise
        return _core.mark_absent(results)

    async def _batch_write(self, make_call: Any, items: list[Any], keys: list[str]) -> list[BatchResult]:
        results = _core.batch_results(await self._send(make_call(items)))
        policy = self._settings.policy
        for retry_number in range(policy.retries):
            again = set(_core.unavailable(results))
            if not again:
                break
            await asyncio.sleep(policy.delay(retry_number))
            subset = [item for item, key in zip(items, keys, strict=True) if key in again]
            try:
                retried = _core.batch_results(await self._send(make_call(subset)))
            except errors.BirbNestError as error:
                results = _core.after_failed_retry(results, again, error)
                break
            results = _core.merge_retried(results, retried)
        return results

    # --- listing -----------------------------------------------------------------------------

    async def list_keys(
        self, prefix: str = "", *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[str], str | None]:
        """One page of live keys starting with ``prefix``, ascending: ``(keys, next_cursor)``;
        ``next_cursor`` None on the last page."""
        return _core.key_page(await self._send(_core.list_call(prefix, cursor, limit)))

    async def scan(self, prefix: str = "", *, page_size: int = 1000) -> AsyncIterator[str]:
        """Every live key starting with ``prefix``, ascending, page after page (``async for``)."""
        cursor: str | None = None
        while True:
            keys, cursor = await self.list_keys(prefix, cursor=cursor, limit=page_size)
            for key in keys:
                yield key
            if cursor is None:
                return

    async def health(self) -> dict[str, Any]:
        """``GET /health``: ``{"status", "checks", …}`` (also when the service says unhealthy)."""
        return _core.health_of(await self._send(_core.health_call()))
