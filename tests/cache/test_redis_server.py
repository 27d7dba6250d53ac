"""The test helper itself: a server that stops and comes back, and a three-node cluster."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster

from tests.support.redis_server import run_redis


def test_stop_and_start_on_the_same_port() -> None:
    with run_redis() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
            server.stop()
            with pytest.raises(redis.ConnectionError):
                client.get("k")
            server.start()
            assert client.get("k") is None  # nothing is saved
    assert not server.running


def test_a_three_node_cluster_survives_a_restart() -> None:
    with run_redis(cluster=True) as server:
        assert len(server.ports) == 3
        keys = [f"key-{i}" for i in range(30)]
        with RedisCluster.from_url(server.url) as cluster:
            for key in keys:
                cluster.set(key, key)
            assert len({cluster.keyslot(key) for key in keys}) > 1
            nodes = {cluster.get_node_from_key(key).port for key in keys}
            assert nodes == set(server.ports)
        server.stop()
        server.start()
        with RedisCluster.from_url(server.url) as cluster:
            cluster.set("after", "restart")
            assert cluster.get("after") == b"restart"
