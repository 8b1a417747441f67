"""The runbook's "goroutine dump": every thread's stack and every asyncio task's stack, as text."""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections.abc import Iterable
from types import FrameType
from typing import Any


def _all_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of every event loop in the process (``asyncio.all_tasks`` sees only one loop's).

    Python 3.11 keeps them in one weak set; later versions split it (scheduled + eager).
    """
    sets = [getattr(asyncio.tasks, name, None) for name in ("_all_tasks", "_scheduled_tasks", "_eager_tasks")]
    for _ in range(100):  # the sets change while other threads run: copy them until that works
        try:
            return [task for tasks in sets if tasks is not None for task in list(tasks)]
        except RuntimeError:
            continue
    return []


def _coroutine_frames(task: asyncio.Task[Any]) -> list[FrameType]:
    """The task's awaiting chain, outermost coroutine first (``Task.get_stack`` stops at the first)."""
    frames: list[FrameType] = []
    awaitable: Any = task.get_coro()
    for _ in range(1000):
        if awaitable is None:
            break
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        frame = frame or getattr(awaitable, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        awaitable = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "ag_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
        )
    return frames


def _format_frames(frames: Iterable[FrameType]) -> list[str]:
    lines = []
    for frame in frames:
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n')
    return lines


def dump(*, header: str) -> str:
    """Every thread (name, id, daemon) with its stack, then every task grouped by event loop."""
    threads = {thread.ident: thread for thread in threading.enumerate()}
    frames = sys._current_frames()
    out = [header, f"# {len(frames)} threads\n\n"]
    for ident, frame in sorted(frames.items(), key=lambda item: getattr(threads.get(item[0]), "name", "~")):
        thread = threads.get(ident)
        name = thread.name if thread is not None else "(not started by threading: e.g. a granian thread)"
        daemon = f", daemon={thread.daemon}" if thread is not None else ""
        out.append(f'Thread {ident} "{name}"{daemon}:\n')
        out.extend(traceback.format_stack(frame))
        out.append("\n")
    del frames
    tasks = _all_tasks()
    by_loop: dict[int, list[asyncio.Task[Any]]] = {}
    loops: dict[int, Any] = {}
    for task in tasks:
        loop = task.get_loop()
        by_loop.setdefault(id(loop), []).append(task)
        loops[id(loop)] = loop
    out.append(f"# {len(tasks)} asyncio tasks in {len(loops)} event loops\n\n")
    for loop_id, loop_tasks in by_loop.items():
        loop = loops[loop_id]
        state = "running" if loop.is_running() else "closed" if loop.is_closed() else "stopped"
        out.append(f"Event loop {loop_id:#x} ({type(loop).__name__}, {state}): {len(loop_tasks)} tasks\n")
        for task in sorted(loop_tasks, key=lambda t: t.get_name()):
            status = "done" if task.done() else "pending"
            out.append(f'Task "{task.get_name()}" ({status}) {task.get_coro()!r}:\n')
            out.extend(_format_frames(_coroutine_frames(task)))
            out.append("\n")
    return "".join(out)
