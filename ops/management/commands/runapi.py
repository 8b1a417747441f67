"""`manage.py runapi`: serve the API under granian (WSGI), after settings and checks passed."""

from __future__ import annotations

import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from ops.ports import require_free_port

# Connections each API process accepts (granian's --backpressure).
BACKPRESSURE = 8192


def _raise_open_files(wanted: int) -> None:
    """Raise this process's (and so granian's) soft limit on open files towards ``wanted``, as far
    as the hard limit allows: every connection granian accepts holds a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Command(BaseCommand):
    help = "Serve the HTTP API with granian (WSGI interface, API_WORKERS processes x API_THREADS threads)."
    requires_system_checks = "__all__"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--port", type=int, help="override API_PORT")

    def handle(self, *args: Any, **options: Any) -> None:
        config = settings.BIRB
        port = options["port"] or config.api_port
        # Before anything else: a second API on this port would share it with the first (port
        # reuse) and wipe its metrics directory below.
        require_free_port(config.api_host, port, what="API", variable="API_PORT")
        # Each granian process keeps its own counters; prometheus_client sums the files in this
        # directory (it must be empty at start and exported before the processes start).
        metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or config.data_dir / "metrics" / f"api-{port}")
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        self._ensure_streams()
        _raise_open_files(config.api_workers * BACKPRESSURE + 1024)
        argv = [
            str(Path(sys.executable).parent / "granian"),
            "--interface", "wsgi",
            "--host", config.api_host,
            "--port", str(port),
            "--workers", str(config.api_workers),
            "--blocking-threads", str(config.api_threads),
            # Requests beyond the threads wait in granian; it does not accept connections past
            # this many per process (they hang unanswered in the kernel's queue, /health too), so
            # it must cover every client connection, idle ones included: 512 was reached by 1,024
            # open connections. Each costs a file descriptor (see _raise_open_files).
            "--backpressure", str(BACKPRESSURE),
            # A worker that dies (the OOM killer, a crash) is replaced at once while the others
            # serve on; without this granian's main process exits and takes every worker with it.
            # granian 2.8.9 waits the interval only when it replaces a live worker (SIGHUP reload):
            # the new one's time to load the app (0.4 s alone, about 1 s under load) before the old
            # one stops. 1 s covers that, and a reload takes 1 s per worker instead of 3.5 s.
            "--respawn-failed-workers",
            "--respawn-interval", "1",
            "--no-ws",
            "--log-level", "warning",
            "birbnest.wsgi:application",
        ]  # fmt: skip
        self.stdout.write(
            f"API on http://{config.api_host}:{port}/ ({config.api_workers} x {config.api_threads} threads)"
        )
        self._say_who_may_call()
        self.stdout.flush()
        os.execv(argv[0], argv)

    def _say_who_may_call(self) -> None:
        """One line on API keys (API_AUTH): a warning when they are switched off."""
        mode = settings.BIRB.api_auth
        if mode == "off":
            self.stderr.write(
                "warning: API_AUTH=off: /v1/ answers every client that can reach this port, without an API key"
            )
        elif mode == "required":
            self.stdout.write("API keys: required on /v1/ (python manage.py apikey create NAME)")
        else:
            self.stdout.write(
                "API keys: API_AUTH=auto: until a key exists, /v1/ answers loopback clients only "
                "(python manage.py apikey create NAME)"
            )
        self.stdout.flush()

    def _ensure_streams(self) -> None:
        """Create the streams now if NATS is up; otherwise the first write retries it (and 503s)."""
        from persistence import jetstream

        try:
            jetstream.publisher().client()
        except Exception as error:
            self.stderr.write(f"NATS JetStream not reachable at start-up ({error}); writes answer 503 until it is")
            return
        self._check_max_payload()

    def _check_max_payload(self) -> None:
        """Warn when the NATS server cannot take a value of MAX_VALUE_SIZE (those writes get 413)."""
        from persistence import jetstream
        from persistence.messages import max_message_size

        limit = jetstream.publisher().message_limit()
        needed = max_message_size(key="k" * 255, value_size=settings.BIRB.max_value_size, metadata_size=0)
        if limit is not None and needed > limit:
            self.stderr.write(
                f"warning: the NATS server's max_payload leaves {limit} bytes for a write message, but a value "
                f"of MAX_VALUE_SIZE={settings.BIRB.max_value_size} bytes needs up to {needed}: such writes "
                "answer 413; raise max_payload in the NATS server's configuration (deploy/nats.conf) "
                "or lower MAX_VALUE_SIZE"
            )
