"""Background rehydration jobs: started from the console, run by ``manage.py runjobs``.

The web request only inserts a queued :class:`~ops.models.RehydrationJob`; the runner claims it
(``SELECT … FOR UPDATE SKIP LOCKED``), counts what it will load, calls
:func:`persistence.rehydration.cache_entries_rehydrate` and writes its progress to the row at
most every :data:`PROGRESS_INTERVAL` seconds. The row's unique ``active`` flag lets only one job
be queued or running at a time.

One runner works at a time: it holds a Redis lock (renewed while it lives), so a second
``runjobs`` waits instead of declaring the first one's job dead. A runner that gets the lock
marks jobs left ``running`` by a runner that died as failed.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, IntegrityError, close_old_connections, transaction
from django.utils import timezone
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from redis.lock import Lock

from ops.audit import audit_record_command
from ops.models import RehydrationJob
from persistence import redis_store
from persistence.keys import KEY_RULE, redis_key
from persistence.rehydration import RehydrationResult, cache_entries_rehydrate, count_live

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5
POLL_INTERVAL = 1.0
LOCK_TTL_MS = 30_000
LOCK_RENEW_INTERVAL = 5.0
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._:-]{0,255}")
STALE_ERROR = "runner stopped: the process running this job died before it finished; start it again"


class JobAlreadyRunningError(Exception):
    """Another rehydration is queued or running (only one may be active)."""

    def __init__(self, active: RehydrationJob | None) -> None:
        self.active = active
        what = f"job #{active.pk} ({active})" if active is not None else "another rehydration"
        super().__init__(
            f"{what} is already queued or running; only one rehydration runs at a time: "
            "wait for it to finish or cancel it"
        )


class InvalidPrefixError(ValueError):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        super().__init__(f"invalid key prefix {prefix!r}: keys are {KEY_RULE}")


class JobStoppedError(Exception):
    """The job must stop: the runner is shutting down, or the job was cancelled."""


# --- starting, cancelling, reading -----------------------------------------------------------


def rehydration_job_start(*, prefix: str = "", force: bool = False, user: Any = None) -> RehydrationJob:
    """Queue a rehydration of every live entry (``prefix`` empty) or of the keys under ``prefix``.

    Raises :class:`JobAlreadyRunningError` while another job is queued or running.
    """
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise InvalidPrefixError(prefix)
    created_by = user if user is not None and getattr(user, "is_authenticated", False) else None
    try:
        with transaction.atomic():
            job = RehydrationJob.objects.create(
                prefix=prefix, force=force, created_by=created_by, status=RehydrationJob.QUEUED, active=True
            )
    except IntegrityError:
        raise JobAlreadyRunningError(rehydration_job_active()) from None
    logger.info("rehydration job %d queued (%s)", job.pk, job)
    return job


def rehydration_job_active() -> RehydrationJob | None:
    return RehydrationJob.objects.filter(active=True).first()


def rehydration_job_cancel(*, job: RehydrationJob, user: Any = None) -> bool:
    """Stop an active job: a queued one never starts, a running one stops within a chunk.

    Returns False when the job had already finished.
    """
    who = getattr(user, "get_username", lambda: "")() or "an operator"
    cancelled = RehydrationJob.objects.filter(pk=job.pk, active=True).update(
        status=RehydrationJob.FAILED, active=None, finished_at=timezone.now(), error=f"cancelled by {who}"
    )
    if cancelled:
        logger.warning("rehydration job %d cancelled by %s", job.pk, who)
    return bool(cancelled)


@dataclass(frozen=True)
class JobProgress:
    """What the console shows of a job: done / total, percent, rate, elapsed, time left."""

    done: int
    total: int
    percent: float | None
    elapsed: timedelta | None
    rate: float | None  # entries per second
    remaining: timedelta | None


def job_progress(job: RehydrationJob, *, now: datetime | None = None) -> JobProgress:
    now = now or timezone.now()
    percent = min(100.0, 100.0 * job.done / job.total) if job.total else None
    if job.status == RehydrationJob.DONE and not job.total:
        percent = 100.0
    elapsed = ((job.finished_at or now) - job.started_at) if job.started_at else None
    seconds = elapsed.total_seconds() if elapsed else 0.0
    rate = job.done / seconds if seconds > 0 else None
    remaining = None
    if rate and job.status == RehydrationJob.RUNNING and job.total > job.done:
        remaining = timedelta(seconds=round((job.total - job.done) / rate))
    return JobProgress(job.done, job.total, percent, elapsed, rate, remaining)


# --- running ---------------------------------------------------------------------------------


def jobs_fail_stale() -> int:
    """Mark jobs left ``running`` by a runner that died as failed (call only while holding the
    runner lock: then no other runner is working on them)."""
    failed = RehydrationJob.objects.filter(status=RehydrationJob.RUNNING).update(
        status=RehydrationJob.FAILED, active=None, finished_at=timezone.now(), error=STALE_ERROR
    )
    if failed:
        logger.warning("marked %d rehydration job(s) left running by a dead runner as failed", failed)
    return failed


def _claim_next() -> RehydrationJob | None:
    with transaction.atomic():
        job = (
            RehydrationJob.objects.select_for_update(skip_locked=True)
            .filter(status=RehydrationJob.QUEUED, active=True)
            .order_by("created_at")
            .first()
        )
        if job is None:
            return None
        job.status = RehydrationJob.RUNNING
        job.started_at = timezone.now()
        job.save(update_fields=["status", "started_at"])
    return job


class _ProgressWriter:
    """Writes the running totals to the job row, at most every PROGRESS_INTERVAL seconds, and
    stops the job when the runner is stopping or the row says it was cancelled."""

    def __init__(self, job: RehydrationJob, stop: threading.Event | None, heartbeat: Callable[[], None] | None):
        self.job = job
        self.stop = stop
        self.heartbeat = heartbeat
        self.last_write = 0.0

    def __call__(self, result: RehydrationResult) -> None:
        if self.stop is not None and self.stop.is_set():
            raise JobStoppedError("runner stopped (SIGTERM/SIGINT) before the job finished; start it again")
        now = time.monotonic()
        if now - self.last_write < PROGRESS_INTERVAL:
            return
        self.last_write = now
        written = RehydrationJob.objects.filter(pk=self.job.pk, status=RehydrationJob.RUNNING).update(
            done=result.done, loaded=result.loaded, skipped=result.skipped_present
        )
        if not written:
            raise JobStoppedError("cancelled")
        if self.heartbeat is not None:
            self.heartbeat()


def _run(job: RehydrationJob, *, stop: threading.Event | None, heartbeat: Callable[[], None] | None) -> None:
    prefix = job.prefix or None
    writer = _ProgressWriter(job, stop, heartbeat)
    result = RehydrationResult()
    total = 0

    def report(running: RehydrationResult) -> None:
        nonlocal result
        result = running
        writer(running)

    error = ""
    went_through = False
    try:
        total = count_live(prefix=prefix)
        RehydrationJob.objects.filter(pk=job.pk).update(total=total)
        logger.info("rehydration job %d running: %d live entries (%s)", job.pk, total, job)
        result = cache_entries_rehydrate(prefix=prefix, force=job.force, report=report)
        # It went through; rows that could not be loaded make it a failure that lists them.
        error = failed_rows_message(result) if result.failed else ""
        went_through = True
    except JobStoppedError as stopped:
        error = str(stopped)
    except Exception as failure:  # whatever it was, the job row must say so and stop being active
        error = f"{type(failure).__name__}: {failure}".strip()
        logger.exception("rehydration job %d failed: %s", job.pk, error, extra={"error": error})
    status = RehydrationJob.FAILED if error else RehydrationJob.DONE
    counts = {"done": result.done, "loaded": result.loaded, "skipped": result.skipped_present}
    finished = RehydrationJob.objects.filter(pk=job.pk, status=RehydrationJob.RUNNING).update(
        **counts, status=status, error=error, active=None, finished_at=timezone.now()
    )
    if not finished:  # cancelled meanwhile: keep its status and reason, record how far it got
        RehydrationJob.objects.filter(pk=job.pk).update(**counts)
        logger.warning("rehydration job %d stopped after %d entries: cancelled", job.pk, counts["done"])
    elif error and went_through:
        logger.warning(
            "rehydration job %d finished: %d loaded, %d already in Redis, %s",
            job.pk,
            result.loaded,
            result.skipped_present,
            error,
        )
    elif error:
        logger.warning("rehydration job %d stopped after %d of %d entries: %s", job.pk, counts["done"], total, error)
    else:
        logger.info(
            "rehydration job %d done: %d loaded, %d already in Redis", job.pk, result.loaded, result.skipped_present
        )


FAILURES_LISTED = 20  # in the job row; the runner's log has every one


def failed_rows_message(result: RehydrationResult) -> str:
    """The job's error when rows could not be loaded (the others were): how many, which, why."""
    listed = "; ".join(f"{failure.key} ({failure.reason})" for failure in result.failures[:FAILURES_LISTED])
    more = ""
    if result.failed > FAILURES_LISTED:
        more = f"; and {result.failed - FAILURES_LISTED} more (see the job runner's log)"
    entries = "entry" if result.failed == 1 else "entries"
    return f"{result.failed} {entries} could not be loaded into Redis (the others were): {listed}{more}"


def run_pending_jobs(
    *, stop: threading.Event | None = None, heartbeat: Callable[[], None] | None = None
) -> list[RehydrationJob]:
    """Run every queued job, one after the other; returns them as they ended."""
    ran: list[RehydrationJob] = []
    while stop is None or not stop.is_set():
        job = _claim_next()
        if job is None:
            break
        _run(job, stop=stop, heartbeat=heartbeat)
        job.refresh_from_db()
        ran.append(job)
    return ran


# --- the runner process ----------------------------------------------------------------------


def _runner_lock_key() -> str:
    return redis_key("ops", "jobs-runner")


def runner_alive() -> bool | None:
    """Whether a ``runjobs`` process holds the runner lock (None: Redis did not answer)."""
    try:
        return bool(redis_store.client().exists(_runner_lock_key()))
    except RedisError:
        return None


class RunnerLock:
    """At most one runner at a time: redis-py's lock (a key holding this runner's token),
    renewed while the runner lives and gone ``LOCK_TTL_MS`` after it dies."""

    def __init__(self) -> None:
        self.key = _runner_lock_key()
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock: Lock | None = None
        self.last_renew = 0.0

    @property
    def lock(self) -> Lock:
        # Made on first use: on a Redis Cluster the client itself connects (and may raise a
        # RedisError the runner waits out) when it is first asked for.
        if self._lock is None:
            self._lock = redis_store.client().lock(self.key, timeout=LOCK_TTL_MS / 1000, thread_local=False)
        return self._lock

    def acquire(self) -> bool:
        if self.lock.acquire(blocking=False, token=self.token):
            self.last_renew = time.monotonic()
            return True
        return False

    def renew(self) -> None:
        """Keep the lock (throttled); a lock lost meanwhile (Redis flushed) is taken again."""
        if time.monotonic() - self.last_renew < LOCK_RENEW_INTERVAL:
            return
        try:
            self.lock.reacquire()
        except LockNotOwnedError:
            if not self.acquire():
                holder = redis_store.client().get(self.key)
                logger.error("the job runner lock %s is held by another runner (%s)", self.key, holder)
        self.last_renew = time.monotonic()

    def release(self) -> None:
        try:
            self.lock.release()
        except (LockError, RedisError) as error:
            logger.warning("could not release the job runner lock (it expires by itself): %s", error)


def runner_run(*, stop: threading.Event, warm: bool = False, poll: float = POLL_INTERVAL, once: bool = False) -> None:
    """The ``runjobs`` loop: take the runner lock, fail stale jobs, optionally queue a warm-up
    rehydration of everything, then run queued jobs every ``poll`` seconds until ``stop``."""
    lock = RunnerLock()
    waiting_logged = False
    while not stop.is_set():
        try:
            if lock.acquire():
                break
        except RedisError as error:
            logger.warning("job runner waiting for Redis: %s", error)
        else:
            if not waiting_logged:
                logger.info("another job runner holds %s; waiting for it to stop", lock.key)
                waiting_logged = True
        if once:
            return
        stop.wait(poll)
    else:
        return
    logger.info("job runner started (poll every %.1fs)", poll)
    try:
        _runner_loop(lock, stop=stop, warm=warm, poll=poll, once=once)
    finally:
        lock.release()
        logger.info("job runner stopped")


def _runner_loop(lock: RunnerLock, *, stop: threading.Event, warm: bool, poll: float, once: bool) -> None:
    warm_queued = not warm
    while not stop.is_set():
        try:
            lock.renew()
            # Holding the lock and between jobs, a job marked running is one nobody runs: left by
            # a runner that died, or by this one when the database went away mid-job.
            jobs_fail_stale()
            if not warm_queued:
                _queue_warm_up()
                warm_queued = True
            run_pending_jobs(stop=stop, heartbeat=lock.renew)
        except (DatabaseError, RedisError) as error:
            logger.error("job runner: %s; retrying in %.1fs", error, poll, extra={"error": str(error)})
            close_old_connections()
        if once:
            return
        stop.wait(poll)


def job_target(job: RehydrationJob) -> str:
    """How the audit log names a job."""
    return f"rehydration job #{job.pk}"


def _queue_warm_up() -> None:
    try:
        with transaction.atomic():  # the job and its audit entry commit together
            job = rehydration_job_start(prefix="", force=False)
            audit_record_command(
                action="job.start",
                target=job_target(job),
                details={"job_id": job.pk, "prefix": "", "force": False, "warm_up": True},
            )
    except JobAlreadyRunningError as error:
        logger.info("cache warm-up not queued: %s", error)
    else:
        logger.info("cache warm-up queued as rehydration job %d", job.pk)
