"""The worker loop against a fake JetStream and a fake upsert: the order of fetches, writes and
acknowledgements. The real thing is covered by tests/integration and tests/faults."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from django import db

from persistence import jetstream
from persistence.worker import loop
from persistence.worker.config import WorkerConfig


class FakeMsg:
    def __init__(self, key: str, seq: int, events: list[tuple[str, Any]]) -> None:
        stamp = "2026-11-30T00:00:00Z"
        body = {"op": "set", "key": key, "version": 1, "value": key, "created_at": stamp, "updated_at": stamp}
        self.key = key
        self.data = orjson.dumps(body)
        self.subject = "cache.persist.set"
        self.headers = {"Nats-Msg-Id": f"{key}:1"}
        self.metadata = SimpleNamespace(sequence=SimpleNamespace(stream=seq), num_delivered=1)
        self.events = events

    async def ack(self) -> None:
        self.events.append(("ack", self.key))

    async def nak(self) -> None:
        self.events.append(("nak", self.key))

    async def in_progress(self) -> None:
        self.events.append(("in_progress", self.key))

    async def term(self) -> None:
        self.events.append(("term", self.key))


class FakeJetStream:
    names = jetstream.Names(stream="S", dlq_stream="D", subject_prefix="cache", consumer="c")
    is_closed = False

    def __init__(self, batches: list[list[str]], events: list[tuple[str, Any]]) -> None:
        self.events = events
        seqs = iter(range(1, 10_000))
        self.batches = [[FakeMsg(key, next(seqs), events) for key in batch] for batch in batches]
        self.fetches = 0

    async def pull_subscription(self) -> object:
        return object()

    async def subscribe(self, subject: str, callback: Any) -> Any:
        async def unsubscribe() -> None:
            pass

        return SimpleNamespace(unsubscribe=unsubscribe)

    async def fetch(self, subscription: Any, *, batch: int, timeout: float) -> list[Any]:
        self.fetches += 1
        if not self.batches:
            await asyncio.sleep(timeout)
            return []
        msgs = self.batches.pop(0)
        self.events.append(("fetched", [m.key for m in msgs]))
        return msgs


def _run(js: FakeJetStream, upsert: Any, monkeypatch: pytest.MonkeyPatch, linger: float = 0) -> loop.Worker:
    monkeypatch.setattr(loop, "cache_entries_upsert_many", upsert)
    monkeypatch.setattr(loop, "BATCH_LINGER", linger)  # one fetch per batch, unless a test wants it

    async def main() -> loop.Worker:
        stop = asyncio.Event()
        worker = loop.Worker(WorkerConfig(batch_size=10, batch_timeout=0.05, liveness_file=""), js, stop)
        main_loop = asyncio.get_running_loop()
        # What SIGTERM does, callable from the fake upsert's thread.
        worker.request_stop = lambda: main_loop.call_soon_threadsafe(stop.set)  # type: ignore[attr-defined]
        upsert.worker = worker
        await asyncio.wait_for(worker.run(), timeout=10)
        return worker

    return asyncio.run(main())


def test_each_batch_is_acknowledged_after_its_write_and_the_next_is_fetched_meanwhile(monkeypatch) -> None:
    events: list[tuple[str, Any]] = []
    js = FakeJetStream([["a", "b"], ["c"], ["d", "e"]], events)

    def upsert(*, writes: list[Any]) -> int:
        keys = sorted(w.key for w in writes)
        events.append(("write", keys))
        time.sleep(0.1)  # PostgreSQL at work: the loop fetches the next batch meanwhile
        events.append(("committed", keys))
        if keys == ["d", "e"]:
            upsert.worker.request_stop()
        return len(writes)

    worker = _run(js, upsert, monkeypatch)

    assert worker.persisted == 5
    for key in "abcde":
        committed = next(i for i, (kind, keys) in enumerate(events) if kind == "committed" and key in keys)
        assert events.index(("ack", key)) > committed, events
    assert events.index(("fetched", ["c"])) < events.index(("committed", ["a", "b"])), "fetched during the write"
    assert [kind for kind, _ in events].count("write") == 3, "one statement per batch"


def test_a_partial_batch_lingers_to_gather_what_arrives_next(monkeypatch) -> None:
    events: list[tuple[str, Any]] = []
    js = FakeJetStream([["a"], ["b", "c"], ["d"]], events)
    written: list[list[str]] = []

    def upsert(*, writes: list[Any]) -> int:
        written.append(sorted(w.key for w in writes))
        if len(written) == 1:
            upsert.worker.request_stop()
        return len(writes)

    worker = _run(js, upsert, monkeypatch, linger=0.01)

    # "a" came alone; the linger's second fetch added "b" and "c" to the same statement. The
    # batch fetched ahead meanwhile ("d") is written before the stop completes.
    assert written[0] == ["a", "b", "c"]
    assert worker.persisted == 4 and written == [["a", "b", "c"], ["d"]]
    assert all(events.index(("ack", key)) > 0 for key in "abcd")


def test_a_stop_during_a_write_finishes_the_batch_fetched_ahead_too(monkeypatch) -> None:
    events: list[tuple[str, Any]] = []
    js = FakeJetStream([["a"], ["b"], ["c"]], events)

    def upsert(*, writes: list[Any]) -> int:
        keys = [w.key for w in writes]
        if keys == ["a"]:
            upsert.worker.request_stop()
            time.sleep(0.1)
        events.append(("committed", keys))
        return len(writes)

    _run(js, upsert, monkeypatch)

    assert [e for e in events if e[0] in ("committed", "ack")] == [
        ("committed", ["a"]),
        ("ack", "a"),
        ("committed", ["b"]),
        ("ack", "b"),
    ]
    assert js.fetches == 2, "nothing is fetched after the stop"


def test_stopping_while_postgresql_is_down_hands_both_batches_back_unacknowledged(monkeypatch) -> None:
    events: list[tuple[str, Any]] = []
    js = FakeJetStream([["a"], ["b"]], events)
    calls = threading.Event()

    def upsert(*, writes: list[Any]) -> int:
        if not calls.is_set():
            calls.set()
            time.sleep(0.1)  # the second batch is fetched meanwhile
            upsert.worker.request_stop()
        raise db.OperationalError("connection refused")

    _run(js, upsert, monkeypatch)

    assert ("nak", "a") in events and ("nak", "b") in events
    assert not [e for e in events if e[0] in ("ack", "term")]
