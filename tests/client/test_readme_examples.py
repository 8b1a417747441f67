"""The client README's Python examples run, in order, against a live service with a worker.

The README is written for `make run` (http://127.0.0.1:8080); its examples read the base URL
from ``BIRBNEST_URL`` with that default, which this test points at the session's API.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.django_db(transaction=True)

README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_the_readme_is_written_for_make_run() -> None:
    text = README.read_text()
    assert "http://127.0.0.1:8080" in text and "make run" in text
    assert len(python_blocks()) >= 8


def test_every_python_example_runs_against_the_live_service(
    api: Any, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BIRBNEST_URL", api.url)
    monkeypatch.delenv("BIRBNEST_API_KEY", raising=False)
    namespace: dict[str, Any] = {"__name__": "readme"}
    output = io.StringIO()
    for number, block in enumerate(python_blocks(), start=1):
        code = compile(block, f"{README.name} python block {number}", "exec")
        with contextlib.redirect_stdout(output):
            exec(code, namespace)
    printed = output.getvalue()
    # what the examples print is what their comments say
    assert "404 NOT_FOUND key 'no-such-key' not found" in printed
    assert "user:3 201 1 True None" in printed
    assert "('user:404', False, 404)" in printed
    assert "400 {'field': 'value'}" in printed
    assert "None invalid key 'bad key': keys are 1-255 characters from" in printed
