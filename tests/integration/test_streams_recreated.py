"""Streams deleted while the service runs (`nats stream rm`, the JetStream API) come back by
themselves: the worker and the API create them again within seconds, and no write answered 2xx
afterwards is lost (issue #11)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest

from persistence import jetstream
from tests.conftest import unique_key, wait_for
from tests.integration.test_durability import Writer, wait_until_persisted

pytestmark = pytest.mark.django_db(transaction=True)


def _on_nats(servers: Any, action: Any) -> Any:
    """Run ``action(js)`` on a connection of its own, as an operator's tool would."""

    async def go() -> Any:
        nc = await nats.connect(servers.nats_url, connect_timeout=5, allow_reconnect=False)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(go())


def delete_streams(servers: Any) -> None:
    n = jetstream.names()

    async def delete(js: Any) -> None:
        for stream in (n.stream, n.dlq_stream):
            assert await js.delete_stream(stream)

    _on_nats(servers, delete)


def layout_exists(servers: Any) -> bool:
    """Both streams and the worker's consumer are there."""
    n = jetstream.names()

    async def check(js: Any) -> bool:
        try:
            await js.stream_info(n.stream)
            await js.stream_info(n.dlq_stream)
            await js.consumer_info(n.stream, n.consumer)
        except nats.js.errors.NotFoundError:
            return False
        return True

    return bool(_on_nats(servers, check))


def test_a_running_worker_recreates_both_streams_and_its_consumer(servers, worker) -> None:
    worker.wait_ready()
    assert layout_exists(servers)

    # when
    delete_streams(servers)
    deleted_at = time.monotonic()

    # then: with no write to notice it, the idle worker does within seconds
    wait_for(lambda: layout_exists(servers), timeout=10, interval=0.1, message="streams and consumer back")
    took = time.monotonic() - deleted_at
    print(f"worker recreated the streams and consumer {took:.2f} s after they were deleted")
    assert took < 5
    assert "was missing (deleted while the worker ran); created it again" in worker.log()


def test_writes_succeed_at_once_after_the_streams_are_deleted_and_reach_postgresql(servers, api, worker) -> None:
    worker.wait_ready()
    with Writer(api.url, threads=4) as before:
        wait_for(lambda: before.count > 200, timeout=30, message="writes flowing")
    wait_until_persisted(before)

    # when: both streams are deleted while the API and the worker run
    delete_streams(servers)
    deleted_at = time.monotonic()

    # then: the very next write is accepted (the API creates the stream again) ...
    first = httpx.post(f"{api.url}/v1/cache/{unique_key('first')}", json={"value": "after"}, timeout=30)
    first_at = time.monotonic()
    assert first.status_code == 201, first.text
    # ... and every write answered 2xx from then on reaches PostgreSQL
    with Writer(api.url, threads=4) as after:
        wait_for(lambda: after.count > 500, timeout=60, message="writes flowing after the deletion")
    print(f"first write answered {first_at - deleted_at:.3f} s after the deletion; after it: {after.statuses}")
    assert after.statuses.keys() <= {200, 201}, after.statuses
    wait_until_persisted(after, timeout=60)
    assert layout_exists(servers)


def test_writes_flowing_while_the_streams_disappear_get_a_503_at_most(servers, api, worker) -> None:
    """Concurrent writers hit the missing stream together: one re-creation serves them all, and
    every key's last 2xx write (made after the deletion: each key is rewritten many times) is
    in PostgreSQL."""
    worker.wait_ready()
    with Writer(api.url, threads=4, keys_per_thread=20) as writer:
        wait_for(lambda: writer.count > 200, timeout=30, message="writes flowing")
        delete_streams(servers)
        count = writer.count
        wait_for(lambda: writer.count > count + 800, timeout=60, message="writes accepted after the deletion")
    # A write whose message was in the stream when it was deleted, not yet persisted, went with
    # the stream (the operator deleted it); every key was written again afterwards.
    assert writer.statuses.keys() <= {200, 201, 503}, writer.statuses
    wait_until_persisted(writer, timeout=60)
    print(f"writes across the deletion: statuses={writer.statuses}")
