"""The typed configuration reader and its one-line error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from birbnest.env import SETTINGS, ConfigError, load_config, parse_duration, redis_cluster_seeds
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


# Clusters (issue #13): NATS servers, JetStream replicas, Redis Cluster seeds, the key prefix.


def test_cluster_settings_default_to_one_server_one_replica_and_no_redis_cluster() -> None:
    config = load_config({**VALID, "NATS_URL": "nats://127.0.0.1:4222", "REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert config.nats_servers == ("nats://127.0.0.1:4222",)
    assert config.jetstream_replicas == 1
    assert config.redis_cluster is False and config.redis_cluster_nodes == ()
    assert config.redis_cluster_wait_replicas == 1


def test_nats_url_takes_a_comma_separated_list_of_servers() -> None:
    raw = "nats://127.0.0.1:4222, nats://127.0.0.1:4223,tls://nats-3.example.com:4222"
    config = load_config({**VALID, "NATS_URL": raw, "JETSTREAM_REPLICAS": "3"})
    assert config.nats_url == raw
    assert config.nats_servers == ("nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "tls://nats-3.example.com:4222")
    assert config.jetstream_replicas == 3


def test_a_redis_cluster_url_lists_its_seed_nodes() -> None:
    config = load_config({**VALID, "REDIS_URL": "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,[::1]:7002/0"})
    assert config.redis_cluster is True
    assert config.redis_cluster_nodes == (("127.0.0.1", 7000), ("127.0.0.1", 7001), ("::1", 7002))


def test_a_redis_cluster_url_carries_credentials_on_its_first_node() -> None:
    seeds = redis_cluster_seeds("redis+cluster://birb:p%40ss@10.0.0.1:7000,10.0.0.2")
    assert seeds.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
    assert (seeds.username, seeds.password) == ("birb", "p@ss")


def test_redis_cluster_true_makes_a_plain_url_a_seed() -> None:
    config = load_config({**VALID, "REDIS_URL": "redis://127.0.0.1:7000", "REDIS_CLUSTER": "true"})
    assert config.redis_cluster is True and config.redis_cluster_nodes == (("127.0.0.1", 7000),)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NATS_URL": "nats://a:4222,http://b:4222"}, 'invalid value for NATS_URL: "nats://a:4222,http://b:4222"'),
        ({"NATS_URL": ","}, 'invalid value for NATS_URL: "," is empty'),
        ({"NATS_URL": "nats://"}, 'invalid value for NATS_URL: "nats://" is not a URL'),
        ({"JETSTREAM_REPLICAS": "0"}, 'invalid value for JETSTREAM_REPLICAS: "0" is below the minimum of 1'),
        ({"JETSTREAM_REPLICAS": "7"}, 'invalid value for JETSTREAM_REPLICAS: "7" is above the maximum of 5'),
        ({"JETSTREAM_REPLICAS": "three"}, 'invalid value for JETSTREAM_REPLICAS: "three" is not an integer'),
        ({"REDIS_CLUSTER": "maybe"}, 'invalid value for REDIS_CLUSTER: "maybe" is not a boolean'),
        ({"REDIS_CLUSTER_WAIT_REPLICAS": "6"}, 'invalid value for REDIS_CLUSTER_WAIT_REPLICAS: "6" is above'),
        ({"REDIS_URL": "redis+cluster://h:7000/2"}, 'invalid value for REDIS_URL: "redis+cluster://h:7000/2"'),
        ({"REDIS_URL": "redis+cluster://h:port"}, 'invalid value for REDIS_URL: "redis+cluster://h:port"'),
        ({"REDIS_URL": "redis+cluster://"}, 'invalid value for REDIS_URL: "redis+cluster://" is not a Redis Cluster'),
        ({"REDIS_URL": "redis://h:7000/3", "REDIS_CLUSTER": "true"}, 'invalid value for REDIS_URL: "redis://h:7000/3"'),
        ({"REDIS_URL": "unix:///r.sock", "REDIS_CLUSTER": "true"}, 'invalid value for REDIS_URL: "unix:///r.sock"'),
        ({"REDIS_KEY_PREFIX": "{birb}:"}, 'invalid value for REDIS_KEY_PREFIX: "{birb}:" contains { or }'),
        ({"REDIS_KEY_PREFIX": "birb}"}, 'invalid value for REDIS_KEY_PREFIX: "birb}" contains { or }'),
    ],
)
def test_a_bad_cluster_setting_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config({**VALID, **env})
    assert str(error.value).startswith(message)


def test_a_bad_cluster_setting_stops_a_command_at_start(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SECRET_KEY": "s", "BIRB_DATA_DIR": str(tmp_path), "JETSTREAM_REPLICAS": "9"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr == 'invalid value for JETSTREAM_REPLICAS: "9" is above the maximum of 5\n'
