"""`manage.py runjobs [--warm] [--once]`: run the rehydration jobs queued from the console."""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from ops.console.jobs import POLL_INTERVAL, runner_run


class Command(BaseCommand):
    help = "Run rehydration jobs queued from the admin console (one at a time); SIGTERM/SIGINT stop it cleanly."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--warm", action="store_true", help="queue a rehydration of every live entry at start")
        parser.add_argument("--once", action="store_true", help="run what is queued now, then exit")
        parser.add_argument("--poll", type=float, default=POLL_INTERVAL, help="seconds between looks for new jobs")

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        runner_run(stop=stop, warm=options["warm"], poll=options["poll"], once=options["once"])
