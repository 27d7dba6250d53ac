"""Config loading: strict fields, env interpolation and overrides, check-config CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
TOLLWAY = str(Path(sys.executable).parent / "tollway")


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "auth": {"keys": [{"key": "sk-abcdefgh", "tenant": "t1"}]},
        "tiers": [{"name": "small", "models": ["m1"], "replicas": [{"url": "http://127.0.0.1:9"}]}],
    }
    raw.update(extra)
    return raw


def test_defaults_fill_in() -> None:
    settings = parse_settings(minimal(), "x.yaml", env={})
    assert settings.listen.port == 8080
    assert settings.routing.aliases == ["auto"]
    replica = settings.tiers[0].replicas[0]
    assert (replica.max_num_seqs, replica.gpus, replica.gpu_hourly_usd) == (256, 1.0, 0.0)


def test_unknown_field_names_its_path() -> None:
    raw = minimal()
    raw["tiers"][0]["replicas"][0]["max_num_seq"] = 4
    with pytest.raises(ConfigError) as err:
        parse_settings(raw, "x.yaml", env={})
    assert (
        str(err.value) == "x.yaml: tiers.0.replicas.0.max_num_seq: Extra inputs are not permitted"
    )


def test_bad_value_names_its_path() -> None:
    raw = minimal()
    raw["tiers"][0]["replicas"][0]["gpu_hourly_usd"] = -1
    with pytest.raises(ConfigError, match=r"tiers\.0\.replicas\.0\.gpu_hourly_usd: .*greater"):
        parse_settings(raw, "x.yaml", env={})


def test_env_interpolation_and_defaults() -> None:
    raw = minimal()
    raw["tiers"][0]["replicas"][0]["url"] = "${SMALL_URL}"
    raw["redis"] = {"url": "${REDIS:-redis://127.0.0.1:7000/1}"}
    settings = parse_settings(raw, "x.yaml", env={"SMALL_URL": "http://127.0.0.1:8123"})
    assert settings.tiers[0].replicas[0].url == "http://127.0.0.1:8123"
    assert settings.redis.url == "redis://127.0.0.1:7000/1"


def test_missing_env_var_is_an_error_with_its_place() -> None:
    raw = minimal()
    raw["tiers"][0]["replicas"][0]["url"] = "${NOPE_URL}"
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.replicas\[0\]\.url: .*NOPE_URL"):
        parse_settings(raw, "x.yaml", env={})


def test_env_overrides_replace_fields() -> None:
    env = {"TOLLWAY_REDIS_URL": "redis://127.0.0.1:6390/2", "TOLLWAY_PORT": "9090"}
    settings = parse_settings(minimal(), "x.yaml", env=env)
    assert settings.redis.url == "redis://127.0.0.1:6390/2"
    assert settings.listen.port == 9090


def test_key_from_env() -> None:
    raw = minimal(auth={"keys": [{"key": "${DEMO_KEY}", "tenant": "t"}]})
    settings = parse_settings(raw, "x.yaml", env={"DEMO_KEY": "sk-from-env-1"})
    assert settings.auth.keys[0].key == "sk-from-env-1"
    with pytest.raises(ConfigError, match=r"auth\.keys\[0\]\.key: .*DEMO_KEY"):
        parse_settings(raw, "x.yaml", env={})


def test_model_served_by_two_tiers_is_rejected() -> None:
    raw = minimal()
    raw["tiers"].append(
        {"name": "large", "models": ["m1"], "replicas": [{"url": "http://127.0.0.1:10"}]}
    )
    with pytest.raises(ConfigError, match="duplicate model name"):
        parse_settings(raw, "x.yaml", env={})


def test_shared_replica_must_agree_across_tiers() -> None:
    raw = minimal()
    raw["tiers"].append(
        {
            "name": "large",
            "models": ["m2"],
            "replicas": [{"url": "http://127.0.0.1:9", "max_num_seqs": 8}],
        }
    )
    with pytest.raises(ConfigError, match="different settings"):
        parse_settings(raw, "x.yaml", env={})


def test_default_tier_must_exist() -> None:
    with pytest.raises(ConfigError, match="default_tier 'huge'"):
        parse_settings(minimal(routing={"default_tier": "huge"}), "x.yaml", env={})


@pytest.mark.parametrize(
    ("section", "value", "named"),
    [
        ("budgets", {"t1": {"daily_usd": 5}}, "budgets"),
        ("routing", {"burn_target_usd_per_hour": 2}, "routing.burn_target_usd_per_hour"),
        ("routing", {"tenant_burn_targets": {"t1": 1}}, "routing.tenant_burn_targets"),
    ],
)
def test_what_reads_metering_is_refused_with_metering_off(
    section: str, value: dict[str, Any], named: str
) -> None:
    raw = minimal(**{section: value})
    parse_settings(raw, "x.yaml", env={})  # fine with metering on
    raw["metering"] = {"enabled": False}
    with pytest.raises(ConfigError, match=rf"{named} need metering: metering.enabled is false"):
        parse_settings(raw, "x.yaml", env={})


def test_shipped_local_config_is_valid() -> None:
    settings = load_settings(
        ROOT / "deploy/local/tollway.yaml", env={"TOLLWAY_API_KEY": "sk-x-12345678"}
    )
    assert [t.name for t in settings.tiers] == ["small", "large"]


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOLLWAY, "check-config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_check_config_prints_resolved_config(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    result = run_check(path)
    assert result.returncode == 0, result.stderr
    assert '"max_num_seqs": 256' in result.stdout
    assert "sk-abcdefgh" not in result.stdout  # secrets are redacted


def test_check_config_reports_first_error_and_fails(tmp_path: Path) -> None:
    raw = minimal()
    raw["listen"] = {"port": 70000}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_check(path)
    assert result.returncode == 1
    assert f"{path}: listen.port:" in result.stderr
    assert result.stdout == ""


def test_check_config_rejects_broken_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("tiers: [\n")
    result = run_check(path)
    assert result.returncode == 1
    assert "not valid YAML" in result.stderr
