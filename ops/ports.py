"""Is a listening port free? Asked by `runapi` and `rundashboard` before they exec granian.

granian binds with SO_REUSEPORT, so a second server started on a port another granian holds
does not fail: the kernel splits the connections between the two, and the newcomer wipes the
first one's metrics directory. A test bind *without* SO_REUSEPORT fails on such a port, as it
does on any port another program listens on.
"""

from __future__ import annotations

import errno
import socket

from django.core.management.base import CommandError

# Exit code of a start refused for its configuration (birbnest.env.CONFIG_ERROR_EXIT_CODE too).
PORT_ERROR_EXIT_CODE = 2


def bind_error(host: str, port: int) -> OSError | None:
    """The error binding ``host:port`` would give a lone server, or None if the port is free.

    SO_REUSEADDR is set as servers set it, so connections in TIME_WAIT from a server that just
    stopped do not count as "in use"; a listening socket does, whoever holds it.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {error.strerror}")
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            return error
    return None


def require_free_port(host: str, port: int, *, what: str, variable: str) -> None:
    """Raise a CommandError (exit code 2, one line) if ``host:port`` cannot be listened on."""
    error = bind_error(host, port)
    if error is None:
        return
    where = f"{host or '0.0.0.0'}:{port}"
    if error.errno == errno.EADDRINUSE:
        problem = (
            f"port {port} is already in use (another {what}? `ss -ltnp 'sport = :{port}'` shows "
            f"which process); stop it or set {variable} to a free port"
        )
    else:
        problem = f"{error.strerror or error}; check API_HOST and {variable}"
    raise CommandError(f"cannot serve the {what} on {where}: {problem}", returncode=PORT_ERROR_EXIT_CODE)
