"""Fault-injection harness: a writer that records what was acknowledged, and the PostgreSQL check.

`FaultWriter` runs threads that write (POST/PUT ~90%, DELETE ~10%) through the real API while a
fault is injected. Every key belongs to ONE thread (keys ``<prefix>-<thread>-<slot>[.<gen>]``),
so the operations on a key are sequential and their order is known:

- the last operation on a key answered 2xx (write 200/201 with its version and value, delete 204)
  defines the key's expected final state;
- an operation that got no definite answer (5xx, or a transport error after the request may have
  reached the server) may or may not be applied: the key is then *retired* (the thread moves the
  slot to a fresh key) so that exactly two final states are acceptable for it: the one of its
  last acknowledged operation, or the one of the unanswered operation. Such keys are "uncertain";
  they are still checked against those two outcomes.

`check_postgresql` compares the ``cache_entries`` rows with what was acknowledged and returns a
`Verdict` (acknowledged, persisted, lost, resurrected, ...); `settle` waits for the drain, and
`report` prints the verdict's `summary_line`, appends it to ``test-artifacts/faults-summary.txt``
and asserts.

A key whose last acknowledged operation is a write of version v must have a live row with
version v and that value (or, when the key is uncertain, the unanswered write's value). Nothing
but this thread's operations can assign a version to the key, so a row with a version above v
and no unanswered operation after v means an older write has overtaken an acknowledged newer
one: that counts as lost too.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

BASE_DIR = Path(__file__).resolve().parent.parent.parent
SUMMARY_FILE = BASE_DIR / "test-artifacts" / "faults-summary.txt"

SET = "set"
DELETE = "delete"


@dataclass
class Op:
    kind: str  # SET | DELETE
    value: Any = None  # the value written (SET)
    version: int | None = None  # the acknowledged version (SET); DELETE answers 204 without one
    status: int = 0  # HTTP status, 0 = no answer


@dataclass
class KeyLog:
    """The history of one key, as seen by the one thread that owns it."""

    key: str
    acked: list[Op] = field(default_factory=list)  # acknowledged operations, in order
    pending: Op | None = None  # an unanswered operation after the last acknowledged one (key retired)

    @property
    def last(self) -> Op | None:
        return self.acked[-1] if self.acked else None

    @property
    def live(self) -> bool:
        """What the owning thread believes: the key holds a value."""
        return self.last is not None and self.last.kind == SET


@dataclass
class Row:
    version: int
    deleted: bool
    value: Any


@dataclass
class Problem:
    key: str
    kind: str  # "lost" | "resurrected"
    expected: str
    row: Row | None

    def __str__(self) -> str:
        row = self.row
        found = "no row" if row is None else f"row v{row.version} deleted={row.deleted} value={row.value!r}"
        return f"{self.kind}: {self.key}: expected {self.expected}; PostgreSQL has {found}"


@dataclass
class Verdict:
    fault: str
    acknowledged: int
    persisted: int
    lost: int
    resurrected: int
    dlq: int
    unexpected_5xx: int
    documented_503: int
    uncertain: int
    unanswered: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.resurrected == 0

    def summary_line(self) -> str:
        return (
            f"fault={self.fault} acknowledged={self.acknowledged} persisted={self.persisted} lost={self.lost} "
            f"resurrected={self.resurrected} dlq={self.dlq} 5xx={self.unexpected_5xx}"
        )


class WriterThreads:
    """Writer threads run by a ``with`` block: started on entry, stopped and joined on exit. A
    thread that dies of an exception records it in ``crashed`` (a harness bug must fail the
    test, not vanish in a thread). Subclasses set ``timeout`` and write ``_run(n)``."""

    timeout: float

    def _start_threads(self, count: int, name: str) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.crashed: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._thread_main, args=(n,), name=f"{name}-{n}", daemon=True) for n in range(count)
        ]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_and_join()

    def stop_and_join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"writer threads did not stop: {alive}"

    def _thread_main(self, n: int) -> None:
        try:
            self._run(n)
        except BaseException as error:
            with self.lock:
                self.crashed.append(error)
            raise

    def _run(self, n: int) -> None:
        raise NotImplementedError


class FaultWriter(WriterThreads):
    """Writer threads against a base URL that may be switched while they run (``base_url``)."""

    def __init__(
        self,
        base_url: str,
        *,
        threads: int = 8,
        keys_per_thread: int = 40,
        delete_ratio: float = 0.1,
        timeout: float = 30.0,
        seed: int | None = None,
        extra_keys: dict[int, list[str]] | None = None,
        base_urls: list[str] | None = None,
    ) -> None:
        self.base_url = base_url
        self.base_urls = base_urls
        self.threads = threads
        self.keys_per_thread = keys_per_thread
        self.delete_ratio = delete_ratio
        self.timeout = timeout
        self.prefix = f"f{uuid.uuid4().hex[:10]}"
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.extra_keys = extra_keys or {}
        self.keys: dict[str, KeyLog] = {}
        self.statuses: Counter[int] = Counter()  # 0 = no answer
        self.transport_errors: Counter[str] = Counter()
        self.unexpected: list[str] = []  # 5xx without the contract's 503 body, unexpected 4xx
        self.not_found_deletes = 0  # DELETE of a key the thread believes live answered 404
        self.acknowledged = 0
        self._start_threads(threads, "fault-writer")

    def url_for(self, n: int) -> str:
        """The API thread ``n`` writes through: ``base_url``, or with ``base_urls`` (several APIs)
        the n-th of them, round robin (each key still has one writer, so its order is known)."""
        return self.base_urls[n % len(self.base_urls)] if self.base_urls else self.base_url

    def key_name(self, n: int, slot: int, gen: int) -> str:
        return f"{self.prefix}-{n}-{slot}" + (f".{gen}" if gen else "")

    def _run(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        gens = [0] * self.keys_per_thread
        logs = [KeyLog(self.key_name(n, slot, 0)) for slot in range(self.keys_per_thread)]
        for extra in self.extra_keys.get(n, []):
            logs.append(KeyLog(extra))
        gens += [0] * len(self.extra_keys.get(n, []))
        with self.lock:
            for log in logs:
                self.keys[log.key] = log
        i = 0
        with httpx.Client(timeout=self.timeout) as http:
            while not self.stop.is_set():
                slot = rng.randrange(len(logs))
                log = logs[slot]
                i += 1
                if log.live and rng.random() < self.delete_ratio:
                    op = Op(DELETE)
                    method = "DELETE"
                    body = None
                else:
                    op = Op(SET, value={"t": n, "i": i, "s": self.seed})
                    method = rng.choice(("POST", "PUT"))
                    body = {"value": op.value}
                url = f"{self.url_for(n)}/v1/cache/{log.key}"
                try:
                    response = http.request(method, url, json=body)
                except httpx.ConnectError as error:
                    # Never reached the server (connection refused): nothing was applied.
                    self._count(0, f"connect: {type(error).__name__}")
                    time.sleep(0.05)
                    continue
                except httpx.HTTPError as error:
                    # Sent, but no answer (server died, timeout): may or may not be applied.
                    self._count(0, f"unanswered: {type(error).__name__}")
                    op.status = 0
                    self._retire(logs, gens, slot, n, op)
                    time.sleep(0.05)
                    continue
                status = response.status_code
                op.status = status
                self._count(status)
                if op.kind == SET and status in (200, 201):
                    op.version = int(response.json()["version"])
                    self._ack(log, op)
                elif op.kind == DELETE and status == 204:
                    self._ack(log, op)
                elif op.kind == DELETE and status == 404:
                    # Nothing applied. The API may not see a live key (Redis restarted empty and
                    # the worker has not written it yet): a read-your-writes gap, not a loss.
                    with self.lock:
                        self.not_found_deletes += 1
                elif status >= 500:
                    if not _is_documented_503(response):
                        self._unexpected(f"{method} {log.key}: {status} {response.text[:300]}")
                    self._retire(logs, gens, slot, n, op)
                    time.sleep(0.05)
                else:
                    self._unexpected(f"{method} {log.key}: {status} {response.text[:300]}")

    def _count(self, status: int, error: str | None = None) -> None:
        with self.lock:
            self.statuses[status] += 1
            if error:
                self.transport_errors[error] += 1

    def _ack(self, log: KeyLog, op: Op) -> None:
        with self.lock:
            log.acked.append(op)
            self.acknowledged += 1

    def _unexpected(self, what: str) -> None:
        with self.lock:
            self.unexpected.append(what)

    def _retire(self, logs: list[KeyLog], gens: list[int], slot: int, n: int, op: Op) -> None:
        """The key's last operation is unanswered: freeze it, continue on a fresh key."""
        old = logs[slot]
        old.pending = op
        if slot >= self.keys_per_thread:  # an extra (named) key is never replaced
            logs.pop(slot)
            gens.pop(slot)
            return
        gens[slot] += 1
        fresh = KeyLog(self.key_name(n, slot, gens[slot]))
        logs[slot] = fresh
        with self.lock:
            self.keys[fresh.key] = fresh

    def add_acknowledged(self, key: str, op: Op) -> None:
        """Record a write made outside the writer threads (no thread may use ``key``)."""
        with self.lock:
            log = self.keys.setdefault(key, KeyLog(key))
            log.acked.append(op)
            self.acknowledged += 1

    # -- observing ---------------------------------------------------------------------------

    @property
    def count(self) -> int:
        with self.lock:
            return self.acknowledged

    def wait_acknowledged(self, more: int, timeout: float = 30.0, what: str = "acknowledged writes") -> None:
        """Wait until ``more`` further writes were acknowledged (the service accepts writes)."""
        target = self.count + more
        deadline = time.monotonic() + timeout
        while self.count < target:
            if self.crashed:
                raise AssertionError(f"writer crashed: {self.crashed[0]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {more} {what} (got {self.count - target + more}); "
                    f"statuses {dict(self.statuses)} errors {dict(self.transport_errors)}"
                )
            time.sleep(0.05)

    def wait_status(self, status: int, at_least: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.statuses[status] < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {at_least} answers {status}: {dict(self.statuses)}")
            time.sleep(0.05)

    @property
    def documented_503(self) -> int:
        return self.statuses[503] - sum(1 for u in self.unexpected if ": 503 " in u)

    @property
    def unexpected_5xx(self) -> int:
        return sum(1 for u in self.unexpected if _status_of(u) >= 500)


def _status_of(unexpected: str) -> int:
    try:
        return int(unexpected.split(": ", 1)[1].split(" ", 1)[0])
    except (IndexError, ValueError):
        return 0


def _is_documented_503(response: httpx.Response) -> bool:
    if response.status_code != 503:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and body.get("code") == "SERVICE_UNAVAILABLE"
        and isinstance(body.get("error"), str)
        and "details" in body
    )


# --- the check ---------------------------------------------------------------------------------


def postgresql_rows(prefix: str) -> dict[str, Row]:
    from django.db import connections

    from persistence.models import CacheEntry

    try:
        rows = CacheEntry.objects.filter(key__startswith=prefix).values_list("key", "version", "deleted", "value")
        return {key: Row(version, deleted, value) for key, version, deleted, value in rows}
    except Exception:
        connections.close_all()  # a connection that died with a restarted server
        raise


def _describe(op: Op | None) -> str:
    if op is None:
        return "absent (no acknowledged operation)"
    if op.kind == DELETE:
        return "deleted"
    return f"live v{op.version} value={op.value!r}"


def _matches(op: Op | None, row: Row | None, *, exact_version: bool) -> bool:
    """Does the row show the outcome of ``op`` (None = no operation: absent or deleted)?"""
    if op is None or op.kind == DELETE:
        return row is None or row.deleted
    if row is None or row.deleted:
        return False
    if op.version is None or not exact_version:  # an unanswered write: its version is unknown
        return row.value == op.value
    return row.version == op.version and row.value == op.value


def check_postgresql(writer: FaultWriter, *, fault: str, dlq: int = 0) -> Verdict:
    rows = postgresql_rows(writer.prefix)
    with writer.lock:
        logs = list(writer.keys.values())
    acknowledged = persisted = lost = resurrected = uncertain = 0
    problems: list[Problem] = []
    for log in logs:
        row = rows.get(log.key)
        acknowledged += len(log.acked)
        if log.pending is not None:
            uncertain += 1
        last = log.last
        ok = _matches(last, row, exact_version=True) or (
            log.pending is not None and _matches(log.pending, row, exact_version=False)
        )
        if ok:
            persisted += len(log.acked)
            continue
        expected = _describe(last) + (f" or (unanswered) {_describe(log.pending)}" if log.pending else "")
        # Earlier acknowledged writes are superseded when the row holds a newer version.
        earlier = log.acked[:-1]
        kept = sum(1 for op in earlier if op.kind == DELETE or (row is not None and row.version >= (op.version or 0)))
        persisted += kept
        if last is not None and last.kind == DELETE and row is not None and not row.deleted:
            resurrected += 1
            problems.append(Problem(log.key, "resurrected", expected, row))
        else:
            lost += len(log.acked) - kept
            problems.append(Problem(log.key, "lost", expected, row))
    return Verdict(
        fault=fault,
        acknowledged=acknowledged,
        persisted=persisted,
        lost=lost,
        resurrected=resurrected,
        dlq=dlq,
        unexpected_5xx=writer.unexpected_5xx,
        documented_503=writer.documented_503,
        uncertain=uncertain,
        unanswered=writer.statuses[0],
        problems=problems,
    )


# --- JetStream state ------------------------------------------------------------------------------


def dlq_last_seq() -> int:
    """Last sequence of the dead-letter stream (grows by one per dead letter)."""
    from persistence import jetstream, streams_admin

    return streams_admin.stream_info(name=jetstream.names().dlq_stream).state.last_seq


def consumer_idle() -> bool:
    """The worker's consumer has nothing pending and nothing unacknowledged."""
    from persistence import jetstream, streams_admin

    n = jetstream.names()
    info = streams_admin.consumer_info(stream=n.stream, consumer=n.consumer)
    return info.num_pending == 0 and info.num_ack_pending == 0


def consumer_busy() -> bool:
    """Messages are delivered and not yet acknowledged: a worker is mid-batch."""
    from persistence import jetstream, streams_admin

    n = jetstream.names()
    return streams_admin.consumer_info(stream=n.stream, consumer=n.consumer).num_ack_pending > 0


def settle(
    writer: FaultWriter,
    *,
    fault: str,
    dlq_before: int,
    timeout: float = 90.0,
    stable_for: float = 3.0,
    idle: Any = None,
    dlq_seq: Any = None,
) -> Verdict:
    """Wait for the worker to drain (nothing pending or unacknowledged on the consumer, so
    messages a killed worker held have been redelivered and applied) and for PostgreSQL to show
    every acknowledged write; give up on the latter once the verdict has not changed for
    ``stable_for`` seconds with the consumer idle, or at ``timeout``. Returns the verdict.
    ``idle`` and ``dlq_seq`` replace :func:`consumer_idle` and :func:`dlq_last_seq` (another
    NATS than the session's: a cluster)."""
    idle_now = idle or consumer_idle
    dlq_now = dlq_seq or dlq_last_seq
    deadline = time.monotonic() + timeout
    stable_since: float | None = None
    last_line = ""
    verdict: Verdict | None = None
    while True:
        try:
            is_idle = idle_now()
            verdict = check_postgresql(writer, fault=fault, dlq=dlq_now() - dlq_before)
        except Exception as error:  # a server still coming back
            print(f"settle: {type(error).__name__}: {error}", flush=True)
            if time.monotonic() > deadline and verdict is not None:
                return verdict
            time.sleep(0.5)
            continue
        if is_idle and verdict.ok:
            return verdict
        line = verdict.summary_line()
        if is_idle and line == last_line:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= stable_for:
                return verdict
        else:
            stable_since = None
        last_line = line
        if time.monotonic() > deadline:
            return verdict
        time.sleep(0.5)


def report(verdict: Verdict, writer: FaultWriter, *, started: float) -> None:
    """Print the summary line (and a detail line), append it to the summary file, assert."""
    line = verdict.summary_line()
    took = time.monotonic() - started
    detail = (
        f"  detail fault={verdict.fault} seconds={took:.1f} keys={len(writer.keys)} uncertain={verdict.uncertain} "
        f"unanswered={verdict.unanswered} 503={verdict.documented_503} delete404={writer.not_found_deletes} "
        f"statuses={dict(sorted(writer.statuses.items()))} errors={dict(writer.transport_errors)} "
        f"prefix={writer.prefix}"
    )
    print("\n" + line, flush=True)
    print(detail, flush=True)
    SUMMARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    with SUMMARY_FILE.open("a") as out:
        out.write(line + "\n")
    assert not writer.crashed, f"writer crashed: {writer.crashed[0]!r}"
    problems = "\n".join(str(p) for p in verdict.problems[:20])
    assert verdict.lost == 0 and verdict.resurrected == 0, f"{line}\n{detail}\n{problems}"
    assert verdict.unexpected_5xx == 0, f"{line}\nunexpected 5xx:\n" + "\n".join(writer.unexpected[:20])
    other = [u for u in writer.unexpected if _status_of(u) < 500]
    assert not other, "unexpected answers:\n" + "\n".join(other[:20])


# --- a poison message: PostgreSQL refuses one key -------------------------------------------------


class PoisonTrigger:
    """A trigger on ``cache_entries`` that makes PostgreSQL reject every row of one key (the
    worker sees a permanent error, isolates the row and dead-letters its message). ``drop()``
    fixes the cause."""

    def __init__(self, key: str) -> None:
        assert all(c.isalnum() or c in "-_.:" for c in key), key
        self.key = key
        self.name = f"birb_poison_{uuid.uuid4().hex[:8]}"

    def install(self) -> PoisonTrigger:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                f"""CREATE FUNCTION {self.name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.key = '{self.key}' THEN
                        RAISE EXCEPTION 'poison: PostgreSQL refuses key %', NEW.key;
                    END IF;
                    RETURN NEW;
                END $$"""
            )
            cursor.execute(
                f"CREATE TRIGGER {self.name} BEFORE INSERT OR UPDATE ON cache_entries "
                f"FOR EACH ROW EXECUTE FUNCTION {self.name}()"
            )
        return self

    def drop(self) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER IF EXISTS {self.name} ON cache_entries")
            cursor.execute(f"DROP FUNCTION IF EXISTS {self.name}()")

    def __enter__(self) -> PoisonTrigger:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.drop()


# --- availability: every request counted, every acknowledged write read back ----------------------


class KeyWriter(WriterThreads):
    """Threads that POST fresh keys (``<prefix>-<thread>-<n>``) as fast as the API answers, with
    no pause after an error (what a client that retries at once sees). Every request is counted by
    outcome; every acknowledged write (201) is remembered with its version and value."""

    def __init__(self, base_url: str, *, threads: int = 8, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.prefix = f"a{uuid.uuid4().hex[:10]}"
        self.statuses: Counter[int] = Counter()  # 0 = no answer
        self.transport_errors: Counter[str] = Counter()
        self.acknowledged: dict[str, tuple[int, Any]] = {}  # key -> (version, value)
        self._start_threads(threads, "key-writer")

    def _run(self, n: int) -> None:
        i = 0
        with httpx.Client(timeout=self.timeout) as http:
            while not self.stop.is_set():
                i += 1
                key, value = f"{self.prefix}-{n}-{i}", {"t": n, "i": i}
                try:
                    response = http.post(f"{self.base_url}/v1/cache/{key}", json={"value": value})
                except httpx.HTTPError as error:
                    with self.lock:
                        self.statuses[0] += 1
                        self.transport_errors[type(error).__name__] += 1
                    continue
                with self.lock:
                    self.statuses[response.status_code] += 1
                    if response.status_code == 201:
                        self.acknowledged[key] = (int(response.json()["version"]), value)

    @property
    def requests(self) -> int:
        with self.lock:
            return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        """Requests without an answer (refused, reset, timed out) plus 5xx answers."""
        with self.lock:
            return sum(count for status, count in self.statuses.items() if status == 0 or status >= 500)

    def wait_requests(self, more: int, timeout: float = 30.0) -> None:
        target = self.requests + more
        deadline = time.monotonic() + timeout
        while self.requests < target:
            if self.crashed:
                raise AssertionError(f"writer crashed: {self.crashed[0]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {more} requests: {dict(self.statuses)}")
            time.sleep(0.02)

    def unreadable(self, base_url: str) -> list[str]:
        """Acknowledged writes that the API does not read back as written (key: what it has)."""
        with self.lock:
            expected = dict(self.acknowledged)
        keys, problems = sorted(expected), []
        with httpx.Client(timeout=30) as http:
            for start in range(0, len(keys), 100):
                chunk = keys[start : start + 100]
                response = http.post(f"{base_url}/v1/cache/batch/get", json={"keys": chunk})
                assert response.status_code == 200, response.text[:300]
                entries = response.json()["entries"]
                for key in chunk:
                    entry, (version, value) = entries.get(key), expected[key]
                    if entry is None or entry["version"] != version or entry["value"] != value:
                        problems.append(f"{key}: expected v{version} {value!r}, read {entry!r}")
        return problems


def granian_workers(main_pid: int) -> list[Any]:
    """The worker processes of the granian main process ``main_pid`` (psutil.Process objects)."""
    import psutil

    try:
        children = psutil.Process(main_pid).children()
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if "granian" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


def api_connections(proc: Any, port: int) -> int:
    """Established connections ``proc`` has accepted on the API's ``port``."""
    import psutil

    try:
        return sum(1 for c in proc.net_connections(kind="tcp") if c.status == "ESTABLISHED" and c.laddr.port == port)
    except psutil.NoSuchProcess:
        return 0
