"""The async client against the session's real API: every method, the error classes, retries."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from birbnest_client import AsyncClient, BatchResult, Entry, __version__, errors

from tests.conftest import free_port, unique_key
from tests.integration.test_ratelimit import fresh_address

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.anyio]


class CountingTransport(httpx.AsyncBaseTransport):
    """The real async HTTP transport, counting the requests that went out."""

    def __init__(self, **options: Any) -> None:
        self.inner = httpx.AsyncHTTPTransport(**options)
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_every_single_key_method(anest: AsyncClient) -> None:
    key = unique_key("a")
    assert await anest.get(key) is None
    with pytest.raises(errors.NotFound):
        await anest.get_entry(key)
    created = await anest.add(key, {"v": 1}, ttl=300, metadata={"m": "x"})
    assert isinstance(created, Entry) and created.value == {"v": 1} and created.metadata == {"m": "x"}
    assert await anest.add(key, "again") is None
    with pytest.raises(errors.PreconditionFailed):
        await anest.set(key, "again", if_none_match=True)
    read = await anest.get_entry(key)
    assert read.version == created.version and read.ttl is not None and 298 <= read.ttl <= 300
    replaced = await anest.set(key, 2, ttl=0)
    assert replaced.version == created.version + 1 and replaced.ttl is None
    assert await anest.compare_and_set(key, 3, version=created.version) is None
    with pytest.raises(errors.VersionMismatch) as raised:
        await anest.set(key, 3, if_match=created.version)
    assert raised.value.status == 409
    swapped = await anest.compare_and_set(key, 3, version=replaced.version)
    assert swapped is not None and swapped.value == 3
    touched = await anest.touch(key, 120)
    assert touched is not None and touched.value == 3 and touched.version > swapped.version
    assert touched.ttl is not None and 110 <= touched.ttl <= 120
    assert await anest.touch(unique_key("absent"), 5) is None
    assert await anest.delete(key) is True
    assert await anest.delete(key) is False


async def test_batches_chunk_and_report_per_key(anest: AsyncClient) -> None:
    prefix = unique_key("ab")
    keys = [f"{prefix}.{i:03d}" for i in range(120)]
    results = await anest.set_many({key: i for i, key in enumerate(keys)})
    assert [r.key for r in results] == keys and all(isinstance(r, BatchResult) and r.created for r in results)
    found = await anest.get_many([f"{prefix}.missing", *reversed(keys)])
    assert list(found) == list(reversed(keys)) and found[keys[7]].value == 7
    stale = await anest.set_many([{"key": keys[0], "value": "x", "if_match": 999}])
    assert stale[0].status == 409 and isinstance(stale[0].error, errors.VersionMismatch)
    deleted = await anest.delete_many([*keys, f"{prefix}.missing"])
    assert all(r.deleted for r in deleted[:120]) and deleted[120].status == 404
    assert await anest.get_many(keys) == {}


async def test_scan_and_list_keys(anest: AsyncClient, worker: Any) -> None:
    prefix = unique_key("as") + "."
    keys = sorted(f"{prefix}{i:02d}" for i in range(12))
    await anest.set_many({key: True for key in keys})
    assert [key async for key in anest.scan(prefix, page_size=5)] == keys
    page, cursor = await anest.list_keys(prefix, limit=5)
    assert page == keys[:5] and cursor is not None


async def test_health_and_user_agent(api: Any) -> None:
    transport = CountingTransport()
    async with AsyncClient(api.url, transport=transport) as nest:
        assert (await nest.health())["status"] == "healthy"
    assert transport.requests[0].headers["User-Agent"] == f"birbnest-client/{__version__}"


async def test_invalid_key_is_refused_before_sending(api: Any) -> None:
    transport = CountingTransport()
    async with AsyncClient(api.url, transport=transport) as nest:
        for bad in ("a/b", "", "x" * 256):
            with pytest.raises(errors.InvalidRequest):
                await nest.get(bad)
            with pytest.raises(errors.InvalidRequest):
                await nest.set_many({bad: 1})
    assert transport.requests == []


async def test_errors_from_real_answers(anest: AsyncClient) -> None:
    with pytest.raises(errors.InvalidRequest) as invalid:
        await anest.set(unique_key("nul"), "\u0000")
    assert invalid.value.status == 400
    with pytest.raises(errors.PayloadTooLarge) as large:
        await anest.set(unique_key("big"), "x" * (1024 * 1024 + 1))
    assert large.value.status == 413


@pytest.fixture
def reader(make_api_key: Any) -> str:
    """A read-only API key (its existence makes keys required), known to every API process."""
    from tests.conftest import wait_published

    key: str = make_api_key(scopes=["read"])
    wait_published()
    return key


@pytest.fixture
def limited(rate_limiter: Any) -> None:
    """Rate limiting on: 1 request per 2 s window (set up outside the event loop: the ORM is sync)."""
    rate_limiter(limit=1, window=2)


async def test_unauthorized_forbidden_and_the_environment_key(
    api: Any, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BIRBNEST_API_KEY", raising=False)
    async with AsyncClient(api.url) as anonymous:
        with pytest.raises(errors.Unauthorized):
            await anonymous.get("k")
    monkeypatch.setenv("BIRBNEST_API_KEY", reader)
    async with AsyncClient(api.url) as from_env:
        assert await from_env.get(unique_key("k")) is None
        with pytest.raises(errors.Forbidden):
            await from_env.delete("k")


async def test_rate_limited_then_retried_after_retry_after(api: Any, limited: None) -> None:
    address = fresh_address()
    async with AsyncClient(api.url, transport=httpx.AsyncHTTPTransport(local_address=address), retries=0) as nest:
        await nest.get(unique_key("rl"))
        with pytest.raises(errors.RateLimited) as raised:
            await nest.get(unique_key("rl"))
    assert raised.value.retry_after is not None and 1 <= raised.value.retry_after <= 2
    started = time.monotonic()
    async with AsyncClient(api.url, transport=httpx.AsyncHTTPTransport(local_address=address), retries=1) as nest:
        assert await nest.get(unique_key("rl")) is None  # one retry, after the window ended
    assert time.monotonic() - started <= 3.5


async def test_service_unavailable_is_retried_after_retry_after(api_factory: Any) -> None:
    down = api_factory(NATS_URL=f"nats://127.0.0.1:{free_port()}").start()
    transport = CountingTransport()
    started = time.monotonic()
    async with AsyncClient(down.url, transport=transport, retries=1) as nest:
        with pytest.raises(errors.ServiceUnavailable) as raised:
            await nest.set(unique_key("down"), 1)
    assert raised.value.retry_after == 1.0 and len(transport.requests) == 2
    assert time.monotonic() - started >= 1.0


async def test_a_read_is_retried_while_the_connection_is_refused(api: Any, api_factory: Any) -> None:
    late = api_factory()
    async with AsyncClient(late.url, retries=200, backoff=0.05, max_backoff=0.2) as nest:
        reading = asyncio.ensure_future(nest.get(unique_key("late")))
        await asyncio.sleep(0.3)
        assert not reading.done()
        await asyncio.get_running_loop().run_in_executor(None, late.start)
        assert await asyncio.wait_for(reading, 30) is None


async def test_a_plain_write_is_not_retried_after_a_read_timeout(api: Any) -> None:
    transport = CountingTransport()
    async with AsyncClient(api.url, transport=transport, timeout=httpx.Timeout(5.0, read=0.0005)) as nest:
        with pytest.raises(errors.Timeout) as raised:
            await nest.set(unique_key("maybe"), "x" * 500_000)  # milliseconds of work for the service
    assert raised.value.request_sent is True and len(transport.requests) == 1


async def test_connection_refused_is_connection_failed() -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as nest:
        with pytest.raises(errors.ConnectionFailed) as raised:
            await nest.delete("k")
    assert raised.value.request_sent is False


async def test_one_async_client_shared_by_concurrent_tasks(anest: AsyncClient) -> None:
    prefix = unique_key("tasks")

    async def work(n: int) -> int:
        key = f"{prefix}.{n}"
        await anest.set(key, n)
        entry = await anest.get_entry(key)
        return int(entry.value)

    assert await asyncio.gather(*(work(n) for n in range(40))) == list(range(40))
