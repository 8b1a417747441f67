"""A small asyncio HTTP/1.1 client: keep-alive connections, Content-Length or chunked bodies.

Used to pre-populate keys, for the paced writer of the persist-lag measurement, and in place
of wrk when wrk is not installed (then only for a smoke run, and said so: its figures are not
comparable with wrk's, a Python client on the same two cores costs far more per request).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

Request = tuple[str, str, bytes | None]  # method, path, body


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class HttpConnection:
    """One keep-alive connection; reconnects by itself after the server closed it."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, headers: dict[str, str] | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.extra_head = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._request(method, path, body), self.timeout)
        except BaseException:
            self.close()  # the connection's state is unknown now
            raise

    async def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self._writer is None:
            await self._connect()
        assert self._reader is not None and self._writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.extra_head}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            payload = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self._reader.readline()).split(b";")[0], 16)
                parts.append(await self._reader.readexactly(size + 2))
                if size == 0:
                    break
            payload = b"".join(part[:-2] for part in parts)
        else:
            payload = b""
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, payload


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float]
    non_2xx: int
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": round(percentile(self.latencies_ms, 50), 3),
            "p99_ms": round(percentile(self.latencies_ms, 99), 3),
            "non_2xx": self.non_2xx,
            "errors": self.errors,
        }


async def closed_loop(
    host: str,
    port: int,
    next_request: Callable[[int], Request],
    *,
    connections: int,
    duration: float,
    headers: dict[str, str] | None = None,
    expect: int | None = None,
    on_answer: Callable[[int, bytes], None] | None = None,
    timeout: float = 10.0,
) -> LoadResult:
    """``connections`` clients each sending the next request as soon as the last one answered.

    An answer counts in ``non_2xx`` when its status is not 2xx, or, with ``expect``, when it is
    not that status (GET absent key expects 404). ``on_answer(status, body)`` sees every answer.
    ``timeout``: seconds to wait for an answer before counting an error.
    """
    latencies: list[float] = []
    counts = {"n": 0, "non_2xx": 0, "errors": 0}
    began = time.perf_counter()
    end = began + duration

    async def client() -> None:
        conn = HttpConnection(host, port, timeout=timeout, headers=headers)
        try:
            while time.perf_counter() < end:
                i = counts["n"]
                counts["n"] += 1
                method, path, body = next_request(i)
                start = time.perf_counter()
                try:
                    status, payload = await conn.request(method, path, body)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                    counts["errors"] += 1
                    await asyncio.sleep(0.01)
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                if (status != expect) if expect is not None else not 200 <= status < 300:
                    counts["non_2xx"] += 1
                if on_answer is not None:
                    on_answer(status, payload)
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return LoadResult(len(latencies), time.perf_counter() - began, latencies, counts["non_2xx"], counts["errors"])


@dataclass
class PacedResult:
    sent: int
    ok: int
    seconds: float
    non_2xx: int
    errors: int
    not_sent: int  # due, but no connection was free before the window closed: the API fell behind
    start_delay_ms: list[float]  # how late each request left, against its schedule
    error_kinds: dict[str, int]

    def summary(self) -> dict[str, float | int]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "achieved_rps": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "not_sent": self.not_sent,
            "error_kinds": self.error_kinds,
            "start_delay_p99_ms": round(percentile(self.start_delay_ms, 99), 1),
        }


async def paced(
    host: str,
    port: int,
    make_request: Callable[[int], Request],
    on_answer: Callable[[int, int, bytes, float], None],
    *,
    rate: float,
    duration: float,
    connections: int = 64,
) -> PacedResult:
    """Request ``i`` is due at ``start + i / rate`` (open loop, up to ``connections`` in flight).

    ``on_answer(i, status, body, monotonic time)`` is called as each answer arrives. Requests
    still waiting for a connection one second after the window closed are not sent (counted):
    an API that cannot keep up shows as a lower achieved rate, not as a run that never ends.
    """
    total = int(rate * duration)
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    counts = {"ok": 0, "non_2xx": 0, "errors": 0, "not_sent": 0}
    kinds: dict[str, int] = {}
    delays: list[float] = []
    began = time.monotonic()
    closes = began + duration + 1.0

    async def scheduler() -> None:
        for i in range(total):
            due = began + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.put_nowait((i, due))
        for _ in range(connections):
            queue.put_nowait(None)

    async def client() -> None:
        conn = HttpConnection(host, port)
        try:
            while (item := await queue.get()) is not None:
                i, due = item
                if time.monotonic() > closes:
                    counts["not_sent"] += 1
                    continue
                delays.append((time.monotonic() - due) * 1000)
                method, path, body = make_request(i)
                try:
                    status, payload = await conn.request(method, path, body)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as error:
                    counts["errors"] += 1
                    kinds[type(error).__name__] = kinds.get(type(error).__name__, 0) + 1
                    continue
                on_answer(i, status, payload, time.monotonic())
                counts["ok" if 200 <= status < 300 else "non_2xx"] += 1
        finally:
            conn.close()

    await asyncio.gather(scheduler(), *(client() for _ in range(connections)))
    return PacedResult(
        total,
        counts["ok"],
        time.monotonic() - began,
        counts["non_2xx"],
        counts["errors"],
        counts["not_sent"],
        delays,
        kinds,
    )
