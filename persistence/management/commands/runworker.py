"""`manage.py runworker`: consume JetStream and write PostgreSQL (write-behind)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

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
        raise SystemExit(run(config))
