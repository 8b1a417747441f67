"""The hostile-input issue's regression list: input that already behaves, kept so that it stays so.

Probing the running service found these handled well: invalid UTF-8, ``%00``/``%FF``/``%2F`` in a
key, ``NaN`` and ``Infinity``, trailing garbage, nesting 100,000 deep, a 50 MiB body, 2,000
concurrent connections and slowloris headers. Each case runs against the session's real
``manage.py runapi`` (granian, 2 processes x 8 threads) and asserts the status and the contract's
JSON error body, that ``/health`` still answers 200 afterwards, and that a refused write stored
nothing.

Most requests go over a raw socket: httpx would normalise some of these bytes (percent-escapes in
the path, a body it did not build), and the 50 MiB case must not send its body at all.

Not everything held: 2,000 connections are all answered only when each closes after its answer.
granian serves at most ``--backpressure`` (512) connections per API process and holds one until
it closes; 1,024 kept-alive or silent connections leave every new client, ``/health`` included,
unanswered. Those two cases are expected failures (strict) until the server's configuration is
fixed.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import threading
import time

import httpx
import orjson
import pytest

from tests.conftest import unique_key
from tests.hostile.conftest import assert_error, assert_healthy, assert_not_stored

pytestmark = pytest.mark.django_db(transaction=True)

CONNECTIONS = 2000


def _raise_open_files_limit(needed: int) -> None:
    """Room for ``needed`` more sockets in this process. Raised at import, before the session's API
    starts, so its processes inherit the room too (2,000 connections, 1,000 or more on each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed + 1024  # the sockets, plus what pytest, Django and the clients hold already
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))


_raise_open_files_limit(CONNECTIONS)


# --- raw HTTP/1.1 ----------------------------------------------------------------------------


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def request_bytes(method: str, path: str, body: bytes = b"", *, length: int | None = None, close: bool = True) -> bytes:
    """One HTTP/1.1 request exactly as given: the path is not re-encoded, the body not re-read."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode("latin-1") + body


class AnswerParser:
    """Collects the bytes of one HTTP/1.1 answer (with a Content-Length) until it is complete."""

    def __init__(self) -> None:
        self.data = b""

    def feed(self, chunk: bytes) -> bool:
        """Adds ``chunk``; True once the whole answer is in."""
        self.data += chunk
        head, found, body = self.data.partition(b"\r\n\r\n")
        if not found:
            return False
        return len(body) >= int(self.headers(head).get("content-length", "0"))

    @staticmethod
    def headers(head: bytes) -> dict[str, str]:
        lines = head.decode("latin-1").split("\r\n")[1:]
        return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}

    def response(self) -> httpx.Response:
        """The answer as an httpx.Response, for the suite's assertions."""
        head, found, body = self.data.partition(b"\r\n\r\n")
        assert found, f"no complete answer, got {self.data[:300]!r}"
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        headers = self.headers(head)
        body = body[: int(headers.get("content-length", len(body)))]
        return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


def read_answer(sock: socket.socket) -> httpx.Response:
    """Reads one whole answer from a blocking socket (its timeout bounds each read)."""
    parser = AnswerParser()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a whole answer: {parser.data[:300]!r}")
        if parser.feed(chunk):
            return parser.response()


def raw_request(url: str, data: bytes, timeout: float = 10) -> httpx.Response:
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(data)
        return read_answer(sock)


def stored_entry(base_url: str, value: object) -> str:
    key = unique_key("there")
    response = httpx.post(f"{base_url}/v1/cache/{key}", json={"value": value}, timeout=10)
    assert response.status_code == 201, response.content
    return key


def timed_get(url: str, timeout: float = 10) -> float:
    started = time.perf_counter()
    response = httpx.get(url, timeout=timeout)
    assert response.status_code == 200, (url, response.status_code, response.content[:300])
    return time.perf_counter() - started


# --- bodies that are not JSON ----------------------------------------------------------------


def nested(depth: int, opening: bytes, closing_: bytes, inner: bytes = b"1") -> bytes:
    return opening * depth + inner + closing_ * depth


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"value": "\xff\xfe"}', id="invalid-utf8-in-value"),
        pytest.param(b'{"value": "ok", "metadata": {"\xc3\x28": 1}}', id="invalid-utf8-in-metadata-name"),
        pytest.param(b'{"value": "\xed\xa0\x80"}', id="utf8-encoded-surrogate"),
        pytest.param(b'{"value": NaN}', id="NaN"),
        pytest.param(b'{"value": Infinity}', id="Infinity"),
        pytest.param(b'{"value": -Infinity}', id="-Infinity"),
        pytest.param(b'{"value": 1e999}', id="overflow-to-infinity"),
        pytest.param(b'{"value": [1, NaN]}', id="NaN-inside-a-list"),
        pytest.param(b'{"value": 1, "metadata": {"x": Infinity}}', id="Infinity-in-metadata"),
        pytest.param(b'{"value": 1} x', id="trailing-garbage"),
        pytest.param(b'{"value": 1}{"value": 2}', id="two-documents"),
        pytest.param(b'{"value": 1}\x00', id="trailing-nul"),
    ],
)
def test_a_body_that_is_not_strict_json_is_400(api, body: bytes) -> None:
    key = unique_key("notjson")
    # when the body's exact bytes are written
    response = raw_request(api.url, request_bytes("POST", f"/v1/cache/{key}", body))
    # then it is refused as invalid, and nothing is stored
    error = assert_error(response, 400, "INVALID_REQUEST")
    assert "JSON" in error["error"], error
    assert_not_stored(api.url, key)
    assert_healthy(api.url)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(nested(100_000, b"[", b"]", b""), id="list-100000"),
        pytest.param(nested(100_000, b'{"a":', b"}"), id="object-100000"),
    ],
)
def test_nesting_100000_deep_is_400_at_once(api, value: bytes) -> None:
    key = unique_key("deep")
    started = time.monotonic()
    response = raw_request(api.url, request_bytes("POST", f"/v1/cache/{key}", b'{"value": ' + value + b"}"))
    elapsed = time.monotonic() - started
    assert_error(response, 400, "INVALID_REQUEST")
    # refused by the decoder's depth limit, without walking (or recursing into) the whole body
    assert elapsed < 2, f"answered in {elapsed:.2f} s"
    assert_not_stored(api.url, key)
    assert_healthy(api.url)


# --- keys with escapes that decode to bytes outside the key alphabet ----------------------------


@pytest.mark.parametrize("escape", ["%00", "%FF", "%2F", "%2f"])
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_an_escaped_nul_ff_or_slash_in_a_key_is_400(api, method: str, escape: str) -> None:
    # given an existing key, which a server that cut the key at the escape would reach instead
    head = stored_entry(api.url, "untouched")
    tail = unique_key("tail")
    body = b'{"value": "written"}' if method in ("POST", "PUT") else b""
    # when the escape sits inside the key path, as sent on the wire
    response = raw_request(api.url, request_bytes(method, f"/v1/cache/{head}{escape}{tail}", body))
    # then the key is refused as invalid (not 404 "no such endpoint", not a 5xx)
    error = assert_error(response, 400, "INVALID_REQUEST")
    assert "invalid key" in error["error"], error
    # and the existing key is neither replaced nor deleted, and no other key was written
    entry = httpx.get(f"{api.url}/v1/cache/{head}", timeout=10).json()
    assert (entry["value"], entry["version"]) == ("untouched", 1), entry
    assert_not_stored(api.url, tail)
    assert_not_stored(api.url, head + tail)
    assert_healthy(api.url)


@pytest.mark.parametrize("escape", ["%00", "%FF", "%2F"])
def test_a_key_that_is_only_an_escape_is_400(api, escape: str) -> None:
    response = raw_request(api.url, request_bytes("POST", f"/v1/cache/{escape}", b'{"value": 1}'))
    assert_error(response, 400, "INVALID_REQUEST")
    assert_healthy(api.url)


# --- a body far over the limit -------------------------------------------------------------------


def test_a_50_mib_body_is_413_before_it_is_read(api, closing) -> None:
    key = unique_key("huge")
    announced = 50 * 1024 * 1024
    sock = socket.create_connection(address(api.url), timeout=5)
    closing.append(sock)
    # given a request that announces 50 MiB and sends 4 KiB of it (and would keep the connection)
    started = time.monotonic()
    sock.sendall(request_bytes("POST", f"/v1/cache/{key}", b'{"value": "' + b"x" * 4096, length=announced, close=False))
    # then the 413 arrives without the rest being sent, from the header alone
    response = read_answer(sock)
    elapsed = time.monotonic() - started
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert elapsed < 5, f"answered in {elapsed:.2f} s"
    # and the server closes the connection rather than wait for (or read) the other 50 MiB
    # (closed with our unread bytes still queued, it is a reset: a close too)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    assert_not_stored(api.url, key)
    assert_healthy(api.url)


# --- many connections, slow connections -------------------------------------------------------


def answered_quickly(url: str, within: float = 5.0) -> float:
    """A normal client's GET: 200 within ``within`` seconds (its latency); not answered in time is a
    failed assertion, not an error."""
    try:
        return timed_get(url, timeout=within)
    except httpx.TimeoutException:
        raise AssertionError(f"{url} not answered within {within:g} s") from None


def open_connections(url: str, count: int, request: bytes, opened: list[socket.socket]) -> float:
    """``count`` connections, each having sent ``request`` (nothing, if it is empty); seconds taken."""
    started = time.monotonic()
    for _ in range(count):
        sock = socket.create_connection(address(url), timeout=10)
        opened.append(sock)
        if request:
            sock.sendall(request)
    return time.monotonic() - started


def read_answers(sockets: list[socket.socket], timeout: float) -> dict[int, httpx.Response]:
    """The first answer on each socket, read side by side; fails naming how many had none."""
    parsers = {sock.fileno(): AnswerParser() for sock in sockets}
    pending = set(parsers)
    with selectors.DefaultSelector() as selector:  # epoll: select() stops at 1,024 descriptors
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for selected, _ in selector.select(timeout=0.5):
                sock = selected.fileobj
                assert isinstance(sock, socket.socket)
                chunk = sock.recv(65536)
                assert chunk, f"connection closed before its answer: {parsers[sock.fileno()].data[:300]!r}"
                if parsers[sock.fileno()].feed(chunk):
                    pending.discard(sock.fileno())
                    selector.unregister(sock)
    assert not pending, f"{len(pending)} of {len(sockets)} connections had no answer after {timeout:g} s"
    return {fileno: parser.response() for fileno, parser in parsers.items()}


def assert_all_read(answers: dict[int, httpx.Response], value: object) -> None:
    statuses: dict[int, int] = {}
    for response in answers.values():
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 200:
            assert orjson.loads(response.content)["value"] == value
    assert statuses == {200: len(answers)}, statuses


def test_2000_concurrent_connections_that_close_are_all_answered(api, closing) -> None:
    key = stored_entry(api.url, {"n": CONNECTIONS})
    # given 2,000 connections open at once, each with a GET of an existing key, unread
    opened = open_connections(api.url, CONNECTIONS, request_bytes("GET", f"/v1/cache/{key}"), closing)
    started = time.monotonic()
    # when a normal client reads and asks /health meanwhile, it is answered
    during = [answered_quickly(f"{api.url}/v1/cache/{key}"), answered_quickly(f"{api.url}/health")]
    # then every one of the 2,000 gets its 200 with the value
    assert_all_read(read_answers(closing, timeout=30), {"n": CONNECTIONS})
    answered = time.monotonic() - started
    after = [answered_quickly(f"{api.url}/v1/cache/{key}"), answered_quickly(f"{api.url}/health")]
    print(
        f"{CONNECTIONS} connections opened in {opened:.2f} s, all answered {answered:.2f} s later; "
        f"a normal client's slowest answer meanwhile {max(during) * 1000:.0f} ms, after {max(after) * 1000:.0f} ms"
    )
    for sock in closing:
        sock.close()
    assert_healthy(api.url)


# granian accepts at most --backpressure connections per API process and keeps a kept-alive or
# silent one until it closes; with 512 (2 x 512 = 1,024 open), nothing more was served, /health
# included. runapi now gives each process 8,192 (and the file descriptors for them).


def test_2000_concurrent_kept_alive_connections_are_all_answered(api, closing) -> None:
    key = stored_entry(api.url, {"n": CONNECTIONS})
    # given 2,000 connections open at once, each with a GET of an existing key, kept alive (HTTP/1.1)
    open_connections(api.url, CONNECTIONS, request_bytes("GET", f"/v1/cache/{key}", close=False), closing)
    # when a normal client reads and asks /health meanwhile, it is answered
    answered_quickly(f"{api.url}/v1/cache/{key}")
    answered_quickly(f"{api.url}/health")
    # then every one of the 2,000 gets its 200 with the value
    assert_all_read(read_answers(closing, timeout=15), {"n": CONNECTIONS})
    # and with all 2,000 still open (idle between requests), a normal client is still answered
    answered_quickly(f"{api.url}/v1/cache/{key}")
    answered_quickly(f"{api.url}/health")
    for sock in closing:
        sock.close()
    assert_healthy(api.url)


def test_2000_idle_connections_leave_the_api_answering(api, closing) -> None:
    key = stored_entry(api.url, "here")
    # given 2,000 connections open that have sent nothing (yet)
    open_connections(api.url, CONNECTIONS, b"", closing)
    # then a normal client is answered all the same
    answered_quickly(f"{api.url}/v1/cache/{key}")
    answered_quickly(f"{api.url}/health")
    for sock in closing:
        sock.close()
    assert_healthy(api.url)


SLOW_CONNECTIONS = 32  # twice the request threads of the API (2 processes x 8)
TRICKLE_INTERVAL = 0.5
TRICKLE_FOR = 5.0


def test_slowloris_headers_leave_the_api_answering(api, closing) -> None:
    key = stored_entry(api.url, "still here")
    request_line = f"GET /v1/cache/{key} HTTP/1.1\r\n".encode()
    header_lines = b"Host: 127.0.0.1\r\nX-Slowloris: " + b"a" * 64 + b"\r\n\r\n"
    sent = int(TRICKLE_FOR / TRICKLE_INTERVAL)
    # given connections that send a request line, then its header lines one byte every half second
    for _ in range(SLOW_CONNECTIONS):
        sock = socket.create_connection(address(api.url), timeout=10)
        closing.append(sock)
        sock.sendall(request_line)
    trickling = threading.Event()
    trickling.set()

    def trickle() -> None:
        try:
            for position in range(sent):
                for sock in closing:
                    sock.sendall(header_lines[position : position + 1])
                time.sleep(TRICKLE_INTERVAL)
        finally:
            trickling.clear()

    trickler = threading.Thread(target=trickle, name="slowloris", daemon=True)
    trickler.start()
    # when a normal client reads and asks /health all the while
    latencies = []
    deadline = time.monotonic() + TRICKLE_FOR + 10
    while trickling.is_set() and time.monotonic() < deadline:
        latencies.append(answered_quickly(f"{api.url}/v1/cache/{key}"))
        latencies.append(answered_quickly(f"{api.url}/health"))
        time.sleep(0.05)
    trickler.join(5)
    # then it was answered quickly throughout
    print(
        f"{SLOW_CONNECTIONS} slowloris connections over {TRICKLE_FOR:g} s: {len(latencies)} requests, "
        f"slowest {max(latencies) * 1000:.0f} ms"
    )
    assert len(latencies) >= 10, latencies
    assert max(latencies) < 2, f"slowest answer {max(latencies):.2f} s"
    # and the slow connections, once their header is complete, are answered too (nothing was cut)
    for sock in closing:
        sock.sendall(header_lines[sent:])
    for sock in closing:
        response = read_answer(sock)
        assert response.status_code == 200, (response.status_code, response.content[:300])
        assert response.json()["value"] == "still here"
    assert_healthy(api.url)
