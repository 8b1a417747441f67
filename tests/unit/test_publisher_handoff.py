"""SyncJetStream.run: the hand-off of a coroutine from a request thread to the publisher's loop
(a queue emptied in one wake-up, a bare lock to wait on). No NATS needed: the coroutines here
only sleep, return or raise. The publishes themselves are covered by tests/integration."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from persistence import jetstream


@pytest.fixture
def sync_js() -> jetstream.SyncJetStream:
    return jetstream.SyncJetStream()


def test_run_returns_the_result_and_raises_the_exception_of_the_coroutine(sync_js) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise jetstream.PublishError("no", reason="timeout")

    assert sync_js.run(answer(), 2) == 42
    with pytest.raises(jetstream.PublishError) as raised:
        sync_js.run(fail(), 2)
    assert raised.value.reason == "timeout"


def test_a_coroutine_that_outlives_the_timeout_raises_timeouterror_and_is_cancelled(sync_js) -> None:
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    began = time.monotonic()
    with pytest.raises(TimeoutError):
        sync_js.run(slow(), 0.2)
    assert time.monotonic() - began < 2
    assert cancelled.wait(2), "the coroutine kept running after its caller gave up"

    async def quick() -> str:
        return "next"

    assert sync_js.run(quick(), 2) == "next"  # the loop serves the next caller as before


def test_many_threads_at_once_each_get_their_own_answer(sync_js) -> None:
    answers: dict[int, int] = {}

    async def echo(n: int) -> int:
        await asyncio.sleep(0.001 * (n % 5))
        return n * n

    def caller(base: int) -> None:
        for i in range(base, base + 200):
            answers[i] = sync_js.run(echo(i), 5)

    threads = [threading.Thread(target=caller, args=(t * 1000,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 16 * 200
    assert all(value == key * key for key, value in answers.items())


def test_something_the_loop_cannot_start_is_the_callers_error_and_the_next_call_works(sync_js) -> None:
    with pytest.raises(TypeError):
        sync_js.run("not a coroutine", 2)  # type: ignore[arg-type]

    async def fine() -> int:
        return 1

    assert sync_js.run(fine(), 2) == 1
