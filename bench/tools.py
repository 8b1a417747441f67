"""The external tools: Debian's wrk, redis-benchmark and webdis (installed when missing and
root), and py-spy; how each is run and how its output is read."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# Debian package of each binary.
PACKAGES = {"wrk": "wrk", "redis-benchmark": "redis-tools", "webdis": "webdis"}
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def ensure_tools(install: bool, ignore: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:
    """Path of each tool, or why it is missing. Installs the missing ones with apt when asked
    and root (one ``apt-get update`` and a retry if the first install fails). Tools in
    ``ignore`` count as missing (to exercise the fallbacks)."""
    missing = [name for name in PACKAGES if not shutil.which(name) and name not in ignore]
    notes: dict[str, str] = {}
    if missing and install:
        packages = sorted({PACKAGES[name] for name in missing})
        if os.geteuid() != 0:
            notes = {name: f"not installed and not root: run `apt-get install -y {PACKAGES[name]}` as root"
                     for name in missing}  # fmt: skip
        elif not shutil.which("apt-get"):
            notes = {name: "not installed and there is no apt-get" for name in missing}
        else:
            print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
            argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            done = subprocess.run(argv, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
                done = subprocess.run(argv, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
                notes = {name: f"apt-get install {PACKAGES[name]} failed: {reason[0]}" for name in missing}
    elif missing:
        notes = {name: f"not installed (`make bench` installs {PACKAGES[name]} as root)" for name in missing}
    result = {}
    for name in PACKAGES:
        if name in ignore:
            result[name] = "missing: left out with --without"
        else:
            result[name] = shutil.which(name) or f"missing: {notes.get(name, 'not installed')}"
    return result


def available(tools: dict[str, str], name: str) -> bool:
    return not tools[name].startswith("missing")


# --- wrk ----------------------------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/sec, p50/p99 (ms), request count, non-2xx and socket errors from ``wrk --latency``."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    if not (rps and p50 and p99 and total):
        raise ValueError(f"cannot read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result: dict[str, Any] = {
        "rps": float(rps.group(1)),
        "p50_ms": round(_ms(p50.group(1)), 3),
        "p99_ms": round(_ms(p99.group(1)), 3),
        "requests": int(total.group(1)),
        "seconds": round(_ms(total.group(2)) / 1000, 2),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "errors": sum(int(n) for n in errors.groups()) if errors else 0,
    }
    # Counters a script's done() prints, one "bench <name>: <integer>" line each (absent.lua, batch_set.lua).
    counters = {m.group(1): int(m.group(2)) for m in re.finditer(r"^bench (\w+): (\d+)$", output, re.M)}
    if counters:
        result["script"] = counters
    return result


def run_wrk(
    url: str,
    script: str,
    args: list[str],
    *,
    duration: float,
    connections: int,
    threads: int,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``timeout``: wrk's --timeout in seconds (its default is 2 s: a slower answer is counted as a
    timeout error and left out of the latencies, though still in the requests)."""
    options = [f"--timeout={timeout:g}s"] if timeout else []
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", *options,
            "-s", str(BENCH_DIR / script), url, "--", *args]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60 + (timeout or 0))
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    result["command"] = " ".join(["wrk", *argv[1 : 6 + len(options)], f"bench/{script}", url, "--", *args])
    return result


# --- connections the server does not read ------------------------------------------------------


def unread_connections(port: int) -> tuple[set[int], int]:
    """(client ports of established connections to ``port`` holding unread bytes, all of them).

    From /proc/net/tcp: a connection whose request the server has not read shows a non-zero
    receive queue on the server's side. Linux only; empty elsewhere.
    """
    unread, total = set(), 0
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return unread, total
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or fields[3] != "01":  # 01 = ESTABLISHED
            continue
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port != port:
            continue
        total += 1
        if int(fields[4].split(":")[1], 16) > 0:
            unread.add(int(fields[2].rsplit(":", 1)[1], 16))
    return unread, total


class StarvationWatch:
    """Samples :func:`unread_connections` at 30%, 60% and 90% of a measurement: a connection
    unread at all three moments was not served during the run (its request waited, or never
    got an answer; wrk then counts nothing for it, so its latency is missing from p99)."""

    def __init__(self, port: int, duration: float) -> None:
        import threading

        self.port, self.duration = port, duration
        self.samples: list[set[int]] = []
        self.connections = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def _run(self) -> None:
        began = time.monotonic()
        for share in (0.3, 0.6, 0.9):
            if self._stop.wait(max(0.0, began + share * self.duration - time.monotonic())):
                return
            unread, total = unread_connections(self.port)
            self.samples.append(unread)
            self.connections = max(self.connections, total)

    def finish(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(2)
        never = set.intersection(*self.samples) if len(self.samples) == 3 else set()
        return {"connections": self.connections, "unread_whole_run": len(never)}


# --- redis-benchmark ----------------------------------------------------------------------------


def run_redis_benchmark(port: int, key: str, *, requests: int, connections: int) -> dict[str, Any]:
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(connections), "-n", str(requests),
            "--csv", "GET", key]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    rows = [line for line in done.stdout.splitlines() if line.startswith('"GET')]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"redis-benchmark failed ({done.returncode}): {done.stderr or done.stdout}")
    header = [h.strip('"') for h in done.stdout.splitlines()[0].split(",")]
    values = dict(zip(header, [v.strip('"') for v in rows[-1].split(",")], strict=False))
    return {
        "rps": float(values["rps"]),
        "p50_ms": float(values["p50_latency_ms"]),
        "p99_ms": float(values["p99_latency_ms"]),
        "requests": requests,
        "non_2xx": 0,
        "errors": 0,
        "command": " ".join([*argv[:1], "-p", "PORT", *argv[5:]]),
    }


# --- webdis -------------------------------------------------------------------------------------


@dataclass
class Webdis:
    proc: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        stop_group(self.proc)


def start_webdis(work_dir: Path, redis_port: int, http_port: int) -> Webdis:
    """Debian's webdis in front of the bench's Redis, on a loopback port, in the foreground."""
    config = {
        "redis_host": "127.0.0.1",
        "redis_port": redis_port,
        "redis_auth": None,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "threads": 2,
        "pool_size_per_thread": 10,
        "daemonize": False,
        "database": 0,
        "verbosity": 1,
        "logfile": str(work_dir / "webdis.log"),
    }
    path = work_dir / "webdis.json"
    path.write_text(json.dumps(config, indent=2))
    log = open(work_dir / "webdis.out", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(["webdis", str(path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with _HTTP.open(f"http://127.0.0.1:{http_port}/PING", timeout=1) as response:
                if b"PONG" in response.read():
                    return Webdis(proc, http_port)
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_group(proc)
    out = work_dir / "webdis.out"
    raise RuntimeError(f"webdis did not start; {out}: {out.read_text(errors='replace')[-500:]}")


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    """(status, body), for error statuses too."""
    try:
        with _HTTP.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# --- processes ----------------------------------------------------------------------------------


def stop_group(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM the process group led by ``proc`` (started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        proc.wait(10)


# --- py-spy -------------------------------------------------------------------------------------


def pyspy_path() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.is_file() else shutil.which("py-spy")


def start_pyspy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """``py-spy record --gil -f raw`` of one process, in the background."""
    exe = pyspy_path()
    if exe is None:
        return None
    argv = [exe, "record", "--gil", "--nonblocking", "-d", str(max(1, int(seconds))), "-p", str(pid),
            "-f", "raw", "-o", str(out)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def aggregate_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top functions of a py-spy raw (collapsed stacks) file: self and inclusive share of samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_function(frame) for frame in stack.split(";") if frame]
        if frames:
            own[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    share = lambda n: round(100 * n / total, 1) if total else 0.0  # noqa: E731
    return {
        "samples": total,
        "self": [{"function": f, "pct": share(n)} for f, n in own.most_common(top)],
        "inclusive": [{"function": f, "pct": share(n)} for f, n in inclusive.most_common(top + 10)],
    }


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name (to/file.py)``: grouped by function, not by line."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if not match:
        return frame.strip()
    name, path = match.groups()
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


# --- the machine --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        memory_gb = 0.0
    debian = Path("/etc/debian_version")
    return {
        "cores": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_gb": memory_gb,
        "kernel": platform.release(),
        "os": f"Debian {debian.read_text().strip()}" if debian.is_file() else platform.platform(),
        "python": platform.python_version(),
    }


def tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("wrk", "redis-tools", "webdis"):
        done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
        versions[package] = done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "-"
    return versions
