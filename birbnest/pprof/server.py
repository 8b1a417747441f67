"""The debug endpoints' HTTP server: a stdlib server on its own thread, apart from the API's."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from birbnest.pprof import heap, sampler, stacks

logger = logging.getLogger("birbnest.pprof")

# Bounds of the query parameters (anything else is a 400, never a 5xx).
MAX_SECONDS = 300
DEFAULT_PROFILE_SECONDS = 30
DEFAULT_HEAP_SECONDS = 10
MAX_HZ = 1000
DEFAULT_HZ = 100
MAX_TOP = 1000
DEFAULT_TOP = 25


class BadParameterError(ValueError):
    """A query parameter out of its bounds; answered with 400 and this message."""


class DebugServer(ThreadingHTTPServer):
    daemon_threads = True
    # SO_REUSEADDR: a respawned process may bind over its predecessor's closed connections
    # (TIME_WAIT). On Linux it never lets two processes listen on one port (SO_REUSEPORT would):
    # the second fails to bind and takes the next port of the range.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], *, role: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, DebugHandler)
        self.role = role
        self.started = time.time()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def header(self, what: str) -> str:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return f"# {what} of pid {os.getpid()} ({self.role}), debug port {self.port}, at {at}\n"


def _number(query: dict[str, list[str]], name: str, default: float, maximum: float, *, integer: bool) -> float:
    raw = query.get(name, [None])[-1]
    if raw is None or raw == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise BadParameterError(f"{name}={raw!r} is not {'an integer' if integer else 'a number'}") from None
    if not 0 < value <= maximum:
        raise BadParameterError(f"{name}={raw!r} is out of range (above 0, at most {maximum:g})")
    return value


class DebugHandler(BaseHTTPRequestHandler):
    server: DebugServer
    server_version = "birbnest-pprof"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        routes: dict[str, Callable[[dict[str, list[str]]], None]] = {
            "/debug/pprof": self.index,
            "/debug/pprof/profile": self.profile,
            "/debug/pprof/heap": self.heap,
            "/debug/pprof/goroutine": self.goroutine,
        }
        route = routes.get(url.path.rstrip("/"))
        if route is None:
            self.reply(HTTPStatus.NOT_FOUND, f"no such debug endpoint: {url.path} (see /debug/pprof/)\n")
            return
        try:
            route(query)
        except BadParameterError as error:
            self.reply(HTTPStatus.BAD_REQUEST, f"{error}\n")
        except (sampler.ProfileBusyError, heap.HeapBusyError) as error:
            self.reply(HTTPStatus.CONFLICT, f"{error}\n")
        except (BrokenPipeError, ConnectionResetError):
            logger.info("debug endpoint %s: the client went away", url.path)

    def index(self, query: dict[str, list[str]]) -> None:
        body = {
            "pid": os.getpid(),
            "role": self.server.role,
            "port": self.server.port,
            "endpoints": {
                "/debug/pprof/profile?seconds=30": "CPU (wall-clock) profile of every thread, speedscope JSON "
                "(&format=collapsed for flamegraph.pl; &hz=100 sampling rate)",
                "/debug/pprof/heap?seconds=10": "top allocations still alive (tracemalloc; &top=25)",
                "/debug/pprof/goroutine": "every thread's and asyncio task's stack",
            },
        }
        self.reply(HTTPStatus.OK, json.dumps(body, indent=2) + "\n", "application/json")

    def profile(self, query: dict[str, list[str]]) -> None:
        seconds = _number(query, "seconds", DEFAULT_PROFILE_SECONDS, MAX_SECONDS, integer=False)
        hz = int(_number(query, "hz", DEFAULT_HZ, MAX_HZ, integer=True))
        output = query.get("format", ["speedscope"])[-1]
        if output not in ("speedscope", "collapsed"):
            raise BadParameterError(f"format={output!r} is not one of speedscope, collapsed")
        profile = sampler.sample(seconds, hz)
        name = f"birbnest {self.server.role} pid {os.getpid()} ({seconds:g} s at {hz} Hz)"
        if output == "collapsed":
            self.reply(HTTPStatus.OK, sampler.collapsed(profile))
            return
        body = json.dumps(sampler.speedscope(profile, name=name))
        filename = f"profile-{self.server.role}-{os.getpid()}.speedscope.json"
        self.reply(
            HTTPStatus.OK, body, "application/json", {"Content-Disposition": f'attachment; filename="{filename}"'}
        )

    def heap(self, query: dict[str, list[str]]) -> None:
        seconds = _number(query, "seconds", DEFAULT_HEAP_SECONDS, MAX_SECONDS, integer=False)
        top = int(_number(query, "top", DEFAULT_TOP, MAX_TOP, integer=True))
        self.reply(HTTPStatus.OK, heap.snapshot(seconds=seconds, top=top, header=self.server.header("heap profile")))

    def goroutine(self, query: dict[str, list[str]]) -> None:
        # `?debug=1|2` (Go's) is accepted and changes nothing: the dump always has every stack.
        self.reply(HTTPStatus.OK, stacks.dump(header=self.server.header("goroutine profile")))

    def reply(
        self, status: HTTPStatus, body: str, content_type: str = "text/plain", headers: dict[str, str] | None = None
    ) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        logger.info("debug endpoint: " + format, *args)


def serve(*, role: str, host: str, ports: range) -> DebugServer | None:
    """Bind the first free port of ``ports`` on ``host`` and serve on a daemon thread.

    A port in use means another process of the service took it: try the next. No free port, or
    any other error, is logged and the process runs on without debug endpoints.
    """
    for port in ports:
        try:
            server = DebugServer((host, port), role=role)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                continue
            logger.error("debug endpoints not started on %s:%d: %s", host, port, error, extra={"error": str(error)})
            return None
        thread = threading.Thread(target=server.serve_forever, name=f"pprof-server-{port}", daemon=True)
        thread.start()
        logger.info("debug endpoints of pid %d (%s) on http://%s:%d/debug/pprof/", os.getpid(), role, host, port)
        return server
    logger.error("debug endpoints not started: ports %d-%d on %s are all in use", ports.start, ports.stop - 1, host)
    return None
