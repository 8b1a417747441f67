"""`manage.py rundashboard`: serve the live dashboard's websocket under granian (ASGI, one process)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from ops.console.dashboard import WEBSOCKET_PATH, dashboard_port
from ops.ports import require_free_port


class Command(BaseCommand):
    help = "Serve the live dashboard's websocket with granian (ASGI interface, one process: one sampler)."
    requires_system_checks = "__all__"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--port", type=int, help="override DASHBOARD_PORT (default API_PORT + 1)")

    def handle(self, *args: Any, **options: Any) -> None:
        config = settings.BIRB
        port = options["port"] or dashboard_port()
        require_free_port(config.api_host, port, what="dashboard", variable="DASHBOARD_PORT")
        # One worker process: the sampler and its history live in it, shared by every page.
        argv = [
            str(Path(sys.executable).parent / "granian"),
            "--interface", "asgi",
            "--ws",
            "--host", config.api_host,
            "--port", str(port),
            "--workers", "1",
            "--log-level", "warning",
            "birbnest.asgi:application",
        ]  # fmt: skip
        host = "127.0.0.1" if config.api_host in ("", "0.0.0.0") else config.api_host
        self.stdout.write(
            f"Dashboard websocket on ws://{host}:{port}/{WEBSOCKET_PATH} "
            f"(page: http://{host}:{config.api_port}/admin/dashboard/)"
        )
        self.stdout.flush()
        os.execv(argv[0], argv)
