"""tools.stack_output: with LOG_FORMAT=json every line `make run` passes on is a JSON object."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from tools.stack_output import relay_lines


def relayed(text: str, tmp_path: Path, default_level: str = "warning") -> list[dict[str, Any]]:
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        relay_lines(io.BytesIO(text.encode()), fd, "api", default_level)
    finally:
        os.close(fd)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_json_lines_pass_as_they_are_and_others_are_wrapped(tmp_path: Path) -> None:
    record = {"timestamp": "2026-01-01T00:00:00Z", "level": "error", "logger": "x", "event": "boom", "error": "e"}
    lines = relayed(
        json.dumps(record) + "\n"
        "API on http://0.0.0.0:8080/ (2 x 8 threads)\n"
        "\n"
        "[WARNING] Unexpected exit from worker-1\n"
        "ERROR: something broke\n"
        "{not json\n",
        tmp_path,
        default_level="info",
    )
    assert lines[0] == record
    assert [(line["level"], line["logger"], line["event"]) for line in lines[1:]] == [
        ("info", "api", "API on http://0.0.0.0:8080/ (2 x 8 threads)"),
        ("warning", "api", "[WARNING] Unexpected exit from worker-1"),
        ("error", "api", "ERROR: something broke"),
        ("info", "api", "{not json"),
    ]
    assert all(line["timestamp"].endswith("Z") for line in lines[1:])


def test_a_traceback_is_one_error_record(tmp_path: Path) -> None:
    lines = relayed(
        "Traceback (most recent call last):\n"
        '  File "manage.py", line 1, in <module>\n'
        "    main()\n"
        "ValueError: bad thing\n"
        "after\n",
        tmp_path,
    )
    assert len(lines) == 2
    assert lines[0]["level"] == "error"
    assert lines[0]["event"] == lines[0]["error"] == "ValueError: bad thing"
    assert lines[0]["traceback"].splitlines()[1] == '  File "manage.py", line 1, in <module>'
    assert lines[1]["event"] == "after"
    assert lines[1]["level"] == "warning"  # stderr's default


def test_a_traceback_cut_short_is_still_reported(tmp_path: Path) -> None:
    lines = relayed('Traceback (most recent call last):\n  File "x.py", line 3\n', tmp_path)
    assert [line["level"] for line in lines] == ["error"]
