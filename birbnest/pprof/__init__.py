"""Debug endpoints (the runbook's pprof): a CPU profile, a heap snapshot and every stack, per process.

Served only when ``API_DEBUG_PORT`` is set, by a small HTTP server thread inside each process,
on ``API_DEBUG_HOST`` (loopback unless ``API_DEBUG_ALLOW_REMOTE``; ``birbnest.env`` refuses
anything else at start). Nothing of this package is imported when it is off.

Ports: the API's ``API_WORKERS`` granian processes take ``API_DEBUG_PORT`` ..
``API_DEBUG_PORT + API_WORKERS - 1`` (each the first one free: granian does not tell a process
its index, and a respawned process takes the port its predecessor left); each worker process
(``manage.py runworker``, any number of copies) the first free one from
``API_DEBUG_PORT + API_WORKERS`` on. ``GET /debug/pprof/`` on a port names the process's pid and role.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from birbnest.env import is_loopback
from birbnest.pprof.server import DebugServer, serve

if TYPE_CHECKING:
    from birbnest.env import Config

logger = logging.getLogger("birbnest.pprof")
# How many worker copies on one machine get a debug port.
WORKER_PORTS = 32


def api_ports(config: Config) -> range:
    return range(config.api_debug_port, min(config.api_debug_port + config.api_workers, 65536))


def worker_ports(config: Config) -> range:
    first = config.api_debug_port + config.api_workers
    return range(min(first, 65536), min(first + WORKER_PORTS, 65536))


def start(config: Config, *, role: str) -> DebugServer | None:
    """Serve the endpoints for this process (role "api" or "worker") if ``API_DEBUG_PORT`` is set."""
    if not config.api_debug_port:
        return None
    ports = api_ports(config) if role == "api" else worker_ports(config)
    if not is_loopback(config.api_debug_host):  # only with API_DEBUG_ALLOW_REMOTE (birbnest.env)
        warning = (
            f"WARNING: API_DEBUG_ALLOW_REMOTE=true: the debug endpoints of pid {os.getpid()} listen on "
            f"{config.api_debug_host}, without authentication: anyone who reaches them sees every stack "
            "and allocation of this process and can make it profile itself"
        )
        sys.stderr.write(warning + "\n")
        logger.warning("%s", warning)
    return serve(role=role, host=config.api_debug_host, ports=ports)


__all__ = ["DebugServer", "api_ports", "start", "worker_ports"]
