"""Fixtures of the fault-injection suite (the session's servers and process factories come from
tests/conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults import harness


@pytest.fixture
def scenario(worker_factory: Any) -> Iterator[Any]:
    """Start time, the DLQ's sequence before the fault; stops this test's workers gracefully at
    the end so nothing they fetched waits out the ack wait into the next scenario."""
    from persistence import streams_admin

    streams_admin.streams_ensure()
    state = Scenario(started=time.monotonic(), dlq_before=harness.dlq_last_seq())
    yield state
    for worker in state.workers:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop()


class Scenario:
    def __init__(self, started: float, dlq_before: int) -> None:
        self.started = started
        self.dlq_before = dlq_before
        self.workers: list[Any] = []

    def track(self, worker: Any) -> Any:
        self.workers.append(worker)
        return worker
