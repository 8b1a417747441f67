"""A wall-clock sampling profiler of every thread of this process, written as speedscope JSON.

Every ``1/hz`` seconds the sampler reads each thread's current Python stack
(``sys._current_frames()``) and counts it. Nothing is hooked into the threads themselves, so it
sees granian's request threads (created by Rust, unknown to ``threading``) as well as Python's,
and it costs the process only the sampler thread's own work while a profile runs (a few
percent of one core at 100 Hz), nothing otherwise.

Output: speedscope's file format (https://www.speedscope.app, "sampled" profiles, one per
thread), or the "collapsed stacks" text of flamegraph.pl (which speedscope also opens).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType

# (function, file, first line of the function): one node of a flame graph.
FrameKey = tuple[str, str, int]
SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"


class ProfileBusyError(RuntimeError):
    """A profile is already being taken in this process (one at a time)."""


@dataclass
class Profile:
    """Stacks seen per thread (root first) and how many seconds each stood for."""

    seconds: float = 0.0
    samples: int = 0
    threads: dict[int, str] = field(default_factory=dict)
    stacks: dict[int, Counter[tuple[FrameKey, ...]]] = field(default_factory=dict)
    weights: dict[int, dict[tuple[FrameKey, ...], float]] = field(default_factory=dict)


_busy = threading.Lock()


def _stack(frame: FrameType | None) -> tuple[FrameKey, ...]:
    keys: list[FrameKey] = []
    while frame is not None:
        code = frame.f_code
        keys.append((getattr(code, "co_qualname", code.co_name), code.co_filename, code.co_firstlineno))
        frame = frame.f_back
    keys.reverse()
    return tuple(keys)


def sample(seconds: float, hz: int) -> Profile:
    """Sample every thread but this one for ``seconds`` at ``hz``; one profile at a time."""
    if not _busy.acquire(blocking=False):
        raise ProfileBusyError("a profile is already running in this process; try again when it ends")
    try:
        return _sample(seconds, hz)
    finally:
        _busy.release()


def _sample(seconds: float, hz: int) -> Profile:
    me = threading.get_ident()
    interval = 1.0 / hz
    profile = Profile()
    start = last = time.perf_counter()
    deadline = start + seconds
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        weight, last = now - last, now
        names = {t.ident: t.name for t in threading.enumerate()}
        current = sys._current_frames()
        for ident, frame in current.items():
            if ident == me:
                continue
            stack = _stack(frame)
            if not stack:
                continue
            profile.threads.setdefault(ident, names.get(ident) or f"thread {ident}")
            profile.stacks.setdefault(ident, Counter())[stack] += 1
            weights = profile.weights.setdefault(ident, {})
            weights[stack] = weights.get(stack, 0.0) + (weight or interval)
        del current  # frames keep their locals alive: hold them no longer than one sample
        profile.samples += 1
        time.sleep(max(0.0, interval - (time.perf_counter() - now)))
    profile.seconds = time.perf_counter() - start
    return profile


def speedscope(profile: Profile, *, name: str) -> dict[str, object]:
    """The profile in speedscope's JSON file format: one sampled profile per thread."""
    frames: list[dict[str, object]] = []
    index: dict[FrameKey, int] = {}

    def frame_index(key: FrameKey) -> int:
        if key not in index:
            index[key] = len(frames)
            frames.append({"name": key[0], "file": key[1], "line": key[2]})
        return index[key]

    profiles = []
    for ident, thread_name in sorted(profile.threads.items(), key=lambda item: item[1]):
        samples, weights = [], []
        for stack, weight in profile.weights[ident].items():
            samples.append([frame_index(key) for key in stack])
            weights.append(round(weight, 6))
        profiles.append(
            {
                "type": "sampled",
                "name": f"{thread_name} ({ident})",
                "unit": "seconds",
                "startValue": 0,
                "endValue": round(sum(weights), 6),
                "samples": samples,
                "weights": weights,
            }
        )
    return {
        "$schema": SPEEDSCOPE_SCHEMA,
        "name": name,
        "exporter": "birbnest.pprof",
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": profiles,
    }


def collapsed(profile: Profile) -> str:
    """``thread;frame;frame count`` lines, root first (flamegraph.pl's input; speedscope opens it too)."""
    lines = []
    for ident, thread_name in sorted(profile.threads.items(), key=lambda item: item[1]):
        for stack, count in profile.stacks[ident].most_common():
            frames = ";".join(f"{key[0]} ({key[1]}:{key[2]})" for key in stack)
            lines.append(f"{thread_name.replace(';', ':')};{frames} {count}")
    return "\n".join(lines) + "\n"
