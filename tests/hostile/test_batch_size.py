"""Item 5 of the hostile-input issue: a batch get must not make a process allocate hundreds of MB.

Four concurrent batch gets of 100 keys holding 1 MB values took a process from 165 MB to 787 MB
RSS, still 500 MB ten minutes later. An answer is now capped (``MAX_BATCH_RESPONSE_SIZE``, 8 MiB
by default): over it, 413 naming the limit, found out without holding more than the cap.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from django.conf import settings

from persistence import redis_store
from persistence.redis_store import StoredEntry
from tests.conftest import unique_key
from tests.hostile.conftest import assert_error, assert_healthy

pytestmark = pytest.mark.django_db(transaction=True)

MB = 1024 * 1024


def store_big_entries(count: int, size: int) -> list[str]:
    """``count`` entries of ``size`` bytes of JSON each, straight into Redis (as a write leaves them)."""
    keys = [unique_key("big") for _ in range(count)]
    stamp = "2026-11-30T00:00:00Z"
    for number, key in enumerate(keys):
        value = b'"' + bytes([97 + number % 26]) * (size - 2) + b'"'
        redis_store.store(StoredEntry(key, 1, value, b"{}", stamp, stamp, None))
    return keys


def worker_rss(api) -> int:
    """RSS of the API's granian worker processes, in bytes."""
    return sum(child.memory_info().rss for child in psutil.Process(api.proc.pid).children(recursive=True))


def test_a_batch_over_the_answer_cap_is_413_and_memory_stays_flat(api) -> None:
    keys = store_big_entries(100, MB)
    before = worker_rss(api)
    # when four clients ask for all 100 (100 MB each) at once
    with ThreadPoolExecutor(4) as pool:
        responses = list(
            pool.map(lambda _: httpx.post(f"{api.url}/v1/cache/batch/get", json={"keys": keys}, timeout=60), range(4))
        )
    peak = worker_rss(api)
    # then each is refused, naming the limit
    for response in responses:
        body = assert_error(response, 413, "PAYLOAD_TOO_LARGE")
        assert body["details"]["max_batch_response_size"] == settings.BIRB.max_batch_response_size
        assert "MAX_BATCH_RESPONSE_SIZE" in body["error"]
    time.sleep(2)
    after = worker_rss(api)
    print(f"API workers' RSS: {before / MB:.0f} MB before, {peak / MB:.0f} MB after, {after / MB:.0f} MB 2 s later")
    assert peak - before < 100 * MB, (before, peak)
    assert_healthy(api.url)


def test_a_batch_under_the_cap_is_answered_whole(api) -> None:
    count = settings.BIRB.max_batch_response_size // MB - 1
    keys = store_big_entries(count, MB)
    response = httpx.post(f"{api.url}/v1/cache/batch/get", json={"keys": keys}, timeout=60)
    assert response.status_code == 200, response.content[:300]
    body = response.json()
    assert sorted(body["entries"]) == sorted(keys) and body["missing"] == []


def test_a_batch_get_after_a_redis_restart_reads_redis_again(api, servers) -> None:
    if not servers.owns("redis"):
        pytest.skip("needs a Redis server of this run's own to restart")
    keys = store_big_entries(3, 1000)
    assert httpx.post(f"{api.url}/v1/cache/batch/get", json={"keys": keys}).json()["missing"] == []
    # given Redis restarted (empty: the tests run it without persistence) under the API's connections
    servers.stop("redis")
    servers.start("redis")
    keys = store_big_entries(3, 1000)
    # when a batch get comes, on the API's old connection (the first use of each request thread's)
    for _ in range(20):
        body = httpx.post(f"{api.url}/v1/cache/batch/get", json={"keys": keys}).json()
        # then it reads the entries from Redis, not 'missing' as a fall-back to PostgreSQL would
        assert sorted(body["entries"]) == sorted(keys) and body["missing"] == [], body["missing"]
