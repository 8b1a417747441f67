"""Item 1 of the hostile-input issue: a write near the size limit must never cut a process off NATS.

NATS's ``max_payload`` bounds a whole message, headers included, and nats-py checks only the
payload: a message over it makes the server close the connection, and nats-py then gives up for
good. Every value the contract accepts is stored by the servers `make run` starts (their
``max_payload`` is sized for it); a server with a smaller limit gets a 413 before anything is sent;
and a connection the server closed comes back by itself.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from tests.conftest import free_port, unique_key, wait_for
from tests.hostile.conftest import assert_error, assert_healthy, assert_not_stored
from tools.stack import _nats_server

pytestmark = pytest.mark.django_db(transaction=True)

NEW_CONNECTIONS = 40  # each on a new connection: granian's two processes both get some


def longest_key(name: str) -> str:
    key = unique_key(name)
    return key + "x" * (255 - len(key))


def largest_value_body() -> bytes:
    """``{"value": "xxx…"}`` whose value is exactly MAX_VALUE_SIZE bytes of JSON."""
    size = settings.BIRB.max_value_size
    return b'{"value": "' + b"x" * (size - 2) + b'"}'


def assert_ordinary_writes_succeed_everywhere(base_url: str) -> None:
    statuses = [
        httpx.post(f"{base_url}/v1/cache/{unique_key('after')}", json={"value": i}, timeout=10).status_code
        for i in range(NEW_CONNECTIONS)
    ]
    assert statuses == [201] * NEW_CONNECTIONS, statuses


def test_largest_value_with_longest_key_is_stored_and_every_process_keeps_writing(api) -> None:
    # given the largest value the contract accepts, under the longest key
    key, body = longest_key("big"), largest_value_body()
    # when it is written
    response = httpx.post(f"{api.url}/v1/cache/{key}", content=body, timeout=30)
    # then it is stored and reads back whole
    assert response.status_code == 201, response.content[:300]
    read = httpx.get(f"{api.url}/v1/cache/{key}", timeout=30)
    assert read.status_code == 200 and len(read.json()["value"]) == settings.BIRB.max_value_size - 2
    # and every API process still writes, and is healthy
    assert_ordinary_writes_succeed_everywhere(api.url)
    assert_healthy(api.url)


@pytest.fixture
def small_payload_nats() -> Iterator[str]:
    """A NATS server with JetStream and the default max_payload of 1 MiB (as a plain install has)."""
    data_dir = Path(tempfile.mkdtemp(prefix="birb-nats-"))
    port = free_port()
    argv = [str(_nats_server()), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data_dir)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _accepts(port), timeout=10, message="nats-server to listen")
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_write_over_the_servers_max_payload_is_413_before_publishing(api_factory, small_payload_nats) -> None:
    # given an API on a NATS server whose max_payload (1 MiB) cannot hold the largest value
    api = api_factory(NATS_URL=small_payload_nats).start()
    key = longest_key("big")
    # when the largest accepted value is written, several times
    for _ in range(3):
        response = httpx.post(f"{api.url}/v1/cache/{key}", content=largest_value_body(), timeout=30)
        # then it is refused as too large, not as a broken dependency
        body = assert_error(response, 413, "PAYLOAD_TOO_LARGE")
        assert body["details"]["max_message_size"] < body["details"]["size"]
    assert_not_stored(api.url, key)
    # and the processes are still connected: ordinary writes succeed, health is green
    assert_ordinary_writes_succeed_everywhere(api.url)
    assert_healthy(api.url)


def test_a_connection_the_server_closed_is_replaced(servers) -> None:
    from persistence import jetstream

    publisher = jetstream.publisher()
    client = publisher.client()
    subject = jetstream.names().persist_subject("probe")
    # given the server closed our connection for good (a message over max_payload, sent raw)
    oversize = b"x" * (client.max_payload - 10)
    publisher.run(client.nc.publish(subject, oversize, headers={"X-Pad": "y" * 100}), 5)
    wait_for(lambda: client.nc.is_closed, timeout=10, message="the server to close the connection")
    # then within seconds the process is connected again and healthy, without a restart
    started = time.monotonic()
    wait_for(lambda: publisher.healthy()[0], timeout=10, message="the publisher to reconnect")
    print(f"healthy again after {time.monotonic() - started:.2f} s")
    assert publisher.client() is not client
    # and the size check now refuses such a message instead of sending it
    with pytest.raises(jetstream.MessageTooLargeError):
        publisher.run(publisher.client().publish(subject, oversize, headers={"X-Pad": "y" * 100}, timeout=2), 5)
    assert publisher.healthy()[0]


class WorkerThread:
    """``runworker``'s loop (``run_async``) in a daemon thread of this process, so a test can reach
    its connections; a worker that never stops fails the test instead of hanging its exit."""

    def __init__(self) -> None:
        from persistence.worker import loop
        from persistence.worker.config import WorkerConfig

        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.failure: list[BaseException] = []
        config = replace(WorkerConfig.from_settings(), batch_timeout=0.1)

        def run() -> None:
            try:
                self.loop.run_until_complete(loop.run_async(config, self.stop))
            except BaseException as error:
                self.failure.append(error)

        self.thread = threading.Thread(daemon=True, target=run)

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


def test_the_worker_connects_again_when_nats_closed_its_connection(transactional_db, monkeypatch) -> None:
    from persistence import jetstream, services
    from persistence.models import CacheEntry

    # given a worker running in this process (its connections are recorded as it makes them)
    connections: list[jetstream.JetStream] = []
    connect = jetstream.JetStream.connect.__func__  # type: ignore[attr-defined]

    async def recording_connect(cls, **kwargs):
        js = await connect(cls, **kwargs)
        connections.append(js)
        return js

    monkeypatch.setattr(jetstream.JetStream, "connect", classmethod(recording_connect))
    with WorkerThread() as worker:
        wait_for(lambda: connections, timeout=20, message="the worker to connect")
        first = connections[0]
        # when the server drops its connection (a raw message over max_payload): nats-py then
        # either reconnects by itself (it read the reset first) or closes the connection for good
        # (it read the server's -ERR first), or a mix of both under load
        oversize = b"x" * (first.nc.max_payload - 10)
        subject = jetstream.names().persist_subject("probe")
        asyncio.run_coroutine_threadsafe(
            first.nc.publish(subject, oversize, headers={"X-Pad": "y" * 99}), worker.loop
        ).result(10)
        wait_for(lambda: not first.nc.is_connected, timeout=10, message="the server to drop the connection")
        # then the worker goes on persisting writes, on that connection or a new one
        key = unique_key("after-close")
        services.cache_entry_set(key=key, value_json=b"1", ttl=None)
        try:
            wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), timeout=30, message="the write persisted")
        except AssertionError as error:
            raise AssertionError(f"{error}; {_worker_state(connections, worker.thread, worker.loop)}") from None


def _worker_state(connections: list[Any], thread: threading.Thread, worker_loop: asyncio.AbstractEventLoop) -> str:
    """What a worker run in a thread is doing, for a failure message."""
    from persistence.worker import loop

    states = [
        "closed" if js.nc.is_closed else "connected" if js.nc.is_connected else "reconnecting" for js in connections
    ]
    frame = sys._current_frames().get(thread.ident or 0)
    stack = "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "(thread ended)\n"
    tasks = "\n".join(loop._awaiting(task) for task in asyncio.all_tasks(worker_loop))
    return f"connections: {states}\nthread:\n{stack}tasks:\n{tasks}"


def test_the_worker_connects_again_when_nats_closed_its_connection_before_it_subscribed(
    transactional_db, monkeypatch
) -> None:
    """The window between connecting and subscribing: a CI run's worker died there with
    ConnectionClosedError from pull_subscribe_bind instead of connecting again."""
    from persistence import jetstream, services
    from persistence.models import CacheEntry

    # given the first connection is closed for good just after the worker set up its consumer
    connections: list[jetstream.JetStream] = []
    ensure_consumer = jetstream.JetStream.ensure_consumer

    async def closing_after_setup(self) -> None:
        await ensure_consumer(self)
        connections.append(self)
        if len(connections) == 1:
            await self.nc.close()

    monkeypatch.setattr(jetstream.JetStream, "ensure_consumer", closing_after_setup)
    with WorkerThread() as worker:
        # then the worker does not die: it connects again and goes on persisting writes
        failure = worker.failure
        wait_for(lambda: len(connections) > 1 or failure, timeout=20, message="the worker to connect again")
        assert not failure, f"the worker died: {failure[0]!r}"
        key = unique_key("after-early-close")
        services.cache_entry_set(key=key, value_json=b"1", ttl=None)
        wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), timeout=20, message="the write persisted")


def test_the_worker_connects_again_when_a_wait_outlives_the_closed_connection(transactional_db, monkeypatch) -> None:
    """A CI run's worker never noticed that NATS had closed its connection: its main loop checks
    between two fetches, and something it was awaiting did not end with the connection (nats-py's
    close can stop half-way, on a reset socket, before it cancels the subscription's waits)."""
    from persistence import jetstream, services
    from persistence.models import CacheEntry
    from persistence.worker import loop

    # given a worker whose fetch on its first connection never returns if that connection closes
    # while it waits
    connections: list[jetstream.JetStream] = []
    ensure_consumer = jetstream.JetStream.ensure_consumer
    fetch = jetstream.JetStream.fetch

    async def recording(self) -> None:
        await ensure_consumer(self)
        connections.append(self)

    async def stuck_once_closed(self, subscription, *, batch, timeout):
        fetched = await fetch(self, subscription, batch=batch, timeout=timeout)
        if self is connections[0] and self.is_closed:
            await asyncio.Event().wait()
        return fetched

    monkeypatch.setattr(jetstream.JetStream, "ensure_consumer", recording)
    monkeypatch.setattr(jetstream.JetStream, "fetch", stuck_once_closed)
    monkeypatch.setattr(loop, "CLOSED_GRACE", 1.0)
    with WorkerThread() as worker:
        wait_for(lambda: connections, timeout=20, message="the worker to connect")
        # when NATS closes that connection for good
        asyncio.run_coroutine_threadsafe(connections[0].nc.close(), worker.loop).result(10)
        # then the worker gives up the wait, connects again and goes on persisting writes
        wait_for(lambda: len(connections) > 1, timeout=20, message="the worker to connect again")
        key = unique_key("after-stuck-wait")
        services.cache_entry_set(key=key, value_json=b"1", ttl=None)
        wait_for(lambda: CacheEntry.objects.filter(key=key).exists(), timeout=20, message="the write persisted")
