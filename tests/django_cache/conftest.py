"""Django's own cache test suite, from the source release of the Django the project pins.

``tests/cache/`` of the sdist (tests.py, models.py and the small backends beside them) is
downloaded once with pip into ``.venv/`` (gitignored) and imported as the package ``cache``, the
name Django's own test runner gives it (its tests refer to ``cache.tests.custom_key_func`` and
pickle ``cache.tests.f``). Its model (``Poll``) needs an installed app: the app ``cache`` is added
to the app registry here, at collection time, before the test database is created (so its table
is made with the others) and without running any other app's ``ready()`` again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest

from tests.conftest import BASE_DIR, Worker, wait_for

DJANGO_VERSION = django.__version__
# Beside the installed Django it belongs to (a new venv fetches it again), not in var/, which
# `make clean-data` empties.
SUITE_DIR = (BASE_DIR / ".venv" if (BASE_DIR / ".venv").is_dir() else BASE_DIR / "var") / (
    f"django-cache-suite-{DJANGO_VERSION}"
)


def fetch_cache_suite() -> Path:
    """The directory holding the package ``cache`` (Django's ``tests/cache/``), fetched if missing."""
    package = SUITE_DIR / "cache"
    if (package / "tests.py").is_file():
        return SUITE_DIR
    SUITE_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=SUITE_DIR.parent) as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", "--dest", tmp, f"Django=={DJANGO_VERSION}"],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        sdists = list(Path(tmp).glob("[Dd]jango-*.tar.gz"))
        if download.returncode != 0 or not sdists:
            raise RuntimeError(
                f"could not download the Django {DJANGO_VERSION} source release (its tests/cache/ is the suite "
                f"the Django cache backend is tested with): pip said:\n{download.stderr[-2000:]}"
            )
        staged = Path(tmp) / "suite" / "cache"
        staged.mkdir(parents=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                # django-5.2.19/tests/cache/<file>: the files of the folder, nothing else.
                if len(parts) == 4 and parts[1:3] == ("tests", "cache") and member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None
                    (staged / parts[3]).write_bytes(source.read())
        if not (staged / "tests.py").is_file():
            raise RuntimeError(f"{sdists[0].name} has no tests/cache/tests.py")
        try:
            os.rename(staged.parent, SUITE_DIR)
        except OSError:  # another run got there first
            if not (package / "tests.py").is_file():
                raise
    return SUITE_DIR


def install_cache_app() -> None:
    """Add Django's test app ``cache`` to the app registry (what ``Apps.populate`` does for one
    entry), so that ``cache.models.Poll`` has an app and the test database gets its table."""
    from django.apps import AppConfig, apps

    if "cache" in apps.app_configs:
        return
    config = AppConfig.create("cache")
    config.apps = apps
    apps.app_configs[config.label] = config
    config.import_models()
    apps.clear_cache()


def _load_suite() -> None:
    suite = str(fetch_cache_suite())
    if suite not in sys.path:
        sys.path.insert(0, suite)
    install_cache_app()


_load_suite()


@pytest.fixture(scope="module")
def suite_worker(api: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker for the module's tests: clear() lists keys, and a listing waits for the worker
    to have persisted every write before it (read-your-writes)."""
    from persistence import jetstream, services

    worker = Worker(tmp_path_factory.mktemp("django-cache-worker") / "worker.log", WORKER_BATCH_TIMEOUT="100ms")
    worker.start()
    try:
        wait_for(
            lambda: jetstream.publisher().wait_drained(1), timeout=30, message="the earlier tests' backlog drained"
        )
        services._backlog.last_wait_failed = False
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def nest_url(api: Any, suite_worker: Worker) -> str:
    """The session API's base URL, with a worker running."""
    return str(api.url)


def remove_namespace(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (what a module leaves behind in the session's service)."""
    from birbnest_client import Client, errors

    def removed() -> bool:
        # Another module's fault (PostgreSQL stopped, its breaker open) may still be in the
        # service's way: a 503 is waited out, not reported as this module's failure.
        try:
            with Client(base_url=url) as client:
                keys = list(client.scan(prefix))
                if keys:
                    client.delete_many(keys)
        except errors.ServiceUnavailable:
            return False
        return True

    wait_for(removed, timeout=60, interval=1, message=f"the keys under {prefix!r} deleted")
