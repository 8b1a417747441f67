"""Unit tests of the client's own retry decisions (which attempts are sent again, after how long).

These alone use ``httpx.MockTransport``: they script answers and failures a real service gives
only by accident (a 503 on a read followed by a 200, a lost answer followed by a 409). The
behaviour against the real service is in test_client_sync.py / test_client_async.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from birbnest_client import AsyncClient, Client, errors
from birbnest_client._retry import RetryPolicy, parse_retry_after

ENTRY = {
    "key": "k",
    "value": 1,
    "version": 7,
    "ttl": None,
    "metadata": {},
    "created_at": "2026-12-01T03:00:00.000001Z",
    "updated_at": "2026-12-01T03:00:00.000001Z",
}
UNAVAILABLE = {"error": "down", "code": "SERVICE_UNAVAILABLE", "details": {"dependency": "nats"}}


def scripted(*steps: Any) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering each request with the next step: a Response, or an exception to raise."""
    sent: list[httpx.Request] = []
    queue = list(steps)

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        step = queue.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    return httpx.MockTransport(handle), sent


def answer(status: int, body: Any = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers) if body is not None else httpx.Response(status)


def client(transport: httpx.MockTransport, **options: Any) -> Client:
    return Client("http://birbnest.test", transport=transport, backoff=0.001, max_backoff=0.002, **options)


def refused() -> httpx.ConnectError:
    return httpx.ConnectError("[Errno 111] Connection refused")


def lost() -> httpx.ReadTimeout:
    return httpx.ReadTimeout("timed out")


# --- reads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [lambda: answer(503, UNAVAILABLE), refused, lost, lambda: answer(502)])
def test_a_read_is_retried_then_succeeds(failure: Callable[[], Any]) -> None:
    transport, sent = scripted(failure(), failure(), answer(200, ENTRY))
    entry = client(transport).get("k")
    assert entry is not None and entry.version == 7 and len(sent) == 3


def test_a_read_gives_up_after_the_retries_with_the_last_error() -> None:
    transport, sent = scripted(*[answer(503, UNAVAILABLE, **{"Retry-After": "0"})] * 4)
    with pytest.raises(errors.ServiceUnavailable) as raised:
        client(transport, retries=3).get("k")
    assert len(sent) == 4 and raised.value.retry_after == 0.0


def test_retries_zero_sends_once() -> None:
    transport, sent = scripted(refused())
    with pytest.raises(errors.ConnectionFailed):
        client(transport, retries=0).get("k")
    assert len(sent) == 1


def test_errors_other_than_503_429_are_not_retried() -> None:
    for status, cls in ((400, errors.InvalidRequest), (500, errors.InternalError), (401, errors.Unauthorized)):
        transport, sent = scripted(answer(status, {"error": "no", "code": cls.code, "details": None}))
        with pytest.raises(cls):
            client(transport).get("k")
        assert len(sent) == 1


# --- plain writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        lambda: answer(503, UNAVAILABLE),
        refused,
        lambda: httpx.ConnectTimeout("slow"),
        lambda: answer(429, {}),
        lambda: answer(408, {"error": "too many request bodies are arriving slowly", "code": "TIMEOUT"}),
    ],
)
def test_a_plain_write_is_retried_when_it_certainly_did_not_happen(failure: Callable[[], Any]) -> None:
    transport, sent = scripted(failure(), answer(201, ENTRY))
    assert client(transport).set("k", 1).version == 7
    assert len(sent) == 2 and all(request.method == "PUT" for request in sent)


@pytest.mark.parametrize(
    "failure",
    [lost, lambda: httpx.RemoteProtocolError("Server disconnected without sending a response."), lambda: answer(502)],
)
@pytest.mark.parametrize("call", ["set", "delete", "touch", "set_many", "delete_many"])
def test_a_plain_write_is_not_retried_once_it_may_have_happened(failure: Callable[[], Any], call: str) -> None:
    transport, sent = scripted(failure(), answer(200, ENTRY))
    nest = client(transport)
    calls: dict[str, Callable[[], Any]] = {
        "set": lambda: nest.set("k", 1),
        "delete": lambda: nest.delete("k"),
        "touch": lambda: nest.touch("k", 5),
        "set_many": lambda: nest.set_many({"k": 1}),
        "delete_many": lambda: nest.delete_many(["k"]),
    }
    with pytest.raises(errors.BirbNestError) as raised:
        calls[call]()
    assert len(sent) == 1
    if isinstance(raised.value, errors.Timeout | errors.ConnectionFailed):
        assert raised.value.request_sent is True


# --- conditional writes -----------------------------------------------------------------------------


def test_a_version_checked_write_is_retried_after_a_lost_answer() -> None:
    transport, sent = scripted(lost(), answer(200, ENTRY))
    assert client(transport).set("k", 1, if_match=6).version == 7
    assert len(sent) == 2 and sent[1].headers["If-Match"] == "6"


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        (lambda nest: nest.compare_and_set("k", 1, version=6), 409, "VERSION_MISMATCH"),
        (lambda nest: nest.add("k", 1), 412, "PRECONDITION_FAILED"),
        (lambda nest: nest.touch("k", 5, if_match=6), 409, "VERSION_MISMATCH"),
    ],
)
def test_a_conflict_after_a_lost_answer_may_be_our_own_write_so_the_lost_answer_is_raised(
    call: Callable[[Client], Any], status: int, code: str
) -> None:
    transport, sent = scripted(lost(), answer(status, {"error": "conflict", "code": code, "details": {}}))
    with pytest.raises(errors.Timeout) as raised:
        call(client(transport))
    assert raised.value.request_sent is True and len(sent) == 2


def test_a_conflict_without_a_lost_answer_is_the_conflict() -> None:
    transport, _ = scripted(answer(503, UNAVAILABLE), answer(409, {"error": "c", "code": "VERSION_MISMATCH"}))
    assert client(transport).compare_and_set("k", 1, version=6) is None


# --- Retry-After ------------------------------------------------------------------------------------


def test_retry_after_is_waited_for() -> None:
    transport, sent = scripted(
        answer(429, {"error": "slow down", "code": "RATE_LIMITED"}, **{"Retry-After": "0.3"}), answer(200, ENTRY)
    )
    started = time.monotonic()
    assert client(transport).get("k") is not None
    assert 0.3 <= time.monotonic() - started < 1.5 and len(sent) == 2


def test_a_retry_after_over_the_maximum_is_raised_at_once() -> None:
    transport, sent = scripted(answer(429, {"error": "slow", "code": "RATE_LIMITED"}, **{"Retry-After": "120"}))
    started = time.monotonic()
    with pytest.raises(errors.RateLimited) as raised:
        client(transport, max_retry_after=10).get("k")
    assert raised.value.retry_after == 120 and len(sent) == 1 and time.monotonic() - started < 0.5


def test_retry_after_as_an_http_date() -> None:
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert 28 <= (parse_retry_after(format_datetime(later, usegmt=True)) or 0) <= 30
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("-3") == 0


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RetryPolicy(retries=10, backoff=0.1, max_backoff=1.0)
    for number, cap in ((0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (9, 1.0)):
        delays = [policy.delay(number) for _ in range(200)]
        assert all(0 <= delay <= cap for delay in delays) and max(delays) > cap / 2
    assert all(2.0 <= policy.delay(5, retry_after=2.0) <= 3.0 for _ in range(50))


# --- batches ----------------------------------------------------------------------------------------


def test_per_key_503_results_are_sent_again_alone() -> None:
    first = {
        "results": [
            {"key": "a", "status": 201, "version": 1, "created": True},
            {"key": "b", "status": 503, "code": "SERVICE_UNAVAILABLE", "error": "not durable", "details": {}},
            {"key": "c", "status": 409, "code": "VERSION_MISMATCH", "error": "stale", "details": {}},
        ]
    }
    second = {"results": [{"key": "b", "status": 201, "version": 3, "created": True}]}
    transport, sent = scripted(answer(200, first), answer(200, second))
    results = client(transport).set_many([{"key": "a", "value": 1}, {"key": "b", "value": 2}, {"key": "c", "value": 3}])
    assert [(r.key, r.status) for r in results] == [("a", 201), ("b", 201), ("c", 409)]
    assert len(sent) == 2 and b'"key":"b"' in sent[1].content and b'"key":"a"' not in sent[1].content


def test_per_key_503_results_stay_when_retries_run_out() -> None:
    still = {"results": [{"key": "b", "status": 503, "code": "SERVICE_UNAVAILABLE", "error": "x", "details": {}}]}
    transport, sent = scripted(*[answer(200, still)] * 3)
    results = client(transport, retries=2).delete_many(["b"])
    assert len(sent) == 3 and results[0].status == 503 and isinstance(results[0].error, errors.ServiceUnavailable)


def test_batch_get_splits_a_chunk_whose_answer_is_too_large() -> None:
    too_large = answer(413, {"error": "too big", "code": "PAYLOAD_TOO_LARGE", "details": {}})
    halves = [
        answer(200, {"entries": {"a": {**ENTRY, "key": "a"}}, "missing": []}),
        answer(200, {"entries": {"b": {**ENTRY, "key": "b"}}, "missing": []}),
    ]
    transport, sent = scripted(too_large, *halves)
    assert list(client(transport).get_many(["a", "b"])) == ["a", "b"] and len(sent) == 3


# --- async: the same policy --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_client_retries_a_read_and_not_a_plain_write_after_a_lost_answer() -> None:
    steps: list[Any] = [answer(503, UNAVAILABLE), answer(200, ENTRY), lost(), answer(200, ENTRY)]
    sent: list[httpx.Request] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        step = steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    transport = httpx.MockTransport(handle)
    async with AsyncClient("http://birbnest.test", transport=transport, backoff=0.001) as nest:
        assert (await nest.get("k")) is not None and len(sent) == 2
        with pytest.raises(errors.Timeout):
            await nest.set("k", 1)
        assert len(sent) == 3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_a_version_checked_write_that_runs_out_of_retries_after_a_lost_answer_says_it_may_have_happened() -> None:
    # lost, then refused until the retries run out: the call may have been applied by the first
    transport, sent = scripted(lost(), refused(), refused())
    with pytest.raises(errors.Timeout) as raised:
        client(transport, retries=2).set("k", 1, if_match=6)
    assert raised.value.request_sent is True and len(sent) == 3
    # lost, then 503s until the retries run out: the same
    transport, sent = scripted(lost(), answer(503, UNAVAILABLE), answer(503, UNAVAILABLE))
    with pytest.raises(errors.Timeout):
        client(transport, retries=2).add("k", 1)
    # a gateway's 502 is a lost answer too
    transport, sent = scripted(answer(502), answer(409, {"error": "c", "code": "VERSION_MISMATCH"}))
    with pytest.raises(errors.ConnectionFailed) as gateway:
        client(transport).compare_and_set("k", 1, version=6)
    assert gateway.value.request_sent is True and gateway.value.status == 502
