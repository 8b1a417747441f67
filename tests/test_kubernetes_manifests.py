"""deploy/kubernetes/: the manifests, read as files, no cluster and no network (issue #13, Kubernetes part).

Every manifest is validated against the OpenAPI schemas of the Kubernetes versions it targets
(kubernetes-validate bundles them; strict: a field the API does not know is an error), then
checked against the application: the probes reach paths and the port the API serves, the worker's
grace period outlasts a batch, every variable given to a pod is one birbnest/env.py reads, the
Secret holds placeholders only. The last test builds the kustomization with `kubectl kustomize`
when kubectl is installed, and skips otherwise.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from django.urls import resolve

from birbnest import tracing
from birbnest.env import SETTINGS_BY_NAME, ConfigError, _is_known_example_key, load_config, parse_duration
from persistence import jetstream
from persistence.worker import loop as worker_loop

BASE_DIR = Path(__file__).resolve().parent.parent
MANIFEST_DIR = BASE_DIR / "deploy" / "kubernetes"
KUSTOMIZATION = MANIFEST_DIR / "kustomization.yaml"
SECRET_TEMPLATE = MANIFEST_DIR / "secret.yaml"
COMPOSE_FILE = BASE_DIR / "docker-compose.yml"
DOCKERFILE = BASE_DIR / "Dockerfile"

# The Kubernetes minor versions the manifests target: the three upstream still supports in
# December 2026 (1.35 is the oldest; 1.37 the newest, and the newest kubernetes-validate 1.37.0
# bundles). Each must be bundled as such, not approximated by an older schema.
KUBERNETES_VERSIONS = ("1.35", "1.36", "1.37")

NAMESPACE = "birb-nest"
# The runbook's commands name these (`kubectl logs -n birb-nest deployment/birb-nest-api`,
# `kubectl scale deployment birb-nest-worker`).
API, WORKER, MIGRATE = "birb-nest-api", "birb-nest-worker", "birb-nest-migrate"
CONFIG_MAP, SECRET = "birb-nest-config", "birb-nest-secrets"
SECRET_KEYS = {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "METRICS_TOKEN"}
# Settings issue #13's cluster support adds; accepted before they exist in birbnest/env.py, and
# parsed by it once they do.
PENDING_CLUSTER_SETTINGS = {"REDIS_CLUSTER", "JETSTREAM_REPLICAS"}
# The image's service user (Dockerfile: useradd --uid 10001).
IMAGE_UID = 10001


@pytest.fixture(autouse=True)
def birb_settings() -> None:
    """Replaces tests/conftest.py's session fixture here: these tests need no servers."""


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(path for path in MANIFEST_DIR.glob("*.yaml") if path != KUSTOMIZATION)


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource of every manifest (the Secret template included), by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifest_files():
        for doc in load_documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    return resource["spec"]["template"]["spec"]


def containers(resource: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(resource)
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def main_container(resource: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(resource)["containers"]
    return container


def workloads(resources: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for (kind, _), r in resources.items() if kind in ("Deployment", "Job")]


def config_data(resources: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    return resources[("ConfigMap", CONFIG_MAP)]["data"]


# --- schema ------------------------------------------------------------------------------------


def test_the_versions_are_bundled() -> None:
    bundled = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= bundled, f"kubernetes-validate bundles {sorted(bundled)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_strictly(resources: dict[tuple[str, str], dict[str, Any]], version: str) -> None:
    problems = []
    for (kind, name), doc in resources.items():
        try:
            validated = kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"{kind}/{name}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{kind}/{name}: {error.message}")
        else:
            assert validated == version, f"{kind}/{name} was checked against {validated}, not {version}"
    assert not problems, "\n".join(problems)


def test_strict_validation_refuses_an_unknown_field(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The check above has teeth: a misspelt field (silently dropped by a lax apply) is refused."""
    deployment = copy.deepcopy(resources[("Deployment", API)])
    container = main_container(deployment)
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    expected = {path.name for path in manifest_files()} - {SECRET_TEMPLATE.name}
    # The template stays out: `kubectl apply -k` must never overwrite the real Secret with it.
    assert set(listed) == expected
    assert [image["name"] for image in kustomization["images"]] == ["birb-nest"]


def test_every_resource_is_in_the_namespace(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert resources[("Namespace", NAMESPACE)]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "restricted"
    )
    for (kind, name), doc in resources.items():
        if kind != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{kind}/{name}"
    kinds = {kind for kind, _ in resources}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job"} <= kinds
    assert {"ConfigMap", "Secret"} <= kinds


# --- the image and its commands ------------------------------------------------------------------


def test_one_image_and_the_commands_compose_runs(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    images = {c["image"] for r in workloads(resources) for c in containers(r)}
    assert images == {"birb-nest:local"}, "one image, the one docker-compose.yml builds and tags"
    assert compose["api"]["image"] == "birb-nest:local"
    assert main_container(resources[("Deployment", API)])["command"] == compose["api"]["command"]
    assert main_container(resources[("Deployment", WORKER)])["command"] == compose["worker"]["command"]
    assert main_container(resources[("Job", MIGRATE)])["command"] == compose["migrate"]["command"]
    # The main command is exec form: python is PID 1 and gets SIGTERM itself.
    for resource in workloads(resources):
        assert main_container(resource)["command"][:2] == ["python", "manage.py"]


def test_pods_wait_for_the_migrations(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    job = resources[("Job", MIGRATE)]
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")
    for name in (API, WORKER):
        (init,) = pod_spec(resources[("Deployment", name)])["initContainers"]
        assert "manage.py migrate --check" in " ".join(init["command"])


# --- security ----------------------------------------------------------------------------------


def test_pods_run_as_the_image_user_on_a_read_only_root(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert f"--uid {IMAGE_UID}" in DOCKERFILE.read_text()
    # BIRB_DATA_DIR's default (var/ beside manage.py) inside the image's WORKDIR.
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M)
    default_data_dir = load_config({"SECRET_KEY": secrets.token_urlsafe(50)}).data_dir
    data_dir = str(Path(workdir) / default_data_dir.relative_to(BASE_DIR))
    assert data_dir == "/app/var"
    for resource in workloads(resources):
        name = resource["metadata"]["name"]
        spec = pod_spec(resource)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in containers(resource):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            # What the app writes: the data dir (Prometheus multi-process files, the worker's
            # liveness file, backups) and temporary files.
            for path in (data_dir, "/tmp"):
                assert mounts.get(path) in empty_dirs, f"{where}: {path} is not a writable emptyDir"
            assert "memory" in container["resources"]["limits"], where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where


# --- configuration -----------------------------------------------------------------------------


def env_names(resource: dict[str, Any]) -> set[str]:
    return {item["name"] for c in containers(resource) for item in c.get("env", [])}


def test_pods_take_the_config_map_and_the_secret(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    for resource in workloads(resources):
        for container in containers(resource):
            sources = container["envFrom"]
            refs = [
                (s.get("configMapRef") or {}).get("name") or (s.get("secretRef") or {}).get("name") for s in sources
            ]
            assert refs == [CONFIG_MAP, SECRET], f"{resource['metadata']['name']}/{container['name']}"
            for source in sources:  # a missing one is an error, not silently nothing
                assert not (source.get("configMapRef") or source.get("secretRef")).get("optional")


def test_every_variable_is_one_the_app_reads(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = config_data(resources)
    secret = resources[("Secret", SECRET)]["stringData"]
    given: dict[str, str] = {**config, **secret}
    for resource in workloads(resources):
        for container in containers(resource):
            given.update({item["name"]: item["value"] for item in container.get("env", [])})
    for name, value in given.items():
        if name in PENDING_CLUSTER_SETTINGS and name not in SETTINGS_BY_NAME:
            continue  # takes effect once issue #13's cluster support adds it
        assert name in SETTINGS_BY_NAME, f"{name} is not a Birb Nest setting (birbnest/env.py)"
        SETTINGS_BY_NAME[name].parse(name, value)  # raises ConfigError on a value the app refuses
    assert not set(config) & SECRET_KEYS, "secrets belong in the Secret"
    assert set(secret) == SECRET_KEYS
    # With real secrets in place of the placeholders, the configuration loads as a whole.
    environ = {**config, **secret, "SECRET_KEY": secrets.token_urlsafe(50)}
    loaded = load_config(environ)
    assert loaded.api_host == "0.0.0.0" and not loaded.debug
    assert loaded.api_auth == "required", "clients are never on the pod's loopback: auto would refuse them all"


def test_secret_holds_only_placeholders(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = resources[("Secret", SECRET)]
    assert "data" not in secret, "placeholders in stringData only (readable, and nothing base64 to hide in)"
    values = secret["stringData"]
    for name, value in values.items():
        assert "change-me" in value, f"{name} is not a placeholder"
    # Left in place, the placeholders fail loudly: the key is refused at start, the hosts do not exist.
    assert _is_known_example_key(values["SECRET_KEY"])
    with pytest.raises(ConfigError, match="known example"):
        load_config({"SECRET_KEY": values["SECRET_KEY"]})
    for name in ("DATABASE_URL", "REDIS_URL"):
        host = re.sub(r"^[a-z]+://([^@/]*@)?", "", values[name]).split(":")[0].split("/")[0]
        assert host.endswith(".invalid"), f"{name}: {host} (RFC 2606 reserves .invalid)"
    # Nothing that looks like a real secret anywhere in the directory's other files either.
    for path in MANIFEST_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"\b(?:django-insecure-|bn_[0-9a-f]{8}_)", text), path.name


# --- the API: probes, Service, autoscaling -----------------------------------------------------


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_api_probes_reach_what_the_api_serves(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = config_data(resources)
    container = main_container(resources[("Deployment", API)])
    api_port = int(config["API_PORT"])
    assert config["API_HOST"] == "0.0.0.0", "the kubelet probes the pod's IP, not its loopback"
    probes = {kind: container[kind] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    for kind, probe in probes.items():
        assert port_number(container, probe["httpGet"]["port"]) == api_port, kind
    views = {kind: resolve(probe["httpGet"]["path"]).url_name for kind, probe in probes.items()}
    # Readiness: /health (every dependency); liveness and start-up: / (none of them), so a
    # server that is down takes the pod out of the Service but never restarts it.
    assert views == {"readinessProbe": "health", "livenessProbe": "root", "startupProbe": "root"}
    # /health takes about 5 s when a server does not answer (PostgreSQL pool 2 s, NATS 3 s).
    assert probes["readinessProbe"]["timeoutSeconds"] > 5


def test_liveness_path_answers_with_every_server_down(
    resources: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """GET / with the ConfigMap's settings, the kubelet's Host header (the pod IP) and no server reachable."""
    probe = main_container(resources[("Deployment", API)])["livenessProbe"]["httpGet"]
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **config_data(resources),
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DATABASE_URL": "postgresql://birb:x@127.0.0.1:1/birbcache",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "NATS_URL": "nats://127.0.0.1:1",
        "BIRB_ENV_FILE": os.devnull,
        "BIRB_DATA_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "birbnest.settings",
    }
    script = (
        "import django, sys; django.setup(); from django.test import Client; "
        f"r = Client().get({probe['path']!r}, HTTP_HOST='10.1.2.3:8080'); "
        "print(r.status_code); sys.exit(r.status_code != 200)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=BASE_DIR, env=environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_service_and_prometheus_annotations(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = resources[("Deployment", API)]
    container = main_container(deployment)
    service = resources[("Service", API)]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port_number(container, port["targetPort"]) == int(config_data(resources)["API_PORT"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == int(config_data(resources)["API_PORT"])
    assert resolve(annotations["prometheus.io/path"]).url_name == "metrics-prometheus"
    worker = resources[("Deployment", WORKER)]
    worker_env = {item["name"]: item["value"] for item in main_container(worker)["env"]}
    worker_annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert worker_annotations["prometheus.io/port"] == worker_env["WORKER_METRICS_PORT"] != "0"
    assert worker_env["WORKER_METRICS_HOST"] == "0.0.0.0"
    assert port_number(main_container(worker), "metrics") == int(worker_env["WORKER_METRICS_PORT"])


def test_the_hpa_scales_the_api_on_cpu(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    hpa = resources[("HorizontalPodAutoscaler", API)]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": API}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    deployment = resources[("Deployment", API)]
    assert "replicas" not in deployment["spec"], "the HPA owns the count; an apply would reset it"
    assert "cpu" in main_container(deployment)["resources"]["requests"], "utilization is measured against it"


@pytest.mark.parametrize("name", [API, WORKER])
def test_a_pdb_covers_the_deployment(resources: dict[tuple[str, str], dict[str, Any]], name: str) -> None:
    pdb = resources[("PodDisruptionBudget", name)]
    labels = resources[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1


# --- the worker: graceful termination, liveness --------------------------------------------------


def test_worker_grace_period_outlasts_a_batch(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = config_data(resources)
    batch_timeout = parse_duration("WORKER_BATCH_TIMEOUT", config["WORKER_BATCH_TIMEOUT"])
    spec = pod_spec(resources[("Deployment", WORKER)])
    grace = spec["terminationGracePeriodSeconds"]
    # On SIGTERM: the fetch in flight (batch timeout + linger), two batch writes and their acks
    # (allow 10 s for a slow commit), the trace flush; nothing in a preStop hook eats into it.
    needed = batch_timeout + worker_loop.BATCH_LINGER + 10 + tracing.EXPORT_TIMEOUT
    assert grace > needed, f"terminationGracePeriodSeconds {grace} s, a batch may need {needed:g} s"
    assert grace > batch_timeout
    assert "lifecycle" not in main_container(resources[("Deployment", WORKER)])
    compose_grace = parse_duration(
        "stop_grace_period", yaml.safe_load(COMPOSE_FILE.read_text())["services"]["worker"]["stop_grace_period"]
    )
    assert grace >= compose_grace, "no shorter than compose's stop_grace_period"


def test_worker_liveness_reads_the_file_the_worker_touches(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = config_data(resources)
    container = main_container(resources[("Deployment", WORKER)])
    command = container["livenessProbe"]["exec"]["command"]
    script = command[-1]
    assert command[:2] == ["python", "-c"]
    assert repr(config["WORKER_LIVENESS_FILE"]) in script, "the probe reads the file the worker touches"
    (max_age,) = (int(n) for n in re.findall(r"> (\d+)\)", script))
    batch_timeout = parse_duration("WORKER_BATCH_TIMEOUT", config["WORKER_BATCH_TIMEOUT"])
    # Touched every loop (every batch timeout when idle) and every ACK_WAIT / 3 during a write.
    assert max_age > 10 * max(batch_timeout, jetstream.ACK_WAIT / 3)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(config["WORKER_LIVENESS_FILE"]).parent) in mounts


def test_worker_liveness_probe_script(tmp_path: Path) -> None:
    """The probe's logic, run: a fresh file passes, a stale one fails, a missing one (connecting) passes."""
    container = main_container(load_documents(MANIFEST_DIR / "worker-deployment.yaml")[0])
    script = container["livenessProbe"]["exec"]["command"][-1]
    alive = tmp_path / "worker.alive"
    script = script.replace("/app/var/worker.alive", str(alive))

    def probe() -> int:
        return subprocess.run([sys.executable, "-c", script], timeout=30).returncode

    assert probe() == 0, "no file yet: still connecting"
    alive.touch()
    assert probe() == 0
    os.utime(alive, (0, 0))
    assert probe() == 1


# --- kustomize ---------------------------------------------------------------------------------


def test_kustomize_builds_what_was_validated(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the kustomization was only checked as a file")
    done = subprocess.run(
        [kubectl, "kustomize", str(MANIFEST_DIR)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == set(resources) - {("Secret", SECRET)}
    for doc in built:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)
