"""The gateway against a local 3-node Redis Cluster: cache, coalescing, idempotency, spend,
budget holds and rate limits."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import openai
import pytest
from redis.cluster import RedisCluster

from cache.spend import SpendCounters, hold_keys
from tests.conftest import FAST_SIM, KEY, gateway_config, with_ledger
from tests.support.postgres_server import PostgresServer
from tests.support.procs import start_gateway, start_sim
from tests.support.redis_server import run_redis


def test_gateway_on_a_redis_cluster(
    log_dir: Path, postgres: PostgresServer, tmp_path: Path
) -> None:
    with run_redis(cluster=True) as cluster:
        sims = [start_sim(log_dir, [name], *FAST_SIM) for name in ("sim-small", "sim-large")]
        config = gateway_config([sims[0].url], [sims[1].url], cluster.url)
        config = with_ledger(config, postgres, tmp_path / "spool")
        config["auth"]["keys"][0]["tenant"] = "cluster-acme"  # its own usage sums
        config["redis"]["cluster"] = True
        config["cache"] = {"local_ttl_s": 0}  # every hit must come from the cluster
        # Admission too: the requests that run (6 misses, 1 completion) take the minute's 7.
        config["budgets"] = {"cluster-acme": {"daily_usd": 1000}}
        config["rate_limits"] = {"cluster-acme": {"requests_per_minute": 7}}
        gateway = start_gateway(log_dir, config)
        try:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
            statuses = []
            for content in (f"cluster {uuid.uuid4()}" for _ in range(6)):  # keys on many slots
                for _ in range(2):
                    raw = client.chat.completions.with_raw_response.create(
                        model="sim-small", max_tokens=4, temperature=0,
                        messages=[{"role": "user", "content": content}],
                    )  # fmt: skip
                    statuses.append(raw.headers["x-tollway-cache"])
            # A repeat hits the cluster, or, if it overtook the background write,
            # waits on the leader's flight lock there: both answers come from Redis.
            assert statuses[0::2] == ["miss"] * 6
            assert set(statuses[1::2]) <= {"hit", "coalesced"}

            key = {"idempotency-key": f"cluster-{uuid.uuid4()}"}
            first = client.completions.with_raw_response.create(
                model="sim-large", prompt="x", max_tokens=3, extra_headers=key
            )
            again = client.completions.with_raw_response.create(
                model="sim-large", prompt="x", max_tokens=3, extra_headers=key
            )
            assert "idempotent-replayed" not in first.headers
            assert again.headers["idempotent-replayed"] == "true"
            assert again.parse().choices[0].text == first.parse().choices[0].text
            assert first.headers["x-ratelimit-remaining-requests"] == "0"
            assert float(first.headers["x-tollway-budget-remaining-usd"]) > 999
            with pytest.raises(openai.RateLimitError) as refused:
                client.completions.create(model="sim-large", prompt="one more", max_tokens=3)
            assert refused.value.code == "rate_limit_exceeded"
            holds, _ = hold_keys(SpendCounters.PREFIX, "cluster-acme")
            with RedisCluster.from_url(cluster.url) as check:
                deadline = time.monotonic() + 5
                while check.zcard(holds):  # let go by the flush, on the tenant's node
                    assert time.monotonic() < deadline, "holds left after settlement"
                    time.sleep(0.1)

            deadline = time.monotonic() + 10
            while True:
                usage = client.get("/usage", cast_to=object)  # the usage API, same key
                assert isinstance(usage, dict)
                if usage["total"]["requests"] >= 14:
                    break
                assert time.monotonic() < deadline, f"ledger incomplete: {usage['total']}"
                time.sleep(0.1)
        finally:
            gateway.stop()
            for sim in sims:
                sim.stop()
