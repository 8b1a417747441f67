"""schemathesis runs the served OpenAPI document against the live API (issue #12): every check
(no 5xx, responses and headers as documented, documented status codes and content types,
schema-conforming requests accepted and others refused, auth not ignored, ...), with the
examples, coverage, fuzzing and stateful phases, bounded to a minute or two.

It fails with schemathesis's own report. The main run uses an API key with the read, write and
delete scopes; `/admin/ratelimit` has a run of its own with an admin key (it changes the rate
limits of the whole test session, which are put back after it).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_published

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(400)]

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
ROOT = Path(__file__).resolve().parents[2]
# Test cases per operation and phase: about 40 s of schemathesis on 2 cores (a minute with the
# servers' start). BIRB_SCHEMATHESIS_SEED=<seed> replays a run (the report prints its seed).
MAX_EXAMPLES = int(os.environ.get("BIRB_SCHEMATHESIS_EXAMPLES", "100"))
# The phases (BIRB_SCHEMATHESIS_PHASES=stateful runs one, to look into it).
PHASES = os.environ.get("BIRB_SCHEMATHESIS_PHASES", "examples,coverage,fuzzing,stateful")


def run_schemathesis(
    api: Any, token: str, tmp_path: Path, *, phases: str = PHASES, max_examples: int = MAX_EXAMPLES, **only: str
) -> tuple[subprocess.CompletedProcess[str], str, int]:
    """schemathesis on the document the API serves, as the client with ``token``; ``only``:
    include-path=... and the like. (the run, its report, the number of operations tested)."""
    schema = httpx.get(api.url + "/v1/schema/", params={"format": "json"}, timeout=30)
    assert schema.status_code == 200, schema.text[:300]
    schema_path = tmp_path / "openapi.json"
    schema_path.write_bytes(schema.content)
    seed = int(os.environ.get("BIRB_SCHEMATHESIS_SEED") or random.randrange(2**31))
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        str(schema_path),
        "--url",
        api.url,
        "--checks",
        "all",
        "--phases",
        phases,
        "--max-examples",
        str(max_examples),
        "--request-timeout",
        "10",
        "--header",
        f"Authorization: Bearer {token}",
        # PostgreSQL's jsonb cannot hold U+0000: the service refuses it (400), as documented.
        "--generation-allow-x00",
        "false",
        "--generation-database",
        "none",
        "--seed",
        str(seed),
        "--no-color",
        "--output-truncate",
        "false",
        "--suppress-health-check",
        "too_slow,filter_too_much,data_too_large",
        *(f"--{option.replace('_', '-')}={value}" for option, value in only.items()),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    # In tmp_path: schemathesis keeps its replay files in ./.schemathesis/.
    run = subprocess.run(command, capture_output=True, text=True, timeout=360, env=env, cwd=tmp_path, check=False)
    report = f"seed {seed}\n" + run.stdout[-30000:] + run.stderr[-5000:]
    print(report)  # the phases and counts, with pytest -s
    operations = sum(
        method in {"get", "put", "post", "delete", "patch"}
        for path, item in schema.json()["paths"].items()
        for method in item
        if only.get("include_path", path) == path and only.get("exclude_path") != path
    )
    return run, report, operations


def test_schemathesis_finds_nothing(api: Any, worker: Any, make_api_key: Any, tmp_path: Path) -> None:
    # given: a key with the data plane's scopes
    token = make_api_key(scopes=["read", "write", "delete"])
    wait_published()

    # when
    run, report, operations = run_schemathesis(api, token, tmp_path, exclude_path="/admin/ratelimit")

    # then
    assert run.returncode == 0, f"schemathesis found problems:\n{report}"
    # And it did test: every operation of the document, and every phase asked for.
    assert f"Tested: {operations}\n" in run.stdout, report
    for phase in PHASES.split(","):
        assert f"✅ {phase.capitalize()}\n" in run.stdout, (phase, report)


def test_schemathesis_on_the_rate_limit_settings(api: Any, make_api_key: Any, tmp_path: Path) -> None:
    """`/admin/ratelimit` with an admin key, on its own: the run changes the session's settings
    (they are put back after it)."""
    from ops.ratelimit import ratelimit_settings_get, ratelimit_settings_update

    before = ratelimit_settings_get()
    token = make_api_key(scopes=["admin"])
    wait_published()
    try:
        run, report, operations = run_schemathesis(
            api, token, tmp_path, phases="examples,coverage,fuzzing", max_examples=25, include_path="/admin/ratelimit"
        )
    finally:
        ratelimit_settings_update(
            enabled=before.enabled, limit=before.limit, window=before.window, algorithm=before.algorithm, by="tests"
        )
        wait_published()

    assert run.returncode == 0, f"schemathesis found problems:\n{report}"
    assert operations == 2 and "Tested: 2\n" in run.stdout, report
