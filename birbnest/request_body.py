"""Request bodies read before Django sees them: bounded in time, in size, and in the request
threads that slow senders can hold.

granian (WSGI) hands a request to one of its Python threads as soon as the headers are in; a
read of ``wsgi.input`` then blocks that thread until the body has arrived, and granian never
times it out (nor can the read be moved to another thread: a body read pending outside
granian's own threads stalls the answers of other connections). A few clients that announce a
body and never send it used to hold every request thread, and nothing, ``/health`` included,
was answered. So here:

- **Slots.** At most half the request threads of a process read a body at any moment. A
  request that finds no slot free waits while a slot is held by a young read (see
  :data:`SLOW_READ`); when every slot is held by a read that stalled, or after
  :data:`MAX_SLOT_WAIT`, it is answered 408 without reading its body, and its connection is
  closed. Slow senders can never take the threads that answer everyone else.
- **A deadline.** A body that has not arrived within ``REQUEST_BODY_TIMEOUT`` is cut off: a
  watchdog thread shuts the read side of the request's connection (found among this process's
  sockets by the client's address, on the API port, having received nothing for as long as the
  timeout -- an idle connection, which a server may close at any time), the read returns, and
  the answer is 408 ``TIMEOUT`` with the connection closed.
- **Chunked bodies** (``Transfer-Encoding: chunked``, no ``Content-Length``) are read too, up to
  the same limit (``DATA_UPLOAD_MAX_MEMORY_SIZE``); Django reads exactly ``CONTENT_LENGTH``
  bytes and used to see an empty body. A body announced larger than the limit is not read at
  all: Django answers 413 from the header alone.
"""

from __future__ import annotations

import heapq
import io
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from birbnest.errors import error_response

logger = logging.getLogger(__name__)

# A request waits for a free body slot while some slot is held by a read younger than SLOW_READ
# (a sender still sending, or a reading thread the machine paused: both end soon), for at most
# MAX_SLOT_WAIT; once every slot is held by a read older than SLOW_READ (senders that stalled),
# it is answered 408 unread at once. Checked every SLOT_POLL.
SLOW_READ = 0.2
MAX_SLOT_WAIT = 1.0
SLOT_POLL = 0.01
# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s; tcpi_last_data_recv is the 12th
# u32 (milliseconds since data last arrived).
_TCP_INFO_SIZE = 104
_LAST_DATA_RECV_OFFSET = 52

StartResponse = Callable[..., Any]


class BodyTooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body is larger than {limit} bytes")


class BodyIncompleteError(Exception):
    def __init__(self, received: int, announced: int) -> None:
        self.received = received
        self.announced = announced
        super().__init__(f"request body ended after {received} of {announced} bytes")


class BodyTimeoutError(Exception):
    """The body did not arrive in time, or no body slot was free."""


@dataclass(order=True)
class _Watch:
    deadline: float
    number: int
    remote: str = field(compare=False)
    port: int = field(compare=False)
    done: bool = field(default=False, compare=False)


class _Watchdog:
    """Cuts off body reads that outlive their deadline (one thread per process, started lazily:
    granian may import the application before it forks its workers)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.condition = threading.Condition()
        self.heap: list[_Watch] = []
        self.numbers = itertools.count()
        self.pid = 0

    @contextmanager
    def watching(self, remote: str, port: int) -> Iterator[_Watch]:
        watch = _Watch(time.monotonic() + self.timeout, next(self.numbers), remote, port)
        with self.condition:
            if self.pid != os.getpid():
                self.pid = os.getpid()
                self.heap = []
                threading.Thread(target=self._run, name="body-watchdog", daemon=True).start()
            heapq.heappush(self.heap, watch)
            if self.heap[0] is watch:
                self.condition.notify()
        try:
            yield watch
        finally:
            watch.done = True  # left in the heap; dropped when its deadline comes

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.heap or self.heap[0].deadline > time.monotonic():
                    self.condition.wait(self.heap[0].deadline - time.monotonic() if self.heap else None)
                watch = heapq.heappop(self.heap)
                if watch.done:
                    continue
            try:
                cut = shut_idle_connections(watch.remote, watch.port, idle_ms=int(self.timeout * 1000) - 50)
                logger.warning(
                    "request body from %s did not arrive within %.1f s: %d idle connection(s) closed",
                    watch.remote,
                    self.timeout,
                    cut,
                )
            except Exception:  # never let the watchdog die
                logger.exception("could not close the connection of a stalled request body")


def shut_idle_connections(remote: str, port: int, *, idle_ms: int) -> int:
    """Shut the read side of this process's TCP connections from ``remote`` to ``port`` that
    have received nothing for ``idle_ms``; the server's pending reads on them return."""
    cut = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue  # closed meanwhile, or not a socket we can look at
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                continue
            if sock.getsockname()[1] != port or sock.getpeername()[0] != remote:
                continue
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            if struct.unpack_from("I", info, _LAST_DATA_RECV_OFFSET)[0] >= idle_ms:
                sock.shutdown(socket.SHUT_RD)
                cut += 1
        except OSError:
            continue  # not connected (the listening socket), or gone meanwhile
        finally:
            sock.close()  # our duplicate only
    return cut


class BodyReader:
    """Reads bodies for one process (see the module docstring)."""

    def __init__(self, *, timeout: float, slots: int, max_size: int) -> None:
        self.timeout = timeout
        self.max_size = max_size
        self.slot_count = slots
        self.slots = threading.BoundedSemaphore(slots)
        # When each read that holds a slot began (by a token of its own).
        self.reading: dict[object, float] = {}
        self.watchdog = _Watchdog(timeout)

    def _acquire_slot(self) -> bool:
        deadline = time.monotonic() + MAX_SLOT_WAIT
        while not self.slots.acquire(timeout=SLOT_POLL):
            now = time.monotonic()
            begun = list(self.reading.values())
            stalled = len(begun) >= self.slot_count and all(now - started >= SLOW_READ for started in begun)
            if stalled or now >= deadline:
                return False
        return True

    def read(self, environ: dict[str, Any]) -> bytes | None:
        """The whole body (None when the request has none); raises the errors above."""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            announced = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None  # Django answers an unreadable length
        if chunked and not announced:
            size = self.max_size + 1
        elif announced <= 0 or announced > self.max_size:
            return None  # nothing to read, or refused by Django from the header alone (413)
        else:
            size = announced
        if not self._acquire_slot():
            raise BodyTimeoutError("too many request bodies are arriving slowly at the moment; retry")
        started = time.monotonic()
        token = object()
        self.reading[token] = started
        try:
            with self.watchdog.watching(*_client_address(environ)):
                body = bytes(environ["wsgi.input"].read(size))
        finally:
            del self.reading[token]
            self.slots.release()
        # Cut short by the watchdog (its own deadline, or its connection found idle as long when
        # another request's deadline came): a timeout, not a client that hung up.
        cut = time.monotonic() - started >= self.timeout - 0.1
        if cut and (len(body) < announced or (chunked and len(body) <= self.max_size)):
            raise BodyTimeoutError(f"the request body did not arrive within {self.timeout:g} s")
        if len(body) > self.max_size:
            raise BodyTooLargeError(self.max_size)
        if not chunked and len(body) < announced:
            raise BodyIncompleteError(len(body), announced)
        return body


def _client_address(environ: dict[str, Any]) -> tuple[str, int]:
    remote = environ.get("REMOTE_ADDR", "")
    if remote.count(":") == 1:  # "host:port" (some servers pass the port along)
        remote = remote.rsplit(":", 1)[0]
    return remote.strip("[]"), int(environ.get("SERVER_PORT") or 0)


def body_reader() -> BodyReader:
    config = settings.BIRB
    return BodyReader(
        timeout=config.request_body_timeout,
        slots=max(1, config.api_threads // 2),
        max_size=settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
    )


def buffered(reader: BodyReader, environ: dict[str, Any], start_response: StartResponse) -> list[bytes] | None:
    """Read the body into ``environ`` (a ``BytesIO`` and its ``CONTENT_LENGTH``); on failure,
    answer the request here (the contract's JSON error, connection closed) and return the body
    of that answer."""
    try:
        body = reader.read(environ)
    except BodyTimeoutError as error:
        return _answer(start_response, 408, "TIMEOUT", f"{error}; send the whole body at once", None)
    except BodyTooLargeError as error:
        message = f"request body is larger than {error.limit} bytes"
        return _answer(start_response, 413, "PAYLOAD_TOO_LARGE", message, {"max_body_size": error.limit})
    except BodyIncompleteError as error:
        details = {"received": error.received, "content_length": error.announced}
        return _answer(start_response, 400, "INVALID_REQUEST", str(error), details)
    if body is not None:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
    return None


def _answer(start_response: StartResponse, status: int, code: str, message: str, details: Any) -> list[bytes]:
    response = error_response(status, code, message, details)
    content = response.content
    headers = [*response.items(), ("Content-Length", str(len(content))), ("Connection", "close")]
    start_response(f"{status} {response.reason_phrase}", headers)
    return [content]
