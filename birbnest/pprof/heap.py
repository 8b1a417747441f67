"""Heap snapshot: the live allocations that take the most memory, by where they were made.

tracemalloc costs memory and time on every allocation while it traces, so it is not left on:
unless the process was started with ``PYTHONTRACEMALLOC=N`` (Python's own switch, then the
snapshot covers everything since start), a request traces for ``seconds`` and reports what was
allocated in that window and is still alive (what a leak or a growing buffer looks like), then
stops tracing.
"""

from __future__ import annotations

import os
import resource
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 25
_busy = threading.Lock()
_HERE = str(Path(__file__).parent / "*")


class HeapBusyError(RuntimeError):
    """A heap snapshot is already being taken in this process."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _rss() -> int | None:
    """This process's resident set size, from /proc (Linux); None elsewhere."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def snapshot(*, seconds: float, top: int, header: str) -> str:
    """The ``top`` allocation sites by live size, as text (tracebacks most recent call last)."""
    if not _busy.acquire(blocking=False):
        raise HeapBusyError("a heap snapshot is already being taken in this process; try again when it ends")
    try:
        if tracemalloc.is_tracing():
            how = "tracing since start (PYTHONTRACEMALLOC): every live allocation"
            taken = tracemalloc.take_snapshot()
        else:
            how = f"traced for {seconds:g} s: allocations made in that window and still alive"
            tracemalloc.start(FRAMES)
            try:
                time.sleep(seconds)
                taken = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
        return _report(taken, how=how, top=top, header=header)
    finally:
        _busy.release()


def _report(taken: tracemalloc.Snapshot, *, how: str, top: int, header: str) -> str:
    taken = taken.filter_traces(
        [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
            tracemalloc.Filter(False, _HERE),
        ]
    )
    stats = taken.statistics("traceback")
    total = sum(stat.size for stat in stats)
    rss = _rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = [
        header,
        f"# tracemalloc, {how}\n",
        f"# traced: {_size(total)} in {sum(s.count for s in stats)} blocks at {len(stats)} sites; "
        f"process RSS {_size(rss) if rss is not None else 'unknown'} (peak {_size(peak)})\n\n",
    ]
    for rank, stat in enumerate(stats[:top], 1):
        out.append(f"#{rank}: {_size(stat.size)} in {stat.count} blocks (average {_size(stat.size / stat.count)})\n")
        out.extend(line + "\n" for line in stat.traceback.format(most_recent_first=False))
        out.append("\n")
    return "".join(out)
