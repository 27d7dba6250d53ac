"""bench/cachehit: cache-hit throughput and latency of the gateway on one core."""
