"""The write-behind worker: JetStream -> PostgreSQL in batches. Entry point: :func:`run`."""

from persistence.worker.config import WorkerConfig
from persistence.worker.loop import run

__all__ = ["WorkerConfig", "run"]
