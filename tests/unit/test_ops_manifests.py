"""The deployment files: compose, Prometheus, Grafana and Kubernetes, checked offline.

Schemas are vendored under tests/data/vendored (see its README): the Compose spec schema and the
strict Kubernetes schemas of the few kinds ops/k8s uses. Whatever has no vendored schema (the KEDA
ScaledObject, the kustomization) is checked structurally, and the files are checked against each
other: ports, names, the grace period against shutdown_timeout_s, replicas against partitions.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from streamer.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
VENDORED = ROOT / "tests" / "data" / "vendored"
K8S_SCHEMAS = VENDORED / "kubernetes" / "v1.33.0-local-strict"
COMPOSE = ROOT / "docker-compose.yml"
EXAMPLE_CONFIG = ROOT / "examples" / "streamer.yaml"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamer.json"
K8S = ROOT / "ops" / "k8s"

# The metrics streamer serves at /metrics, with their labels (Prometheus adds instance and job, and
# ops/prometheus/prometheus.yml adds service). Histograms are also exposed as _bucket (with le),
# _sum and _count.
METRICS: dict[str, set[str]] = {
    "streamer_events_in_total": {"route"},
    "streamer_answered_total": {"route"},
    "streamer_answer_cache_hits_total": {"route"},
    "streamer_dead_lettered_total": {"route", "code"},
    "streamer_late_total": {"route"},
    "streamer_batch_size": set(),
    "streamer_queue_depth": set(),
    "streamer_inflight_tokens": set(),
    "streamer_e2e_latency_seconds": {"route"},
    "streamer_model_latency_seconds": set(),
    "streamer_output_tokens_total": set(),
    "streamer_slo_misses_total": {"route"},
    "streamer_consumer_lag": {"topic", "partition"},
    "streamer_open_windows": {"route"},
    "streamer_windows_emitted_total": {"route"},
}
HISTOGRAMS = {"streamer_batch_size", "streamer_e2e_latency_seconds", "streamer_model_latency_seconds"}
TARGET_LABELS = {"instance", "job", "service"}


def _series() -> dict[str, set[str]]:
    series = dict(METRICS)
    for name in HISTOGRAMS:
        series[f"{name}_bucket"] = METRICS[name] | {"le"}
        series[f"{name}_sum"] = METRICS[name]
        series[f"{name}_count"] = METRICS[name]
    return series


SERIES = _series()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def example_settings() -> Settings:
    return load_settings(EXAMPLE_CONFIG)


def seconds(duration: str) -> float:
    """A Compose/Go duration such as 45s, 1m30s or 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(autouse=True)
def _no_streamer_env(monkeypatch):
    """STREAMER_ variables of the shell running the tests must not change what the files say."""
    for name in list(os.environ):
        if name.startswith("STREAMER_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------------------------------
# docker-compose.yml

REQUIRED_SERVICES = {"kafka", "redis", "streamer", "streamer-gpu", "prometheus", "grafana", "dashboard", "producer"}
STREAMER_SERVICES = ("streamer", "streamer-gpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((VENDORED / "compose" / "compose_spec.json").read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft/2019-09/")
    jsonschema.Draft201909Validator.check_schema(schema)
    # No format checker: Compose durations ("10s") are not ISO 8601 durations.
    return jsonschema.Draft201909Validator(schema)


def test_compose_validates_against_the_compose_schema(compose, compose_validator):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_the_compose_schema_rejects_a_typo(compose, compose_validator):
    broken = copy.deepcopy(compose)
    broken["services"]["streamer"]["helthcheck"] = broken["services"]["streamer"].pop("healthcheck")
    assert not compose_validator.is_valid(broken)


def test_compose_has_the_services_and_the_gpu_profile(compose):
    services = compose["services"]
    assert set(services) >= REQUIRED_SERVICES
    assert services["streamer-gpu"]["profiles"] == ["gpu"]
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == REQUIRED_SERVICES - {"streamer-gpu"}, "everything but streamer-gpu runs by default"


def test_the_gpu_service_reserves_an_nvidia_gpu_and_the_default_is_cpu(compose):
    gpu = compose["services"]["streamer-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    assert gpu["environment"]["STREAMER_MODEL__DEVICE"] == "cuda"
    cpu = compose["services"]["streamer"]
    assert "deploy" not in cpu
    assert cpu["environment"]["STREAMER_MODEL__DEVICE"] == "cpu"


def test_every_dependency_exists_and_waits_on_a_healthcheck(compose):
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert not services[dep].get("profiles"), f"{name} depends on {dep}, which only runs in a profile"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: it has no healthcheck"
    for name in ("kafka", "redis", "prometheus", "grafana", *STREAMER_SERVICES, "dashboard"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name in STREAMER_SERVICES:
        assert services[name]["depends_on"] == {
            "kafka": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_the_producer_replays_the_example_questions_once_kafka_is_healthy(compose):
    producer = compose["services"]["producer"]
    assert producer["depends_on"]["kafka"]["condition"] == "service_healthy"
    command = producer["command"]
    assert command[:2] == ["produce", "questions"]
    assert command[command.index("--bootstrap") + 1] == "kafka:9092"
    path = command[2]
    assert path.startswith("/app/") and (ROOT / path.removeprefix("/app/")).is_file()
    assert path.removeprefix("/app/") == "examples/questions.jsonl"
    assert "questions" in {r.input for r in example_settings().routes}
    assert producer.get("restart", "no") == "no"


def test_the_dashboard_page_reads_redis_only(compose):
    dashboard = compose["services"]["dashboard"]
    assert dashboard["command"] == ["dashboard", "--host", "0.0.0.0", "--port", "9500"]
    assert dashboard["ports"] == ["127.0.0.1:9500:9500"], "every answer is on the page: this host only"
    assert set(dashboard["depends_on"]) == {"redis"}
    assert not any("KAFKA" in key for key in dashboard.get("environment", {}))


def test_the_streamer_services_drain_within_their_stop_grace_period(compose):
    settings = example_settings()
    for name in STREAMER_SERVICES:
        service = compose["services"][name]
        assert service["command"][:3] == ["run", "--config", "/app/examples/streamer.yaml"]
        assert seconds(service["stop_grace_period"]) > settings.shutdown_timeout_s, name
        assert any(p.endswith(f":{settings.observe.http_port}") for p in service["ports"]), name
        assert f":{settings.observe.http_port}/healthz" in " ".join(service["healthcheck"]["test"])


def test_grafana_is_provisioned_and_open_to_anonymous_viewers(compose):
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "streamer.yml")["providers"][0]
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_bind_mounts_name_files_in_the_repository(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


# --------------------------------------------------------------------------------------------------
# Prometheus


def _streamer_job(config: dict[str, Any]) -> dict[str, Any]:
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "streamer"]
    assert len(jobs) == 1
    return jobs[0]


def _targets(job: dict[str, Any]) -> set[str]:
    targets = {t for sc in job.get("static_configs", []) for t in sc["targets"]}
    targets |= {f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    return targets


def test_prometheus_scrapes_every_streamer_service_of_the_compose_file(compose):
    config = load_yaml(PROMETHEUS)
    assert seconds(config["global"]["scrape_interval"]) > seconds(config["global"]["scrape_timeout"])
    job = _streamer_job(config)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    port = example_settings().observe.http_port
    assert _targets(job) == {f"{name}:{port}" for name in STREAMER_SERVICES}
    assert f"./ops/prometheus/prometheus.yml:{config_path(compose)}:ro" in compose["services"]["prometheus"]["volumes"]


def config_path(compose: dict[str, Any]) -> str:
    flag = next(a for a in compose["services"]["prometheus"]["command"] if a.startswith("--config.file="))
    return flag.split("=", 1)[1]


def test_the_commented_kubernetes_job_parses_and_keeps_the_streamer_service():
    lines = PROMETHEUS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - job_name: streamer"))
    block = [re.sub(r"^  # ?", "", line) for line in lines[start:] if line.startswith("  #")]
    (job,) = yaml.safe_load("\n".join(block))
    assert job["kubernetes_sd_configs"][0]["role"] == "endpoints"
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    service = next(d for d in _k8s_docs() if d["kind"] == "Service")
    assert keep["regex"] == f"{service['metadata']['name']};{service['spec']['ports'][0]['name']}"


# --------------------------------------------------------------------------------------------------
# Grafana

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (identifiers that are not functions, keywords or labels)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        if not m.group(2) and m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names


def promql_selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, labels matched in its {...}) for every selector with matchers."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return [(m.group(1), set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2))))
            for m in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", e)]


def promql_grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
            for label in group.split(",") if label.strip()}


def test_the_promql_parser_of_this_test():
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(streamer_e2e_latency_seconds_bucket'
            '{route=~"$route"}[$__rate_interval]))) / on (route) group_left sum(x_total offset 5m) > bool 1e3')
    assert promql_metrics(expr) == {"streamer_e2e_latency_seconds_bucket", "x_total"}
    assert promql_selector_labels(expr) == [("streamer_e2e_latency_seconds_bucket", {"route"})]
    assert promql_grouping_labels(expr) == {"le", "route"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def test_every_panel_queries_only_streamer_metrics(dashboard):
    graphs = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert graphs and all(p.get("targets") for p in graphs), "a panel without a query"
    for expr in _exprs(dashboard):
        assert "__name__" not in expr, expr
        names = promql_metrics(expr)
        assert names, f"no metric in {expr}"
        assert names <= set(SERIES), f"unknown metric {names - set(SERIES)} in {expr}"
        for metric, labels in promql_selector_labels(expr):
            assert labels <= SERIES[metric] | TARGET_LABELS, f"{metric} has no label {labels} ({expr})"
        known = set().union(*(SERIES[n] for n in names)) | TARGET_LABELS
        assert promql_grouping_labels(expr) <= known, expr


def test_template_variables_read_streamer_labels(dashboard):
    for var in dashboard["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((\w+)\s*,\s*(\w+)\)", query)
        assert m, query
        assert m.group(2) in METRICS[m.group(1)], query
        used = [e for e in _exprs(dashboard) if f"${var['name']}" in e]
        assert used, f"variable {var['name']} is used by no panel"


def test_the_dashboard_covers_what_an_operator_needs(dashboard):
    exprs = _exprs(dashboard)
    read = set().union(*(promql_metrics(e) for e in exprs))
    for name in ("streamer_events_in_total", "streamer_answered_total", "streamer_consumer_lag",
                 "streamer_batch_size_bucket", "streamer_queue_depth", "streamer_slo_misses_total",
                 "streamer_dead_lettered_total", "streamer_open_windows"):
        assert name in read, f"no panel shows {name}"
    for histogram in ("streamer_e2e_latency_seconds", "streamer_model_latency_seconds"):
        quantiles = {float(q) for e in exprs if f"{histogram}_bucket" in e
                     for q in re.findall(r"histogram_quantile\(\s*([\d.]+)", e)}
        assert {0.5, 0.95, 0.99} <= quantiles, histogram
    assert any("streamer_consumer_lag" in e and promql_grouping_labels(e) >= {"topic", "partition"} for e in exprs)
    assert any("streamer_dead_lettered_total" in e and "code" in promql_grouping_labels(e) for e in exprs)
    assert any("streamer_events_in_total" in e and "route" in promql_grouping_labels(e) for e in exprs)


def test_the_dashboard_layout_and_datasource(dashboard):
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"])


# --------------------------------------------------------------------------------------------------
# Kubernetes

K8S_SCHEMA_FILES = {
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Service"): "service-v1.json",
}
STRUCTURAL_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _k8s_docs() if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def k8s_registry() -> Registry:
    resources = []
    for path in K8S_SCHEMAS.glob("*.json"):
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


def _k8s_validator(registry: Registry, api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((K8S_SCHEMAS / K8S_SCHEMA_FILES[(api_version, kind)]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, registry=registry)


def test_every_k8s_manifest_validates_against_the_vendored_schemas(k8s_registry):
    docs = _k8s_docs()
    assert {(d["apiVersion"], d["kind"]) for d in docs} == set(K8S_SCHEMA_FILES) | STRUCTURAL_KINDS
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in STRUCTURAL_KINDS:
            continue
        validator = _k8s_validator(k8s_registry, *key)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}:\n" + "\n".join(errors)


def test_the_strict_k8s_schema_rejects_a_typo(k8s_registry):
    deployment = copy.deepcopy(_one("Deployment"))
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    assert not _k8s_validator(k8s_registry, "apps/v1", "Deployment").is_valid(deployment)
    deployment = copy.deepcopy(_one("Deployment"))
    deployment["spec"]["replicas"] = "one"
    assert not _k8s_validator(k8s_registry, "apps/v1", "Deployment").is_valid(deployment)


def test_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    container = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split(":")[0] in {i["name"] for i in kustomization.get("images", [])}


@pytest.fixture(scope="module")
def k8s_settings(tmp_path_factory) -> Settings:
    configmap = _one("ConfigMap")
    (key,) = configmap["data"]
    path = tmp_path_factory.mktemp("k8s") / key
    path.write_text(configmap["data"][key])
    return load_settings(path)  # the settings the pods start with must be valid


def _container() -> dict[str, Any]:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def test_the_deployment_reads_its_config_from_the_configmap(k8s_settings):
    configmap, pod = _one("ConfigMap"), _one("Deployment")["spec"]["template"]["spec"]
    container = _container()
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    args = container["args"]
    assert args[0] == "run"
    (key,) = configmap["data"]
    assert args[args.index("--config") + 1] == f"{mount['mountPath']}/{key}"
    assert str(k8s_settings.model.cache_dir).startswith(
        tuple(m["mountPath"] for m in container["volumeMounts"] if m["name"] != volume["name"])
    ), "the model cache must be on a writable volume"


def test_secrets_come_from_a_secret_as_streamer_settings():
    env = _container()["env"]
    secret_vars = [e for e in env if "secretKeyRef" in e.get("valueFrom", {})]
    assert secret_vars
    for var in env:
        assert var["name"].startswith("STREAMER_")
        section, _, key = var["name"].removeprefix("STREAMER_").lower().partition("__")
        assert section in Settings.model_fields, var["name"]
        assert key in Settings.model_fields[section].annotation.model_fields, var["name"]
    assert "STREAMER_REDIS__URL" in {e["name"] for e in secret_vars}


def test_the_deployment_requests_a_gpu_and_probes_the_service_port(k8s_settings):
    container = _container()
    resources = container["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == k8s_settings.observe.http_port, probe
    assert k8s_settings.model.device == "cuda"


def test_the_grace_period_exceeds_the_shutdown_timeout(k8s_settings):
    grace = _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > k8s_settings.shutdown_timeout_s
    assert grace - k8s_settings.shutdown_timeout_s >= 5, "leave a margin for the final commit and flush"


def test_the_service_exposes_the_metrics_port_of_the_pods(k8s_settings):
    service, deployment = _one("Service"), _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    (port,) = service["spec"]["ports"]
    assert ports[port["targetPort"]] == k8s_settings.observe.http_port
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(k8s_settings.observe.http_port)


def test_the_scaled_object_scales_the_deployment_on_lag_within_the_partitions(k8s_settings):
    scaled, deployment = _one("ScaledObject"), _one("Deployment")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"

    annotations = scaled["metadata"]["annotations"]
    partitions = int(annotations["streamer/input-partitions"])
    low, high = scaled["spec"].get("minReplicaCount", 0), scaled["spec"]["maxReplicaCount"]
    assert 1 <= low <= high <= partitions, "a replica beyond the partition count gets no partition"

    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == k8s_settings.kafka.group_id
    assert meta["bootstrapServers"] == k8s_settings.kafka.bootstrap_servers
    assert meta["topic"] == annotations["streamer/input-topic"]
    assert meta["topic"] in {r.input for r in k8s_settings.routes}
    assert meta.get("allowIdleConsumers", "false") == "false"
    # Committed offsets trail a busy replica by up to max_queue in-flight events: a lower target
    # would scale up replicas that are merely working.
    assert int(meta["lagThreshold"]) > k8s_settings.batching.max_queue
