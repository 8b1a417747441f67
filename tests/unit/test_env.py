"""The typed configuration reader and its one-line error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from birbnest.env import SETTINGS, ConfigError, load_config, parse_duration
from tests.conftest import BASE_DIR

VALID = {"SECRET_KEY": "s"}


@pytest.mark.parametrize(
    ("raw", "seconds"), [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("3", 3.0), ("1.5s", 1.5), ("7d", 604800.0)]
)
def test_durations(raw: str, seconds: float) -> None:
    assert parse_duration("X", raw) == seconds


def test_defaults_match_the_contract() -> None:
    config = load_config(VALID)
    assert config.api_port == 8080
    assert config.worker_batch_size == 100
    assert config.worker_batch_timeout == 1.0
    assert config.worker_consumer_group == "birb-worker"
    assert config.log_level == "info" and config.log_format == "json"
    assert config.debug is False
    assert config.birb_stream == "BIRB_CACHE" and config.birb_dlq_stream == "BIRB_CACHE_DLQ"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("WORKER_BATCH_SIZE", "abc", 'invalid value for WORKER_BATCH_SIZE: "abc" is not an integer'),
        ("WORKER_BATCH_SIZE", "0", 'invalid value for WORKER_BATCH_SIZE: "0" is below the minimum of 1'),
        ("WORKER_BATCH_TIMEOUT", "soon", 'invalid value for WORKER_BATCH_TIMEOUT: "soon" is not a duration'),
        ("API_PORT", "70000", 'invalid value for API_PORT: "70000" is above the maximum of 65535'),
        ("DEBUG", "maybe", 'invalid value for DEBUG: "maybe" is not a boolean'),
        ("LOG_FORMAT", "xml", 'invalid value for LOG_FORMAT: "xml" is not one of json, text'),
        ("DATABASE_URL", "mysql://x", 'invalid value for DATABASE_URL: "mysql://x" is not a URL'),
        ("WORKER_CONSUMER_GROUP", "a b", 'invalid value for WORKER_CONSUMER_GROUP: "a b" is not a valid name'),
    ],
)
def test_a_bad_value_names_the_variable_the_value_and_the_expectation(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config({**VALID, name: value})
    assert str(error.value).startswith(message)


def test_secret_key_is_required_without_debug() -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_config({})
    assert load_config({"DEBUG": "true"}).secret_key == ""


def test_every_setting_has_a_parsable_default() -> None:
    config = load_config(VALID)
    for setting in SETTINGS:
        assert hasattr(config, setting.name.lower())


@pytest.mark.parametrize("command", [["check"], ["runworker"], ["rehydrate", "--all"], ["runapi"]])
def test_management_commands_stop_at_start_with_one_line_and_exit_2(command: list[str], tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SECRET_KEY": "s", "BIRB_DATA_DIR": str(tmp_path), "WORKER_BATCH_SIZE": "abc"}
    result = subprocess.run(
        [sys.executable, "manage.py", *command], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr == 'invalid value for WORKER_BATCH_SIZE: "abc" is not an integer\n'
    assert result.stdout == ""


def test_make_run_stops_at_start_with_one_line_and_exit_2(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "BIRB_DATA_DIR": str(tmp_path), "WORKER_BATCH_TIMEOUT": "fast"}
    result = subprocess.run(
        [sys.executable, "-m", "tools.stack", "run"], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith('invalid value for WORKER_BATCH_TIMEOUT: "fast" is not a duration')
    )
