"""A real headless Chromium (Debian's, driven by Playwright) against a real API and dashboard.

`playwright install` cannot download browsers on our machines: `make test` installs Debian's
chromium (`make tools`), and these tests FAIL (not skip) when it is missing, so CI notices.
Screenshots of every page go to test-artifacts/browser/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BASE_DIR, manage, service_env, wait_for

# Playwright's sync API runs an event loop in this thread; the ORM calls the tests make next to
# it are ordinary synchronous ones.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = BASE_DIR / "test-artifacts" / "browser"
PASSWORD = "a-long-test-password-42"


def chromium_path() -> str:
    path = os.environ.get("BIRB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Debian's chromium is not installed: run `make tools` as root (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Module-scoped: Playwright's sync API keeps an event loop running in this thread until it
    stops, and later tests call asyncio.run()."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="session")
def dashboard_server(api: Any, tmp_path_factory: pytest.TempPathFactory, django_db_setup: Any) -> Iterator[str]:
    """`manage.py rundashboard` for the session API, on the DASHBOARD_PORT its pages point to."""
    port = int(api.env["DASHBOARD_PORT"])
    log = open(tmp_path_factory.mktemp("dashboard") / "dashboard.log", "ab")  # noqa: SIM115
    proc = manage(
        "rundashboard",
        env=service_env(API_PORT=str(api.port), DASHBOARD_PORT=str(port), API_WORKERS="2"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: _answers(url) or proc.poll() is not None, timeout=20, message="dashboard server")
    if proc.poll() is not None:
        log.flush()
        raise RuntimeError(f"rundashboard exited:\n{Path(log.name).read_text(errors='replace')[-3000:]}")
    yield url
    proc.terminate()
    proc.wait(15)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def operator(django_user_model: Any) -> Any:
    import importlib

    from django.apps import apps
    from django.contrib.auth.models import Group

    # Transactional tests empty every table afterwards, the groups' rows included: recreate
    # them with the migration's own function.
    importlib.import_module("ops.migrations.0002_console_groups").create_groups(apps, None)
    user = django_user_model.objects.create_user("oscar", password=PASSWORD, is_staff=True)
    user.groups.add(Group.objects.get(name="operator"))
    return user


def log_in(page: Any, base_url: str, username: str) -> None:
    page.goto(f"{base_url}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")
