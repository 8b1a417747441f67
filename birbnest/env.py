"""Typed readers for the environment: the one place configuration is parsed.

Every variable of the contract's configuration section is read here. A bad value raises
:class:`ConfigError`, whose message is the one line the operator sees, e.g.
``invalid value for WORKER_BATCH_SIZE: "abc" is not an integer``; callers turn it into
exit code 2 (see :func:`exit_on_config_error`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
CONFIG_ERROR_EXIT_CODE = 2


class ConfigError(ValueError):
    """A configuration variable holds a value that cannot be used."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f'invalid value for {name}: "{value}" {expected}')


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_NATS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ORIGIN = re.compile(r"^https?://[^/\s]+$")


def parse_int(name: str, raw: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(name, raw, "is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(name, raw, f"is below the minimum of {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, raw, f"is above the maximum of {maximum}")
    return value


def parse_duration(name: str, raw: str) -> float:
    """Seconds from ``500ms``, ``2s``, ``1m``, ``1h`` or a bare number of seconds."""
    match = _DURATION.match(raw)
    if not match:
        raise ConfigError(name, raw, 'is not a duration (expected e.g. "500ms", "2s", "1m")')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(name, raw, "is not a boolean (expected true/false, 1/0, yes/no, on/off)")


def parse_choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    lowered = raw.strip().lower()
    if lowered not in choices:
        raise ConfigError(name, raw, f"is not one of {', '.join(choices)}")
    return lowered


def parse_url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    if not raw:
        return ""
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if scheme not in schemes:
        raise ConfigError(name, raw, f"is not a URL starting with {' or '.join(s + '://' for s in schemes)}")
    return raw


def parse_url_list(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    """One URL or a comma-separated list of them (the servers of a cluster); the raw string is kept."""
    items = [item.strip() for item in raw.split(",")]
    if raw and not any(items):
        raise ConfigError(name, raw, "is empty (give one URL, or several separated by commas)")
    for item in items:
        if not item:
            continue
        scheme, sep, rest = item.partition("://")
        if not sep or scheme not in schemes or not rest.strip("/"):
            starts = " or ".join(s + "://" for s in schemes)
            raise ConfigError(name, raw, f"is not a URL starting with {starts} (or a comma-separated list of them)")
    return raw


def url_list(raw: str) -> tuple[str, ...]:
    """The items of a comma-separated URL list, blanks dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


REDIS_CLUSTER_SCHEME = "redis+cluster"
_REDIS_SCHEMES = ("redis", "rediss", "unix", REDIS_CLUSTER_SCHEME)
_REDIS_CLUSTER_URL_HELP = (
    "is not a Redis Cluster URL (expected redis+cluster://host:port[,host:port...][/0], "
    "with an optional user:password@ before the first node)"
)


@dataclass(frozen=True)
class RedisClusterSeeds:
    """What a cluster URL says: the seed nodes, and the credentials (percent-decoded) if any."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def _host_port(name: str, raw: str, item: str) -> tuple[str, int]:
    port_text: str | None
    if item.startswith("["):  # an IPv6 address: [::1]:7000
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        host, colon, port_text = item.rpartition(":")
        if not colon:
            host, port_text = item, ""
        if ":" in host:
            port_text = None
    if not host or port_text is None or "/" in host:
        raise ConfigError(name, raw, _REDIS_CLUSTER_URL_HELP)
    if not port_text:
        return host, 6379
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(name, raw, f"{_REDIS_CLUSTER_URL_HELP}: bad port {port_text!r}")
    return host, int(port_text)


def redis_cluster_seeds(url: str, *, name: str = "REDIS_URL") -> RedisClusterSeeds:
    """The seeds of a cluster: every node of a ``redis+cluster://`` URL, or the one node of a plain URL.

    A cluster has only database 0, so any other database in the URL is refused; so is a unix socket.
    """
    from urllib.parse import unquote, urlsplit

    scheme, _, rest = url.partition("://")
    if scheme == REDIS_CLUSTER_SCHEME:
        userinfo, _, hosts = rest.rpartition("@")
        hosts, _, path = hosts.partition("/")
        if path not in ("", "0"):
            raise ConfigError(name, url, _REDIS_CLUSTER_URL_HELP + "; a cluster has only database 0")
        nodes = tuple(_host_port(name, url, item.strip()) for item in hosts.split(",") if item.strip())
        if not nodes:
            raise ConfigError(name, url, _REDIS_CLUSTER_URL_HELP)
        username, has_password, password = userinfo.partition(":")
        return RedisClusterSeeds(
            nodes=nodes,
            username=unquote(username) or None,
            password=unquote(password) if has_password else None,
        )
    if scheme not in ("redis", "rediss"):
        raise ConfigError(name, url, "is not a TCP Redis URL (a cluster is reached over redis:// or rediss://)")
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(name, url, "is not a Redis URL with a valid host:port") from None
    if parts.path.strip("/") not in ("", "0") or not parts.hostname:
        raise ConfigError(name, url, "is not usable for a Redis Cluster (it needs a host, and only database 0 exists)")
    return RedisClusterSeeds(
        nodes=((parts.hostname, port),),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def parse_redis_url(name: str, raw: str) -> str:
    """``redis://``, ``rediss://``, ``unix://``, or ``redis+cluster://seed,seed[/0]``."""
    parse_url(name, raw, _REDIS_SCHEMES)
    if raw.startswith(REDIS_CLUSTER_SCHEME + "://"):
        redis_cluster_seeds(raw, name=name)
    return raw


def parse_key_prefix(name: str, raw: str) -> str:
    """A Redis key prefix; braces are refused, since a hash tag in it would put every key in one slot."""
    if "{" in raw or "}" in raw:
        raise ConfigError(
            name,
            raw,
            "contains { or }: a Redis Cluster hash tag in the prefix would decide every key's slot "
            "(remove the braces, e.g. birb:)",
        )
    return raw


def parse_nats_name(name: str, raw: str) -> str:
    if not _NATS_NAME.match(raw):
        raise ConfigError(name, raw, "is not a valid name (1-64 characters from A-Z a-z 0-9 _ -)")
    return raw


def parse_hosts(name: str, raw: str) -> tuple[str, ...]:
    """Host names as Django's ALLOWED_HOSTS takes them: ``birb.example.com``, ``.example.com``, ``*``."""
    hosts = tuple(part.strip() for part in raw.split(",") if part.strip())
    for host in hosts:
        if "://" in host or "/" in host or " " in host:
            raise ConfigError(name, raw, "is not a comma-separated list of host names (e.g. birb.example.com)")
    if not hosts:
        raise ConfigError(name, raw, 'is empty (give host names, or "*" for any)')
    return hosts


def parse_origins(name: str, raw: str) -> tuple[str, ...]:
    """Origins as Django's CSRF_TRUSTED_ORIGINS takes them: ``https://birb.example.com``."""
    origins = tuple(part.strip() for part in raw.split(",") if part.strip())
    for origin in origins:
        if not _ORIGIN.match(origin):
            raise ConfigError(name, raw, "is not a comma-separated list of origins (e.g. https://birb.example.com)")
    return origins


def parse_ratio(name: str, raw: str) -> float:
    """A sampling ratio, as OTEL_TRACES_SAMPLER_ARG takes it: a number from 0 to 1."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(name, raw, "is not a number (expected a ratio from 0.0 to 1.0)") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(name, raw, "is not a ratio from 0.0 to 1.0")
    return value


# OpenTelemetry's built-in samplers, by their OTEL_TRACES_SAMPLER names.
TRACE_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@dataclass(frozen=True)
class Setting:
    """One documented variable: its default (as the operator would write it) and its parser."""

    name: str
    default: str
    parse: Callable[[str, str], Any]
    help: str


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str, str], int]:
    return lambda name, raw: parse_int(name, raw, minimum=minimum, maximum=maximum)


def _duration(maximum: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        value = parse_duration(name, raw)
        if value > maximum:
            raise ConfigError(name, raw, f"is above the maximum of {maximum:g}s")
        if 0 < value < 0.001:
            raise ConfigError(name, raw, "is below the minimum of 1ms (0 = off)")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str, str], str]:
    return lambda name, raw: parse_choice(name, raw, choices)


def _url(*schemes: str) -> Callable[[str, str], str]:
    return lambda name, raw: parse_url(name, raw, schemes)


def _str(name: str, raw: str) -> str:
    return raw


# The order here is the order of .env.example and of the README's configuration table.
SETTINGS: tuple[Setting, ...] = (
    Setting("API_PORT", "8080", _int(1, 65535), "HTTP port of the API (loopback unless API_HOST says otherwise)."),
    Setting("API_HOST", "127.0.0.1", _str, "Address the API binds to."),
    Setting("DASHBOARD_PORT", "0", _int(0, 65535), "Port of the live dashboard's websocket server (0 = API_PORT + 1)."),
    Setting("API_WORKERS", "2", _int(1, 64), "API server processes."),
    Setting("API_THREADS", "2", _int(1, 512), "Request threads per API process."),
    Setting(
        "DATABASE_URL", "", _url("postgres", "postgresql"), "PostgreSQL URL; unset = the server `make run` started."
    ),
    Setting(
        "REDIS_URL",
        "",
        parse_redis_url,
        "Redis URL, or redis+cluster://host:port,host:port[/0] for a Redis Cluster's seed nodes; "
        "unset = the server `make run` started.",
    ),
    Setting(
        "REDIS_CLUSTER",
        "false",
        parse_bool,
        "REDIS_URL's redis:// node is a seed of a Redis Cluster (a redis+cluster:// URL implies it).",
    ),
    Setting(
        "REDIS_CLUSTER_WAIT_REPLICAS",
        "1",
        _int(0, 5),
        "On a Redis Cluster: replicas a write waits for (WAIT) before it is answered (0 = none).",
    ),
    Setting(
        "NATS_URL",
        "",
        lambda name, raw: parse_url_list(name, raw, ("nats", "tls")),
        "NATS URL, or a comma-separated list of a cluster's servers; unset = the server `make run` started.",
    ),
    Setting(
        "JETSTREAM_REPLICAS",
        "1",
        _int(1, 5),
        "Replicas of both JetStream streams (3 on a three-node NATS cluster); existing streams are updated.",
    ),
    Setting("REDIS_DEFAULT_TTL", "0", _int(0), "TTL in seconds for writes that give none (0 = no expiry)."),
    Setting("MAX_VALUE_SIZE", "1048576", _int(1), "Largest accepted value, in bytes of JSON."),
    Setting("MAX_BATCH_KEYS", "100", _int(1, 10000), "Most keys in one batch get."),
    Setting(
        "MAX_BATCH_RESPONSE_SIZE",
        "8388608",
        _int(1024),
        "Largest batch-get answer, in bytes of JSON (over it: 413, ask for fewer keys).",
    ),
    Setting(
        "REQUEST_BODY_TIMEOUT",
        "10s",
        parse_duration,
        "How long a request body may take to arrive before the answer is 408 and the connection closed.",
    ),
    Setting("PUBLISH_TIMEOUT", "5s", parse_duration, "How long a write waits for the JetStream PubAck before 503."),
    Setting("WORKER_BATCH_SIZE", "100", _int(1, 10000), "Most messages the worker writes in one transaction."),
    Setting("WORKER_BATCH_TIMEOUT", "1s", parse_duration, "How long the worker waits to fill a batch."),
    Setting("WORKER_CONSUMER_GROUP", "birb-worker", parse_nats_name, "Durable consumer name shared by all workers."),
    Setting("WORKER_MAX_DELIVER", "5", _int(1), "Deliveries of one message before it is dead-lettered."),
    Setting(
        "WORKER_EXPIRED_PURGE_INTERVAL",
        "60s",
        _duration(86400),
        "How often a worker deletes rows expired or deleted longer than TOMBSTONE_RETENTION ago (0 = never).",
    ),
    Setting(
        "WARM_CACHE_ON_START",
        "false",
        parse_bool,
        "Queue a rehydration of every live entry when the job runner starts.",
    ),
    Setting("WORKER_LIVENESS_FILE", "", _str, "File the worker touches every loop (default <data dir>/worker.alive)."),
    Setting(
        "WRITE_FALLBACK",
        "none",
        _choice("none", "postgres"),
        "While JetStream is down: answer 503 (none) or write PostgreSQL directly (postgres).",
    ),
    Setting(
        "TOMBSTONE_RETENTION",
        "7d",
        parse_duration,
        "How long deleted keys keep their version (blocks late older writes).",
    ),
    Setting(
        "NEGATIVE_CACHE_TTL",
        "30s",
        _duration(3600),
        "How long Redis remembers that a read found a key absent in PostgreSQL (0 = off, at most 1h); "
        "any write of the key replaces it at once.",
    ),
    Setting(
        "API_AUTH",
        "auto",
        _choice("auto", "required", "off"),
        "API keys on /v1/: auto (loopback only until a key exists, then required), required, or off.",
    ),
    Setting("LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"), "Log level."),
    Setting("LOG_FORMAT", "json", _choice("json", "text"), "Log format."),
    Setting(
        "OTEL_TRACES_ENABLED",
        "false",
        parse_bool,
        "Record OpenTelemetry traces (API request, Redis, JetStream, worker batch, PostgreSQL) and export them.",
    ),
    Setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://127.0.0.1:4318",
        _url("http", "https"),
        "OTLP/HTTP collector base URL (Jaeger's port 4318); spans are sent to its path /v1/traces.",
    ),
    Setting(
        "OTEL_SERVICE_NAME",
        "",
        _str,
        "service.name of the spans (unset = birb-nest-api, birb-nest-worker, birb-nest-cli by process).",
    ),
    Setting(
        "OTEL_TRACES_SAMPLER",
        "parentbased_always_on",
        _choice(*TRACE_SAMPLERS),
        "Which traces are kept: " + ", ".join(TRACE_SAMPLERS) + ".",
    ),
    Setting(
        "OTEL_TRACES_SAMPLER_ARG",
        "1.0",
        parse_ratio,
        "The ratio (0.0-1.0) of the traceidratio samplers.",
    ),
    Setting(
        "FEATURE_METRICS_DETAILED",
        "false",
        parse_bool,
        "Route (URL pattern name) and status labels on http_requests_total and http_request_duration_seconds.",
    ),
    Setting(
        "API_DEBUG_PORT",
        "0",
        _int(0, 65535),
        "First port of the debug endpoints (/debug/pprof/: profile, heap, goroutine): API processes "
        "take it and the next API_WORKERS - 1, workers the ones after (0 = off).",
    ),
    Setting(
        "API_DEBUG_HOST",
        "127.0.0.1",
        _str,
        "Address of the debug endpoints; anything but loopback also needs API_DEBUG_ALLOW_REMOTE=true.",
    ),
    Setting(
        "API_DEBUG_ALLOW_REMOTE",
        "false",
        parse_bool,
        "Allow a non-loopback API_DEBUG_HOST (the endpoints show every stack and allocation, without auth).",
    ),
    Setting(
        "WORKER_METRICS_PORT",
        "0",
        _int(0, 65535),
        "Port of the worker's Prometheus metrics (0 = off; each worker copy on one host needs its own).",
    ),
    Setting("WORKER_METRICS_HOST", "127.0.0.1", _str, "Address of the worker's Prometheus metrics."),
    Setting("SECRET_KEY", "", _str, "Django secret key; required unless DEBUG is on (`make run` generates one)."),
    Setting("DEBUG", "false", parse_bool, "Django debug mode. Never in production."),
    Setting(
        "ALLOWED_HOSTS",
        "*",
        parse_hosts,
        "Host names the API answers to, comma-separated (`*` = any; set your host name in production).",
    ),
    Setting(
        "HTTPS_ONLY",
        "false",
        parse_bool,
        "Served over HTTPS only: secure cookies, HSTS, plain HTTP redirected (except /, /health, /metrics).",
    ),
    Setting(
        "TRUST_X_FORWARDED_PROTO",
        "false",
        parse_bool,
        "Trust the proxy's X-Forwarded-Proto header to tell HTTPS requests (only behind a proxy that sets it).",
    ),
    Setting("HSTS_SECONDS", "31536000", _int(0), "Strict-Transport-Security max-age with HTTPS_ONLY (0 = no header)."),
    Setting("HSTS_INCLUDE_SUBDOMAINS", "true", parse_bool, "HSTS covers subdomains of the API's host name too."),
    Setting(
        "CSRF_TRUSTED_ORIGINS",
        "",
        parse_origins,
        "Extra origins the console's forms may come from, comma-separated (a proxy that rewrites Host).",
    ),
    Setting(
        "METRICS_TOKEN",
        "",
        _str,
        "Bearer token /metrics/prometheus asks for (unset = open; /health and the JSON /metrics stay open).",
    ),
    Setting("BIRB_ENV_FILE", "", _str, "The .env file read at start and by the worker on SIGUSR1 (default ./.env)."),
    Setting("BIRB_DATA_DIR", "", _str, "Where `make run` keeps server data and its URLs (default ./var)."),
    Setting(
        "REDIS_KEY_PREFIX",
        "birb:",
        parse_key_prefix,
        "Prefix of every Redis key the service writes (no { or }: Redis Cluster hash tags are the service's).",
    ),
    Setting("BIRB_STREAM", "BIRB_CACHE", parse_nats_name, "JetStream stream of persist messages."),
    Setting("BIRB_DLQ_STREAM", "BIRB_CACHE_DLQ", parse_nats_name, "JetStream stream of dead letters."),
    Setting("BIRB_SUBJECT_PREFIX", "cache", parse_nats_name, "First token of stream subjects."),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """The parsed configuration. Field names are the variable names in lower case."""

    api_port: int
    api_host: str
    dashboard_port: int
    api_workers: int
    api_threads: int
    database_url: str
    redis_url: str
    redis_cluster: bool
    redis_cluster_wait_replicas: int
    nats_url: str
    jetstream_replicas: int
    redis_default_ttl: int
    max_value_size: int
    max_batch_keys: int
    max_batch_response_size: int
    request_body_timeout: float
    publish_timeout: float
    worker_batch_size: int
    worker_batch_timeout: float
    worker_consumer_group: str
    worker_max_deliver: int
    worker_expired_purge_interval: float
    warm_cache_on_start: bool
    worker_liveness_file: str
    write_fallback: str
    tombstone_retention: float
    negative_cache_ttl: float
    api_auth: str
    log_level: str
    log_format: str
    otel_traces_enabled: bool
    otel_exporter_otlp_endpoint: str
    otel_service_name: str
    otel_traces_sampler: str
    otel_traces_sampler_arg: float
    feature_metrics_detailed: bool
    api_debug_port: int
    api_debug_host: str
    api_debug_allow_remote: bool
    worker_metrics_port: int
    worker_metrics_host: str
    secret_key: str
    debug: bool
    allowed_hosts: tuple[str, ...]
    https_only: bool
    trust_x_forwarded_proto: bool
    hsts_seconds: int
    hsts_include_subdomains: bool
    csrf_trusted_origins: tuple[str, ...]
    metrics_token: str
    birb_env_file: str
    birb_data_dir: str
    redis_key_prefix: str
    birb_stream: str
    birb_dlq_stream: str
    birb_subject_prefix: str

    @property
    def data_dir(self) -> Path:
        return Path(self.birb_data_dir) if self.birb_data_dir else BASE_DIR / "var"

    @property
    def nats_servers(self) -> tuple[str, ...]:
        """NATS_URL's servers, in order (one for a single server)."""
        return url_list(self.nats_url)

    @property
    def redis_cluster_nodes(self) -> tuple[tuple[str, int], ...]:
        """The Redis Cluster seed nodes as (host, port); empty when Redis is not a cluster."""
        if not self.redis_cluster or not self.redis_url:
            return ()
        return redis_cluster_seeds(self.redis_url).nodes


_FIELDS, _NAMES = [f.name for f in fields(Config)], [s.name.lower() for s in SETTINGS]
assert _FIELDS == _NAMES, f"Config fields and SETTINGS differ: {set(_FIELDS) ^ set(_NAMES)} or their order"


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Parse every variable; the first bad one raises :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    values = {}
    for setting in SETTINGS:
        raw = environ.get(setting.name)
        if raw is None or raw == "":
            raw = setting.default
        values[setting.name.lower()] = setting.parse(setting.name, raw)
    config = Config(**values)
    if config.redis_url.startswith(REDIS_CLUSTER_SCHEME + "://") and not config.redis_cluster:
        config = replace(config, redis_cluster=True)
    if config.redis_cluster and config.redis_url:
        redis_cluster_seeds(config.redis_url)  # a unix socket or a database other than 0 stops here
    if not config.debug and not config.secret_key:
        raise ConfigError(
            "SECRET_KEY", "", "is required when DEBUG is off (set SECRET_KEY, or DEBUG=true for development)"
        )
    if config.api_debug_port and not config.api_debug_allow_remote and not is_loopback(config.api_debug_host):
        raise ConfigError(
            "API_DEBUG_HOST",
            config.api_debug_host,
            "is not a loopback address: the debug endpoints show every stack and allocation to anyone who "
            "reaches them (use 127.0.0.1, or set API_DEBUG_ALLOW_REMOTE=true to serve them there anyway)",
        )
    if not config.debug and _is_known_example_key(config.secret_key):
        # Only the well-known part is echoed: the rest may be a real project's key.
        shown = _INSECURE_PREFIX + "…" if config.secret_key.startswith(_INSECURE_PREFIX) else config.secret_key
        raise ConfigError(
            "SECRET_KEY",
            shown,
            "is a known example or development key, not a secret "
            f"(generate one: {GENERATE_SECRET_KEY}; or DEBUG=true for development)",
        )
    return config


# settings.py uses it when DEBUG is on and SECRET_KEY unset; it must never sign anything in production.
DEV_SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"
GENERATE_SECRET_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(50))'"
# Keys made by `django-admin startproject` (Django marks them insecure itself), and placeholders that
# examples and tutorials print, compared without case or punctuation ("CHANGE_ME" is "change-me").
_INSECURE_PREFIX = "django-insecure-"
_PLACEHOLDER_KEYS = frozenset(
    re.sub(r"[^a-z0-9]", "", key)
    for key in (
        DEV_SECRET_KEY,
        "change-me",
        "changeme",
        "change-this",
        "replace-me",
        "secret",
        "secret-key",
        "your-secret-key",
        "your-secret-key-here",
        "insecure",
    )
)


def _is_known_example_key(key: str) -> bool:
    return key.startswith(_INSECURE_PREFIX) or re.sub(r"[^a-z0-9]", "", key.lower()) in _PLACEHOLDER_KEYS


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def data_dir_from(environ: Mapping[str, str]) -> Path:
    raw = environ.get("BIRB_DATA_DIR") or ""
    return Path(raw) if raw else BASE_DIR / "var"


STACK_ENV_FILE = "stack.env"


def env_file(environ: Mapping[str, str] | None = None) -> Path:
    """The operator's ``.env`` (``BIRB_ENV_FILE`` moves it); the worker re-reads it on SIGUSR1."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("BIRB_ENV_FILE") or BASE_DIR / ".env")


def load_env_files(environ: MutableMapping[str, str] | None = None) -> None:
    """Fill unset variables from ``.env`` and then from the file `make run` writes under the data dir.

    Variables already in the environment always win, so an operator's export beats both files.
    """
    from dotenv import dotenv_values

    target = os.environ if environ is None else environ
    for path in (env_file(target), data_dir_from(target) / STACK_ENV_FILE):
        if path.is_file():
            for key, value in dotenv_values(path).items():
                if value is not None and not target.get(key):
                    target[key] = value


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turn a :class:`ConfigError` into its one line on stderr and exit code 2."""
    try:
        yield
    except ConfigError as error:
        sys.stderr.write(f"{error}\n")
        sys.stderr.flush()
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
