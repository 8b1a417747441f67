"""Structured logs: one JSON object per line with ``level``, ``logger``, ``event`` and extras."""

from __future__ import annotations

import logging

import structlog
from structlog.typing import EventDict, WrappedLogger

from birbnest import tracing


def JsonFormatter() -> logging.Formatter:  # noqa: N802 - used as a formatter factory in LOGGING
    """stdlib records rendered by structlog: ``{"level": "error", "event": "...", "error": ...}``."""
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            _extras,
            _trace_ids,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
    )


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _extras(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    """Copy ``extra={...}`` fields of the record (error, trace_id, key...) into the JSON."""
    record = event.get("_record")
    if record is not None:
        for attr, value in record.__dict__.items():
            if attr not in _STANDARD and not attr.startswith("_") and attr not in event:
                event[attr] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return event


def _trace_ids(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    """``trace_id`` and ``span_id`` of the span current when the line was written (tracing on),
    so ``jq 'select(.trace_id == "…")'`` finds a request's lines across API and worker."""
    if tracing.enabled and "trace_id" not in event:
        ids = tracing.current_ids()
        if ids is not None:
            event["trace_id"], event["span_id"] = ids
    return event
