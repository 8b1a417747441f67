"""The sync client against the session's real API (real PostgreSQL, Redis, NATS JetStream):
every method, every error class from a real answer, and its retries where they are safe."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from birbnest_client import BatchResult, Client, Entry, __version__, errors

from tests.conftest import free_port, unique_key
from tests.integration.test_ratelimit import fresh_address

pytestmark = pytest.mark.django_db(transaction=True)


class CountingTransport(httpx.BaseTransport):
    """The real HTTP transport, counting the requests that went out (nothing is faked)."""

    def __init__(self, **options: Any) -> None:
        self.inner = httpx.HTTPTransport(**options)
        self.requests: list[httpx.Request] = []
        self.times: list[tuple[float, float]] = []
        self.responses: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        started = time.monotonic()
        try:
            response = self.inner.handle_request(request)
            self.responses.append(response)
            return response
        finally:
            self.times.append((started, time.monotonic()))

    def pauses(self) -> list[float]:
        """Seconds between each answer and the next request (the client's waits)."""
        return [nxt[0] - prev[1] for prev, nxt in zip(self.times, self.times[1:], strict=False)]

    def close(self) -> None:
        self.inner.close()


# --- single keys ---------------------------------------------------------------------------------


def test_set_then_get_returns_a_typed_entry(nest: Client) -> None:
    key = unique_key("c")
    written = nest.set(key, {"n": 1, "s": "é", "l": [1.5, None, True]}, ttl=300, metadata={"by": "client"})
    read = nest.get(key)
    assert isinstance(written, Entry) and isinstance(read, Entry)
    assert read.key == key and read.value == {"n": 1, "s": "é", "l": [1.5, None, True]}
    assert read.version == written.version >= 1
    assert read.metadata == {"by": "client"}
    assert read.ttl is not None and 298 <= read.ttl <= 300
    assert read.created_at.tzinfo is not None and abs((datetime.now(UTC) - read.created_at).total_seconds()) < 60
    assert read.updated_at == written.updated_at
    # ttl=0: never expires (ttl None in the answer); a replace is the next version
    forever = nest.set(key, "v2", ttl=0)
    assert forever.ttl is None and forever.version == written.version + 1 and forever.value == "v2"


def test_get_of_a_missing_key_is_none_and_get_entry_raises_not_found(nest: Client) -> None:
    key = unique_key("absent")
    assert nest.get(key) is None
    with pytest.raises(errors.NotFound) as raised:
        nest.get_entry(key)
    assert raised.value.status == 404 and raised.value.code == "NOT_FOUND" and key in raised.value.message


def test_if_match_and_compare_and_set(nest: Client) -> None:
    key = unique_key("cas")
    first = nest.set(key, 1)
    second = nest.set(key, 2, if_match=first.version)
    assert second.version > first.version
    with pytest.raises(errors.VersionMismatch) as raised:
        nest.set(key, 3, if_match=first.version)
    assert raised.value.status == 409 and raised.value.details["current_version"] == second.version
    assert nest.compare_and_set(key, 4, version=first.version) is None
    won = nest.compare_and_set(key, 4, version=second.version, metadata={"m": 1})
    assert won is not None and won.value == 4 and won.metadata == {"m": 1}
    assert nest.get_entry(key).value == 4


def test_add_and_if_none_match_are_create_only(nest: Client) -> None:
    key = unique_key("add")
    created = nest.add(key, "first", ttl=60)
    assert created is not None and created.value == "first"
    assert nest.add(key, "second") is None
    with pytest.raises(errors.PreconditionFailed) as raised:
        nest.set(key, "third", if_none_match=True)
    assert raised.value.status == 412 and raised.value.details["current"] == created.version
    assert nest.get_entry(key).value == "first"


def test_delete_is_true_then_false(nest: Client) -> None:
    key = unique_key("del")
    nest.set(key, "x")
    assert nest.delete(key) is True
    assert nest.delete(key) is False
    assert nest.get(key) is None


def test_touch_sets_a_new_ttl_keeping_the_value(nest: Client) -> None:
    key = unique_key("touch")
    written = nest.set(key, {"keep": True}, ttl=30, metadata={"a": 1})
    touched = nest.touch(key, 600)
    assert touched is not None and touched.value == {"keep": True} and touched.metadata == {"a": 1}
    assert touched.version > written.version and touched.ttl is not None and 590 <= touched.ttl <= 600
    assert nest.touch(key, 0) is not None and nest.get_entry(key).ttl is None
    assert nest.touch(unique_key("absent"), 10) is None
    with pytest.raises(errors.VersionMismatch):
        nest.touch(key, 10, if_match=written.version)


# --- batches -------------------------------------------------------------------------------------


def test_get_many_chunks_by_100_and_leaves_missing_keys_out(nest: Client) -> None:
    prefix = unique_key("gm")
    keys = [f"{prefix}.{i:03d}" for i in range(230)]
    for key in keys[:150:3]:
        nest.set(key, key)
    found = nest.get_many([*keys, keys[0]])  # 230 keys (a repeat asked once): three batch requests
    assert list(found) == keys[:150:3]
    assert all(entry.value == key for key, entry in found.items())
    assert nest.get_many([]) == {}


def test_set_many_and_delete_many_chunk_and_report_per_key(nest: Client) -> None:
    prefix = unique_key("sm")
    keys = [f"{prefix}.{i:03d}" for i in range(150)]
    results = nest.set_many([{"key": key, "value": i, "ttl": 120, "metadata": {"i": i}} for i, key in enumerate(keys)])
    assert [result.key for result in results] == keys
    assert all(isinstance(r, BatchResult) and r.ok and r.status == 201 and r.created for r in results)
    assert nest.get_entry(keys[149]).metadata == {"i": 149}
    # a mapping is {key: value}; per-key conditions give per-key errors, not an exception
    current = nest.get_entry(keys[0]).version
    mixed = nest.set_many(
        [
            {"key": keys[0], "value": "cas", "if_match": current},
            {"key": keys[1], "value": "stale", "if_match": current + 100},
            {"key": keys[2], "value": "create-only", "if_none_match": True},
            {"key": f"{prefix}.new", "value": "created", "if_none_match": True},
        ]
    )
    assert [(r.status, r.ok) for r in mixed] == [(200, True), (409, False), (412, False), (201, True)]
    assert isinstance(mixed[1].error, errors.VersionMismatch) and isinstance(mixed[2].error, errors.PreconditionFailed)
    assert mixed[0].created is False and mixed[0].version == current + 1
    assert [r.ok for r in nest.set_many({keys[3]: "a", keys[4]: "b"})] == [True, True]
    assert nest.get_entry(keys[4]).value == "b"
    # delete_many: 151 keys, one never written
    deleted = nest.delete_many([*keys, f"{prefix}.never"])
    assert [r.deleted for r in deleted[:150]] == [True] * 150 and all(r.status == 204 for r in deleted[:150])
    assert deleted[150].status == 404 and isinstance(deleted[150].error, errors.NotFound) and not deleted[150].ok
    assert nest.get_many(keys) == {}


def test_a_failing_chunk_reports_the_chunks_written_before_it(nest: Client) -> None:
    prefix = unique_key("chunks")
    entries = [{"key": f"{prefix}.{i:03d}", "value": i} for i in range(250)]
    entries[180]["value"] = "\u0000"  # refused by the service: the second chunk (100..199) fails whole
    with pytest.raises(errors.InvalidRequest) as raised:
        nest.set_many(entries)
    assert [result.key for result in raised.value.completed] == [entry["key"] for entry in entries[:100]]
    assert all(result.ok for result in raised.value.completed)
    assert raised.value.details["index"] == 80  # within its own request
    assert len(nest.get_many(entry["key"] for entry in entries)) == 100


def test_a_batch_with_an_invalid_entry_is_refused_whole(nest: Client) -> None:
    prefix = unique_key("bad")
    with pytest.raises(errors.InvalidRequest) as raised:
        nest.set_many([{"key": f"{prefix}.a", "value": 1}, {"key": f"{prefix}.b", "value": "\u0000"}])
    assert raised.value.status == 400 and raised.value.details["index"] == 1
    assert nest.get(f"{prefix}.a") is None


def test_scan_follows_the_cursor_and_list_keys_pages(nest: Client, worker: Any) -> None:
    prefix = unique_key("scan") + ":"
    keys = sorted(f"{prefix}{i:02d}" for i in range(25))
    nest.set_many({key: i for i, key in enumerate(keys)})
    nest.set(unique_key("elsewhere"), 1)
    nest.delete(keys[3])
    live = [key for key in keys if key != keys[3]]
    assert list(nest.scan(prefix, page_size=7)) == live
    page, cursor = nest.list_keys(prefix, limit=10)
    assert page == live[:10] and cursor is not None
    rest, end = nest.list_keys(prefix, cursor=cursor, limit=1000)
    assert rest == live[10:] and end is None
    with pytest.raises(errors.InvalidRequest):
        nest.list_keys(prefix, limit=1001)  # the service's bound: 1..1000


def test_health(nest: Client) -> None:
    health = nest.health()
    assert health["status"] == "healthy" and set(health["checks"]) >= {"database", "redis", "nats"}


# --- what the client refuses before sending ------------------------------------------------------


@pytest.mark.parametrize("key", ["", "a/b", "a b", "é", "x" * 256, "a?b", "..%2F"])
def test_invalid_keys_are_refused_before_anything_is_sent(api: Any, key: str) -> None:
    transport = CountingTransport()
    with Client(api.url, transport=transport) as client:
        for call in (
            lambda: client.get(key),
            lambda: client.set(key, 1),
            lambda: client.delete(key),
            lambda: client.touch(key, 1),
            lambda: client.get_many(["ok", key]),
            lambda: client.set_many({"ok": 1, key: 2}),
            lambda: client.delete_many(["ok", key]),
        ):
            with pytest.raises(errors.InvalidRequest) as raised:
                call()
            assert raised.value.status is None and "A-Z a-z 0-9" in raised.value.message
    assert transport.requests == []


def test_values_that_are_not_json_and_bad_ttls_are_refused_before_sending(api: Any) -> None:
    transport = CountingTransport()
    with Client(api.url, transport=transport) as client:
        for call in (
            lambda: client.set("k", float("nan")),
            lambda: client.set("k", object()),
            lambda: client.set("k", 1, ttl=-1),
            lambda: client.set("k", 1, ttl=1.5),  # type: ignore[arg-type]
            lambda: client.set_many([{"key": "k", "value": 1, "ttl": True}]),
            lambda: client.set_many([{"key": "k", "value": 1}, {"key": "k", "value": 2}]),
            lambda: client.get_many("one-string"),
        ):
            with pytest.raises(errors.InvalidRequest):
                call()
    assert transport.requests == []


# --- errors from real answers --------------------------------------------------------------------


def test_invalid_request_from_the_service(nest: Client) -> None:
    with pytest.raises(errors.InvalidRequest) as raised:
        nest.set(unique_key("nul"), "a\u0000b")  # JSON, but PostgreSQL's jsonb cannot store U+0000
    assert raised.value.status == 400 and raised.value.code == "INVALID_REQUEST"
    assert raised.value.details == {"field": "value"}


def test_payload_too_large(nest: Client) -> None:
    with pytest.raises(errors.PayloadTooLarge) as raised:
        nest.set(unique_key("big"), "x" * (1024 * 1024 + 1))
    assert raised.value.status == 413 and raised.value.details["max_value_size"] == 1024 * 1024


def test_unauthorized_forbidden_and_the_api_key_from_the_environment(
    api: Any, make_api_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import wait_published

    reader = make_api_key(scopes=["read"])
    writer = make_api_key(scopes=["read", "write", "delete"])
    wait_published()
    key = unique_key("auth")
    monkeypatch.delenv("BIRBNEST_API_KEY", raising=False)
    with Client(api.url) as anonymous, pytest.raises(errors.Unauthorized) as raised:
        anonymous.get(key)
    assert raised.value.status == 401
    with Client(api.url, api_key=reader) as client:
        assert client.get(key) is None
        with pytest.raises(errors.Forbidden) as forbidden:
            client.set(key, 1)
        assert forbidden.value.status == 403 and forbidden.value.code == "FORBIDDEN"
    # the key from BIRBNEST_API_KEY, and the constructor's wins over it
    monkeypatch.setenv("BIRBNEST_API_KEY", writer)
    with Client(api.url) as from_env:
        assert from_env.set(key, "ok").value == "ok"
    with Client(api.url, api_key=reader) as explicit, pytest.raises(errors.Forbidden):
        explicit.delete(key)


def test_user_agent_names_the_client_and_its_version(api: Any) -> None:
    transport = CountingTransport()
    with Client(api.url, transport=transport) as client:
        client.get(unique_key("ua"))
    assert transport.requests[0].headers["User-Agent"] == f"birbnest-client/{__version__}"


def test_rate_limited_honours_retry_after_and_gives_up_when_it_is_too_long(api: Any, rate_limiter: Any) -> None:
    rate_limiter(limit=2, window=3)
    address = fresh_address()
    transport = httpx.HTTPTransport(local_address=address)
    # given the window's two requests spent
    with Client(api.url, transport=transport, retries=0) as client:
        client.get(unique_key("rl"))
        client.get(unique_key("rl"))
        # then without retries: RateLimited with the answer's Retry-After
        with pytest.raises(errors.RateLimited) as raised:
            client.get(unique_key("rl"))
    retry_after = raised.value.retry_after
    assert raised.value.status == 429 and retry_after is not None and 1 <= retry_after <= 3
    # a Retry-After longer than max_retry_after is not waited for
    started = time.monotonic()
    slow = httpx.HTTPTransport(local_address=address)
    with Client(api.url, transport=slow, max_retry_after=0.5) as client, pytest.raises(errors.RateLimited):
        client.get(unique_key("rl"))
    assert time.monotonic() - started < 0.5
    # with one retry allowed, the client waits the Retry-After it was given and then succeeds
    # (a retry any earlier would land in the same window and be refused again)
    transport = CountingTransport(local_address=address)
    with Client(api.url, transport=transport, retries=1) as client:
        assert client.get(unique_key("rl")) is None
    assert [response.status_code for response in transport.responses] == [429, 404]
    asked = float(transport.responses[0].headers["Retry-After"])
    (pause,) = transport.pauses()
    assert asked <= pause < asked + 0.2  # plus jitter of at most the first backoff (0.1 s)


def test_service_unavailable_when_nats_is_down_is_retried_after_retry_after(api_factory: Any) -> None:
    # an API whose NATS is a port nothing listens on: every write is refused with 503
    api = api_factory(NATS_URL=f"nats://127.0.0.1:{free_port()}").start()
    transport = CountingTransport()
    with Client(api.url, transport=transport, retries=2) as client, pytest.raises(errors.ServiceUnavailable) as raised:
        client.set(unique_key("down"), 1)
    assert raised.value.status == 503 and raised.value.retry_after == 1.0
    assert raised.value.details["dependency"] == "nats"
    # a 503 on a write means it was not made durable: retried twice, each after Retry-After: 1
    # (and a little jitter: at most the backoff, 0.1 s then 0.2 s)
    assert len(transport.requests) == 3
    assert all(1.0 <= pause < 1.5 for pause in transport.pauses()), transport.pauses()


def test_a_read_is_retried_while_the_connection_is_refused_and_then_succeeds(api: Any, api_factory: Any) -> None:
    # given a key, and an API that is not listening yet
    key = unique_key("late")
    with Client(api.url) as client:
        client.set(key, "there")
    late = api_factory()
    outcome: dict[str, Any] = {}

    def read_and_write() -> None:
        with Client(late.url, retries=200, backoff=0.05, max_backoff=0.2) as client:
            try:
                outcome["read"] = client.get(key)
                # a plain write is retried too while nothing could be sent (connection refused)
                outcome["write"] = client.set(unique_key("late"), 1)
            except Exception as error:  # reported below
                outcome["error"] = error

    thread = threading.Thread(target=read_and_write)
    thread.start()
    time.sleep(0.5)  # the client meets "connection refused" a few times
    late.start()
    thread.join(30)
    assert "error" not in outcome, outcome
    assert outcome["read"].value == "there" and outcome["write"].version >= 1


def test_connection_refused_after_the_retries_is_connection_failed_with_nothing_sent() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as client:
        for call in (lambda: client.get("k"), lambda: client.set("k", 1), lambda: client.delete("k")):
            with pytest.raises(errors.ConnectionFailed) as raised:
                call()
            assert raised.value.request_sent is False and raised.value.status is None


def test_a_plain_write_is_not_retried_after_a_read_timeout_because_it_may_have_happened(nest: Client, api: Any) -> None:
    key = unique_key("maybe")
    transport = CountingTransport()
    hasty = httpx.Timeout(5.0, read=0.0005)
    with (
        Client(api.url, transport=transport, timeout=hasty, retries=3) as client,
        pytest.raises(errors.Timeout) as raised,
    ):
        client.set(key, ["applied?", "x" * 500_000])  # half a MB: milliseconds of work for the service
    assert raised.value.request_sent is True and raised.value.status is None
    assert len(transport.requests) == 1
    # and indeed the write was applied: a blind retry would have written it a second time
    deadline = time.monotonic() + 5
    while nest.get(key) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nest.get_entry(key).value[0] == "applied?"


def test_timeouts_accept_a_float(api: Any) -> None:
    with Client(api.url, timeout=0.0005, retries=0) as client, pytest.raises(errors.Timeout):
        client.get(unique_key("t"))


def test_batch_sizes_follow_the_services_limits(api_factory: Any) -> None:
    # a service with smaller limits: 10 keys a batch, answers of at most 4 KiB
    small = api_factory(MAX_BATCH_KEYS="10", MAX_BATCH_RESPONSE_SIZE="4096").start()
    prefix = unique_key("lim")
    keys = [f"{prefix}.{i:02d}" for i in range(25)]
    with Client(small.url) as default, pytest.raises(errors.InvalidRequest) as raised:
        default.set_many({key: "v" for key in keys})  # 25 > 10 in one request
    assert raised.value.status == 400
    transport = CountingTransport()
    with Client(small.url, max_batch_keys=10, transport=transport) as client:
        assert all(result.ok for result in client.set_many({key: "x" * 1000 for key in keys}))
        assert len(transport.requests) == 3
        # 10 values of 1000 bytes are over the 4 KiB answer cap: each chunk's 413 splits it
        transport.requests.clear()
        found = client.get_many(keys)
        assert list(found) == keys and found[keys[24]].value == "x" * 1000
        assert len(transport.requests) > 3
        assert [r.deleted for r in client.delete_many(keys)] == [True] * 25


def test_forbidden_outside_the_api_keys_prefixes(api: Any, make_api_key: Any, worker: Any) -> None:
    from tests.conftest import wait_published

    prefix = unique_key("team") + ":"
    token = make_api_key(key_prefixes=[prefix])
    wait_published()
    with Client(api.url, api_key=token) as client:
        assert client.set(f"{prefix}a", 1).value == 1
        assert list(client.scan(prefix)) == [f"{prefix}a"]
        for call in (
            lambda: client.get("elsewhere"),
            lambda: client.set("elsewhere", 1),
            lambda: client.get_many([f"{prefix}a", "elsewhere"]),
            lambda: client.list_keys("elsewhere"),
        ):
            with pytest.raises(errors.Forbidden) as raised:
                call()
            assert raised.value.status == 403


def test_one_client_shared_by_threads(nest: Client) -> None:
    prefix = unique_key("threads")
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                key = f"{prefix}.{n}.{i}"
                assert nest.set(key, [n, i]).value == [n, i]
                assert nest.get_entry(key).value == [n, i]
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert len(nest.get_many(f"{prefix}.{n}.{i}" for n in range(16) for i in range(10))) == 160


@pytest.mark.parametrize("dots", [".", ".."])
def test_the_keys_dot_and_dot_dot_are_keys_not_path_segments(nest: Client, dots: str) -> None:
    # An HTTP client drops "." and ".." segments from a path (RFC 3986 dot-segment removal):
    # sent as they are, they would write to /v1/cache (the listing) or /v1.
    nest.delete(dots)
    written = nest.set(dots, {"dots": dots})
    assert written.key == dots
    assert nest.get_entry(dots).value == {"dots": dots}
    assert nest.touch(dots, 60) is not None
    assert nest.delete(dots) is True
