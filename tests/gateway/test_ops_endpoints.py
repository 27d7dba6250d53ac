"""Who may read /metrics and the detailed /ready: the metrics token, or the admin listener.

Real gateway processes (``tollway serve``) in front of one simulator: the
public listener refuses /metrics without the token and tells anyone else only
whether it is ready; the admin listener on loopback serves both without one;
the API docs can be turned off; a config with neither token nor admin listener
refuses /metrics outright; SIGTERM stops both listeners.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from gateway.config import ConfigError, parse_settings
from tests.conftest import gateway_config
from tests.support.metrics import METRICS_TOKEN, OPS_HEADERS, parse, value
from tests.support.procs import BIN, Proc, free_port, start_gateway, start_sim

Sims = tuple[Proc, Proc]  # the small tier's replica, the large tier's


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    log_dir = tmp_path_factory.mktemp("ops")
    small = start_sim(log_dir, ["sim-small"], "--zero-delay")
    large = start_sim(log_dir, ["sim-large"], "--zero-delay")
    yield small, large
    large.stop()
    small.stop()


def start(procs: list[Proc], log_dir: Path, sims: Sims, **ops: Any) -> Proc:
    small, large = sims
    gateway = start_gateway(log_dir, gateway_config([small.url], [large.url], ops=ops))
    procs.append(gateway)
    return gateway


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == code
    assert "tollway_" not in response.text


def test_metrics_need_the_token(procs: list[Proc], log_dir: Path, sims: Sims) -> None:
    gateway = start(procs, log_dir, sims, metrics_token=METRICS_TOKEN)
    url = gateway.url + "/metrics"
    assert_refused(httpx.get(url, timeout=10), "invalid_metrics_token")
    wrong = {"authorization": f"Bearer {METRICS_TOKEN}x"}
    assert_refused(httpx.get(url, headers=wrong, timeout=10), "invalid_metrics_token")
    api_key = {"authorization": "Bearer sk-test-acme-0001"}  # an API key is not the token
    assert_refused(httpx.get(url, headers=api_key, timeout=10), "invalid_metrics_token")
    basic = {"authorization": f"Basic {METRICS_TOKEN}"}
    assert_refused(httpx.get(url, headers=basic, timeout=10), "invalid_metrics_token")

    answer = httpx.get(url, headers=OPS_HEADERS, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert value(parse(answer.text), "tollway_replica_slots") > 0


def test_public_ready_says_only_ready_or_not(procs: list[Proc], log_dir: Path, sims: Sims) -> None:
    gateway = start(procs, log_dir, sims, metrics_token=METRICS_TOKEN)
    url = gateway.url + "/ready"
    minimal = httpx.get(url, timeout=10)
    assert minimal.status_code == 200
    assert minimal.json() == {"status": "ready"}
    wrong = httpx.get(url, headers={"authorization": "Bearer sk-test-acme-0001"}, timeout=10)
    assert wrong.json() == {"status": "ready"}
    detailed = httpx.get(url, headers=OPS_HEADERS, timeout=10).json()
    assert detailed["status"] == "ready"
    assert detailed["tiers"]["small"]["replicas"][0]["url"] == sims[0].url
    assert httpx.get(gateway.url + "/health", timeout=10).json() == {"status": "ok"}


def test_not_ready_tells_nothing_else(procs: list[Proc], log_dir: Path, sims: Sims) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = gateway_config([sims[0].url], [dead], ops={"metrics_token": METRICS_TOKEN})
    gateway = start_gateway(log_dir, config)
    procs.append(gateway)
    minimal = httpx.get(gateway.url + "/ready", timeout=10)
    assert minimal.status_code == 503
    assert minimal.json() == {"status": "not_ready"}
    detailed = httpx.get(gateway.url + "/ready", headers=OPS_HEADERS, timeout=10)
    assert detailed.status_code == 503
    assert detailed.json()["tiers"]["large"]["replicas"][0]["url"] == dead


def test_admin_listener_serves_the_figures_without_a_token(
    procs: list[Proc], log_dir: Path, sims: Sims
) -> None:
    port = free_port()
    gateway = start(procs, log_dir, sims, admin_listen={"host": "127.0.0.1", "port": port})
    admin = f"http://127.0.0.1:{port}"
    metrics = httpx.get(admin + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert value(parse(metrics.text), "tollway_replica_slots") > 0
    detailed = httpx.get(admin + "/ready", timeout=10).json()
    assert detailed["tiers"]["large"]["replicas"][0]["url"] == sims[1].url
    assert httpx.get(admin + "/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(admin + "/v1/models", timeout=10).status_code == 404  # no API there
    assert httpx.get(admin + "/openapi.json", timeout=10).status_code == 404

    # No token configured: the public listener refuses /metrics, whatever is sent.
    assert_refused(httpx.get(gateway.url + "/metrics", timeout=10), "metrics_token_required")
    assert_refused(
        httpx.get(gateway.url + "/metrics", headers=OPS_HEADERS, timeout=10),
        "metrics_token_required",
    )
    assert httpx.get(gateway.url + "/ready", timeout=10).json() == {"status": "ready"}

    # One SIGTERM stops both listeners.
    gateway.popen.send_signal(signal.SIGTERM)
    assert gateway.popen.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(admin + "/health", timeout=2)


def test_by_default_metrics_are_refused(procs: list[Proc], log_dir: Path, sims: Sims) -> None:
    config = gateway_config([sims[0].url], [sims[1].url])
    del config["ops"]  # neither a token nor an admin listener
    gateway = start_gateway(log_dir, config)
    procs.append(gateway)
    assert_refused(httpx.get(gateway.url + "/metrics", timeout=10), "metrics_token_required")
    assert httpx.get(gateway.url + "/ready", timeout=10).json() == {"status": "ready"}


def test_metrics_public_is_an_explicit_choice(procs: list[Proc], log_dir: Path, sims: Sims) -> None:
    gateway = start(procs, log_dir, sims, metrics_public=True)
    assert httpx.get(gateway.url + "/metrics", timeout=10).status_code == 200
    assert "tiers" in httpx.get(gateway.url + "/ready", timeout=10).json()


def test_api_docs_can_be_turned_off(procs: list[Proc], log_dir: Path, sims: Sims) -> None:
    on = start(procs, log_dir, sims, metrics_token=METRICS_TOKEN)
    assert httpx.get(on.url + "/openapi.json", timeout=10).status_code == 200
    assert httpx.get(on.url + "/docs", timeout=10).status_code == 200
    off = start(procs, log_dir, sims, metrics_token=METRICS_TOKEN, docs=False)
    for path in ("/openapi.json", "/docs", "/redoc"):
        response = httpx.get(off.url + path, timeout=10)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert httpx.get(off.url + "/health", timeout=10).status_code == 200


def test_config_token_from_env_and_not_printed(tmp_path: Path) -> None:
    config = gateway_config(["http://127.0.0.1:9"], ["http://127.0.0.1:10"])
    del config["ops"]
    settings = parse_settings(config, "x.yaml", env={"TOLLWAY_METRICS_TOKEN": METRICS_TOKEN})
    assert settings.ops.metrics_token == METRICS_TOKEN
    assert settings.ops.admin_listen is None
    assert settings.ops.docs
    assert METRICS_TOKEN not in repr(settings)

    path = tmp_path / "tollway.yaml"
    path.write_text(yaml.safe_dump(config | {"ops": {"metrics_token": METRICS_TOKEN}}))
    shown = subprocess.run(
        [str(BIN / "tollway"), "check-config", str(path)], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert METRICS_TOKEN not in shown.stdout


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ({"metrics_token": "short"}, "ops.metrics_token"),
        ({"metrics_token": METRICS_TOKEN, "metrics_public": True}, "metrics_public"),
        ({"admin_listen": {"host": "127.0.0.1", "port": 0}}, "ops.admin_listen.port"),
        ({"metrics_tokn": METRICS_TOKEN}, "ops.metrics_tokn"),
    ],
)
def test_config_mistakes_fail_at_start(ops: dict[str, Any], message: str) -> None:
    config = gateway_config(["http://127.0.0.1:9"], ["http://127.0.0.1:10"], ops=ops)
    with pytest.raises(ConfigError, match=message):
        parse_settings(config, "x.yaml", env={})
