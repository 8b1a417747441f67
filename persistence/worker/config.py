"""What one worker process needs to know, built from settings by `manage.py runworker`."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int
    batch_timeout: float
    # Longest pause between retries of a batch PostgreSQL refused for a transient reason.
    max_backoff: float = 10.0
    # How often acknowledged messages are purged from the stream (limits retention).
    purge_interval: float = 30.0

    @classmethod
    def from_settings(cls) -> WorkerConfig:
        config = settings.BIRB
        return cls(batch_size=config.worker_batch_size, batch_timeout=config.worker_batch_timeout)
