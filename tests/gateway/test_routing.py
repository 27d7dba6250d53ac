"""Complexity routing through the gateway: `auto` goes where the score says, and says why."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import openai
import yaml

from tests.conftest import FAST_SIM, HARD, KEY, gateway_config
from tests.support.metrics import metrics_text
from tests.support.procs import start_gateway, start_sim

ROOT = Path(__file__).resolve().parents[2]


def test_auto_is_routed_by_complexity(log_dir: Path) -> None:
    sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
    config = gateway_config([sims[0].url], [sims[1].url])
    config["routing"]["cut_points"] = [0.3]
    gateway = start_gateway(log_dir, config)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        easy = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hi there!"}], max_tokens=4
        )
        hard = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": HARD}], max_tokens=4
        )
        assert easy.headers["x-tollway-tier"] == "small"
        assert hard.headers["x-tollway-tier"] == "large"
        assert hard.parse().model == "sim-large"
        assert float(easy.headers["x-tollway-route-score"]) < 0.3
        assert float(hard.headers["x-tollway-route-score"]) >= 0.3
        assert "code=" in hard.headers["x-tollway-route-reason"]
        concrete = client.chat.completions.with_raw_response.create(
            model="sim-small", messages=[{"role": "user", "content": HARD}], max_tokens=4
        )
        assert concrete.headers["x-tollway-tier"] == "small"  # a concrete name is not routed
        assert "x-tollway-route-score" not in concrete.headers
    finally:
        gateway.stop()
        for sim in sims:
            sim.stop()


def test_calibrate_cli_writes_the_cut_point(tmp_path: Path) -> None:
    config = tmp_path / "tollway.yaml"
    shutil.copy(ROOT / "deploy/local/tollway.yaml", config)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tollway"), "router", "calibrate", "--config",
         str(config), "--prompts", str(ROOT / "bench/routing/prompts.jsonl"),
         "--large-share", "0.3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cut = yaml.safe_load(config.read_text())["routing"]["cut_points"]
    assert len(cut) == 1
    assert 0 < cut[0] < 1
    assert "${TOLLWAY_API_KEY:-sk-tollway-local-demo}" in config.read_text()  # comments/env kept


def test_burn_rate_over_target_shifts_traffic_to_the_cheap_tier(log_dir: Path) -> None:
    sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
    config = gateway_config([sims[0].url], [sims[1].url])
    config["routing"].update(cut_points=[0.3], burn_target_usd_per_hour=1e-6, max_shift=1.0)
    gateway = start_gateway(log_dir, config)
    try:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)

        def hard() -> dict[str, str]:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": HARD}], max_tokens=4
            )
            return dict(raw.headers)

        first = hard()  # nothing spent yet: the score decides alone
        assert first["x-tollway-tier"] == "large"
        assert "x-tollway-route-shift" not in first
        later = hard()  # the first request's cost put the burn rate far over target
        assert later["x-tollway-tier"] == "small"
        assert float(later["x-tollway-route-shift"]) > 0.5
        metrics = metrics_text(gateway.url)
        burn = [line for line in metrics.splitlines()
                if line.startswith('tollway_burn_rate_usd_per_hour{scope="gateway"}')]  # fmt: skip
        assert float(burn[0].split()[-1]) > 1e-6
    finally:
        gateway.stop()
        for sim in sims:
            sim.stop()
