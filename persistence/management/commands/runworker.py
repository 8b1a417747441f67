"""`manage.py runworker`: consume JetStream and write PostgreSQL (write-behind)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from birbnest.env import CONFIG_ERROR_EXIT_CODE
from persistence.worker import WorkerConfig, run


class Command(BaseCommand):
    help = "Run the write-behind worker: JetStream BIRB_CACHE -> PostgreSQL cache_entries, in batches."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--batch-size", type=int, help="override WORKER_BATCH_SIZE")
        parser.add_argument("--batch-timeout", type=float, help="override WORKER_BATCH_TIMEOUT (seconds)")

    def handle(self, *args: Any, **options: Any) -> None:
        config = WorkerConfig.from_settings()
        overrides = {}
        if options["batch_size"]:
            overrides["batch_size"] = options["batch_size"]
        if options["batch_timeout"]:
            overrides["batch_timeout"] = options["batch_timeout"]
        if overrides:
            config = WorkerConfig(**{**config.__dict__, **overrides})
        self._serve_observability()
        raise SystemExit(run(config))

    def _serve_observability(self) -> None:
        """The worker's Prometheus metrics (WORKER_METRICS_PORT) and debug endpoints (API_DEBUG_PORT)."""
        birb = settings.BIRB
        if birb.worker_metrics_port:
            from persistence.worker import metrics

            try:
                metrics.serve(host=birb.worker_metrics_host, port=birb.worker_metrics_port)
            except OSError as error:
                self.stderr.write(
                    f"cannot serve the worker's metrics on {birb.worker_metrics_host}:{birb.worker_metrics_port} "
                    f"({error}): set WORKER_METRICS_PORT to a free port (each worker copy needs its own)"
                )
                raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
        if birb.api_debug_port:
            from birbnest import pprof

            pprof.start(birb, role="worker")
