"""Production mode: `manage.py check --deploy` and the refusal of a known example SECRET_KEY.

Each test runs `manage.py` as the operator would, in a clean environment: no servers are needed
(the system checks only read the configuration).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from birbnest.env import DEV_SECRET_KEY, ConfigError, load_config
from tests.conftest import BASE_DIR, free_port

# What docs/OPERATIONS.md ("Production settings") tells an operator behind a TLS proxy to set.
PRODUCTION = {
    "ALLOWED_HOSTS": "birb.example.com",
    "HTTPS_ONLY": "true",
    "TRUST_X_FORWARDED_PROTO": "true",
}


@pytest.fixture(autouse=True)
def birb_settings() -> None:
    """Replaces tests/conftest.py's session fixture here: these tests need no servers."""


def manage(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": "/usr/bin:/bin",
        "BIRB_DATA_DIR": str(tmp_path),  # no stack.env of a developer's `make run`
        "BIRB_ENV_FILE": str(tmp_path / "no.env"),  # nor the developer's .env
        "SECRET_KEY": secrets.token_urlsafe(50),
        # Set, never contacted: `check` only reads them (birbnest.E001 wants them known).
        "DATABASE_URL": "postgresql://birb@127.0.0.1:1/birbcache",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "NATS_URL": "nats://127.0.0.1:1",
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_deploy_is_clean_with_the_documented_production_variables(tmp_path: Path) -> None:
    result = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr + result.stdout
    assert "System check identified no issues" in result.stdout


def test_check_deploy_names_what_is_missing_without_them(tmp_path: Path) -> None:
    result = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 1
    for missing in (
        "birbnest.W001) ALLOWED_HOSTS is *",
        "birbnest.W002) HTTPS_ONLY is off",
        "security.W004",  # HSTS
        "security.W008",  # redirect to HTTPS
        "security.W012",  # session cookie over HTTPS only
        "security.W016",  # CSRF cookie over HTTPS only
    ):
        assert missing in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "warning"),
    [
        ("ALLOWED_HOSTS", "*", "birbnest.W001"),
        ("HSTS_SECONDS", "0", "security.W004"),
        ("HSTS_INCLUDE_SUBDOMAINS", "false", "security.W005"),
    ],
)
def test_check_deploy_warns_when_one_production_variable_is_undone(
    tmp_path: Path, variable: str, value: str, warning: str
) -> None:
    result = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **{**PRODUCTION, variable: value})
    assert result.returncode == 1
    assert warning in result.stderr, result.stderr


def test_check_deploy_warns_about_a_weak_secret_key(tmp_path: Path) -> None:
    result = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **PRODUCTION, SECRET_KEY="short-key")
    assert result.returncode == 1
    assert "security.W009" in result.stderr


def test_https_only_without_the_proxy_header_is_refused(tmp_path: Path) -> None:
    """Without the proxy's word every request looks like plain HTTP: an endless redirect."""
    result = manage(tmp_path, "check", HTTPS_ONLY="true")
    assert result.returncode == 1
    assert "birbnest.E002) HTTPS_ONLY is on but TRUST_X_FORWARDED_PROTO is off" in result.stderr


@pytest.mark.parametrize("key", [DEV_SECRET_KEY, "django-insecure-q8$1x0_example", "change-me", "CHANGE_ME", "secret"])
def test_a_start_in_production_with_a_known_example_secret_key_stops_with_one_line(tmp_path: Path, key: str) -> None:
    # given DEBUG off (the default) and a SECRET_KEY anyone can read
    # when the API starts
    result = manage(tmp_path, "runapi", SECRET_KEY=key, API_PORT=str(free_port()))
    # then it stops before serving, with one line that names SECRET_KEY, and exit code 2
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("invalid value for SECRET_KEY: ")
    assert "is a known example or development key, not a secret" in lines[0]
    assert "secrets.token_urlsafe" in lines[0]  # how to make a real one


def test_the_refusal_shows_no_more_of_a_key_than_its_published_prefix() -> None:
    with pytest.raises(ConfigError) as error:
        load_config({"SECRET_KEY": "django-insecure-realprojectsecretpart"})
    assert "realprojectsecretpart" not in str(error.value)
    assert '"django-insecure-…"' in str(error.value)


def test_a_known_example_secret_key_is_fine_with_debug_on() -> None:
    assert load_config({"SECRET_KEY": "change-me", "DEBUG": "true"}).secret_key == "change-me"


def test_a_generated_secret_key_starts(tmp_path: Path) -> None:
    assert load_config({"SECRET_KEY": secrets.token_urlsafe(50)}).debug is False
    assert manage(tmp_path, "check").returncode == 0


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ALLOWED_HOSTS", "https://birb.example.com", "is not a comma-separated list of host names"),
        ("ALLOWED_HOSTS", " , ", "is empty"),
        ("CSRF_TRUSTED_ORIGINS", "birb.example.com", "is not a comma-separated list of origins"),
        ("HSTS_SECONDS", "-1", "is below the minimum of 0"),
        ("HTTPS_ONLY", "sure", "is not a boolean"),
    ],
)
def test_a_bad_production_value_names_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config({"SECRET_KEY": "s", variable: value})
    assert str(error.value).startswith(f'invalid value for {variable}: "{value}" {message}')


def test_lists_are_split_on_commas() -> None:
    config = load_config(
        {
            "SECRET_KEY": "s",
            "ALLOWED_HOSTS": "birb.example.com, .internal.example,[::1]",
            "CSRF_TRUSTED_ORIGINS": "https://birb.example.com,https://*.example.com",
        }
    )
    assert config.allowed_hosts == ("birb.example.com", ".internal.example", "[::1]")
    assert config.csrf_trusted_origins == ("https://birb.example.com", "https://*.example.com")
