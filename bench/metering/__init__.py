"""bench/metering: what metering (Prometheus, spans, the Redis ledger) costs the gateway."""
