"""What one worker process needs to know, built from settings by `manage.py runworker`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from django.conf import settings
from dotenv import dotenv_values

from birbnest.env import SETTINGS_BY_NAME, ConfigError, env_file

RELOADABLE = ("WORKER_BATCH_SIZE", "WORKER_BATCH_TIMEOUT", "LOG_LEVEL")


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int
    batch_timeout: float
    # Touched on every loop; its age is the worker's liveness (docker-compose health check).
    liveness_file: str = ""
    # Longest pause between retries of a batch PostgreSQL refused for a transient reason.
    max_backoff: float = 10.0
    # How often acknowledged messages are purged from the stream (limits retention).
    purge_interval: float = 30.0
    # How often rows expired or deleted longer than TOMBSTONE_RETENTION ago are deleted (0 = never).
    expired_purge_interval: float = 60.0

    @classmethod
    def from_settings(cls) -> WorkerConfig:
        config = settings.BIRB
        return cls(
            batch_size=config.worker_batch_size,
            batch_timeout=config.worker_batch_timeout,
            liveness_file=str(config.worker_liveness_file or config.data_dir / "worker.alive"),
            expired_purge_interval=config.worker_expired_purge_interval,
        )


def reload_config(current: WorkerConfig) -> tuple[WorkerConfig, str, list[str]]:
    """The configuration after SIGUSR1: the environment the worker started with, overlaid by
    what ``.env`` says now (the process environment cannot change, the file can).

    Returns (config, log level, human-readable changes); raises ValueError naming a bad value.
    """
    values = {**os.environ, **{k: v for k, v in dotenv_values(env_file()).items() if v is not None}}
    parsed = {}
    try:
        for name in RELOADABLE:
            setting = SETTINGS_BY_NAME[name]
            parsed[name] = setting.parse(name, values.get(name) or setting.default)
    except ConfigError as error:
        raise ValueError(str(error)) from None
    new = replace(current, batch_size=parsed["WORKER_BATCH_SIZE"], batch_timeout=parsed["WORKER_BATCH_TIMEOUT"])
    changes = []
    if new.batch_size != current.batch_size:
        changes.append(f"batch size {current.batch_size} -> {new.batch_size}")
    if new.batch_timeout != current.batch_timeout:
        changes.append(f"batch timeout {current.batch_timeout:g}s -> {new.batch_timeout:g}s")
    old_level = logging.getLevelName(logging.getLogger().level).lower()
    if parsed["LOG_LEVEL"] != old_level:
        changes.append(f"log level {old_level} -> {parsed['LOG_LEVEL']}")
    return new, parsed["LOG_LEVEL"], changes
