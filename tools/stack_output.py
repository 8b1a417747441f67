"""What `make run` prints: with LOG_FORMAT=json, one JSON object per line, whoever wrote it.

The services log JSON themselves (birbnest.logging), but not everything they print is a log record:
migrate's progress, runapi's start-up lines, granian's own ``[WARNING] …`` lines, a Python
traceback, a library's warning. With LOG_FORMAT=json `make run` reads each child's stdout and stderr
through a pipe and passes every line on to its own stdout or stderr: a JSON object as it is, any
other line wrapped as ``{"timestamp", "level", "logger": <child>, "event": <the line>}`` (a
traceback becomes one ``error`` record with the traceback in ``traceback``). So
``jq 'select(.level == "error")'`` reads the output as written. With LOG_FORMAT=text nothing is
piped: the children write to the terminal themselves.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import subprocess
import threading
from typing import IO, Any

_write_lock = threading.Lock()
# A leading level word: granian's "[WARNING] …", "ERROR: …", runapi's "warning: …".
_LEVEL_WORD = re.compile(r"^\[?(debug|info|warning|warn|error|critical|fatal)\]?[:\s]", re.IGNORECASE)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:|$)")
_LEVELS = {"warn": "warning", "fatal": "critical"}


def json_record(level: str, logger: str, event: str, **fields: Any) -> str:
    """One log line in the shape birbnest.logging writes: timestamp, level, logger, event, extras."""
    timestamp = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"timestamp": timestamp, "level": level, "logger": logger, "event": event, **fields})


def emit(fd: int, line: str) -> None:
    """Write one whole line to ``fd`` (1 or 2); lines of several threads never interleave."""
    data = (line.rstrip("\n") + "\n").encode(errors="replace")
    with _write_lock:
        while data:
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                continue
            except OSError:
                return  # the reader went away (a closed pipe): nothing else to do with the line
            data = data[written:]


def _level_of(text: str, default: str) -> str:
    match = _LEVEL_WORD.match(text)
    if match:
        word = match.group(1).lower()
        return _LEVELS.get(word, word)
    if _EXCEPTION_LINE.match(text):
        return "error"
    return default


def _is_json_object(text: str) -> bool:
    if not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def relay_lines(stream: IO[bytes], fd: int, source: str, default_level: str) -> None:
    """Pass each line of ``stream`` to ``fd`` as JSON until end of file (see the module docstring)."""
    traceback: list[str] = []
    for raw in iter(stream.readline, b""):
        text = raw.decode(errors="replace").rstrip("\r\n")
        if traceback:
            traceback.append(text)
            if text and not text[0].isspace() and not text.startswith(("Traceback", "During handling", "The above")):
                # The exception's own line ends it (a chained exception's parts are one record).
                emit(fd, json_record("error", source, text, error=text, traceback="\n".join(traceback)))
                traceback = []
            continue
        if text.startswith("Traceback (most recent call last):"):
            traceback = [text]
        elif _is_json_object(text):
            emit(fd, text)
        elif text.strip():
            emit(fd, json_record(_level_of(text, default_level), source, text))
    if traceback:  # cut short: the process died while printing it
        emit(fd, json_record("error", source, traceback[-1], traceback="\n".join(traceback)))
    stream.close()


class Relay:
    """The relay threads of one child process: ``start`` after Popen(stdout=PIPE, stderr=PIPE)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.threads: list[threading.Thread] = []

    def start(self, proc: subprocess.Popen[bytes]) -> None:
        for stream, fd, level in ((proc.stdout, 1, "info"), (proc.stderr, 2, "warning")):
            if stream is None:
                continue
            thread = threading.Thread(
                target=relay_lines, args=(stream, fd, self.name, level), name=f"relay-{self.name}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def join(self, timeout: float) -> None:
        """Wait for the last lines (the pipes close when the child and its processes are gone)."""
        for thread in self.threads:
            thread.join(timeout)
        self.threads = [thread for thread in self.threads if thread.is_alive()]


class _LineHandler(logging.Handler):
    """A record as one whole line on stderr, under the relay's lock (no interleaving)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            emit(2, self.format(record))
        except Exception:
            self.handleError(record)


def json_logging(level: int = logging.INFO) -> None:
    """This process's own log records as JSON lines on stderr (birbnest.logging's format)."""
    from birbnest.logging import JsonFormatter

    handler = _LineHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
