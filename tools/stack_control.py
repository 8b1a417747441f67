"""`python -m tools.stack restart|stop|start SERVICE`, done by the running `make run`.

The `make run` that owns a data dir listens on ``DATA_DIR/stack.sock`` (a unix socket of mode 0600:
its user and root may connect). A command sends one JSON line ``{"action": "restart", "service":
"redis"}`` and reads one back, ``{"ok": true, "message": "redis restarted (pid 4242)"}``. The
supervisor carries the request out between two rounds of its loop, so a piece it stops on request is
never taken for a crash, and a piece held down with ``stop`` stays down until ``start``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

SOCKET_NAME = "stack.sock"
ACTIONS = ("restart", "stop", "start")
SERVICES = ("postgres", "redis", "nats", "api", "worker", "dashboard", "jobs")
REQUEST_TIMEOUT = 180.0  # a PostgreSQL restart may wait for its checkpoint
# A unix socket path longer than this does not fit in sockaddr_un (108 bytes with the NUL).
_MAX_PATH = 100


class ControlError(Exception):
    """The request cannot be carried out; the message says why (sent back to the command)."""


class NotRunningError(ControlError):
    """No `make run` listens for this data dir."""


@contextlib.contextmanager
def _address(data_dir: Path) -> Iterator[str]:
    """The socket's path, or for a deep data dir the same file reached through a descriptor."""
    path = str(data_dir / SOCKET_NAME)
    if len(path) <= _MAX_PATH:
        yield path
        return
    fd = os.open(data_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


class ControlServer:
    """The listening end, owned by the supervisor (which holds the data dir's lock)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / SOCKET_NAME
        self.path.unlink(missing_ok=True)  # left by a run that was SIGKILLed: we hold the lock now
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600, never open to others even for a moment
        try:
            with _address(data_dir) as address:
                self.sock.bind(address)
        finally:
            os.umask(old_umask)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def serve_one(self, timeout: float, handle: Callable[[str, str], str]) -> None:
        """Wait up to ``timeout`` seconds for a request and carry it out with ``handle(action,
        service)``, which returns the message or raises ControlError."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.setblocking(True)
            conn.settimeout(5)
            try:
                request = json.loads(conn.makefile("rb").readline())
                action, service = str(request["action"]), str(request["service"])
            except (OSError, ValueError, KeyError, TypeError):
                return  # not one of our commands: nothing to answer
            try:
                if action not in ACTIONS or service not in SERVICES:
                    raise ControlError(f"unknown request {action} {service}: actions {ACTIONS}, services {SERVICES}")
                reply = {"ok": True, "message": handle(action, service)}
            except ControlError as error:
                reply = {"ok": False, "message": str(error)}
            with contextlib.suppress(OSError):  # the command gave up waiting (Ctrl-C)
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def send(data_dir: Path, action: str, service: str, timeout: float = REQUEST_TIMEOUT) -> str:
    """Ask the `make run` of ``data_dir`` to do it; its message, or ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _address(data_dir) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunningError(
                f"no `make run` is running for {data_dir} (nothing listens on {data_dir / SOCKET_NAME}); "
                "start it with `make run`, or set BIRB_DATA_DIR to the data dir it uses"
            ) from None
        sock.sendall(json.dumps({"action": action, "service": service}).encode() + b"\n")
        line = sock.makefile("rb").readline()
    if not line:
        raise ControlError(f"`make run` stopped before it answered ({action} {service})")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("message")))
    return str(reply.get("message"))
