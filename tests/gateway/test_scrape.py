"""Parsing vLLM's /metrics for the three load gauges the gateway uses."""

from __future__ import annotations

from gateway.scrape import VllmLoad, parse_vllm_load

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2-small"} 4.0
vllm:num_requests_running{engine="1",model_name="smollm2-small"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2-small"} 4.0
vllm:num_requests_waiting{engine="1",model_name="smollm2-small"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2-small"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="smollm2-small"} 0.25
vllm:prompt_tokens_total{engine="0",model_name="smollm2-small"} 1234.0
process_cpu_seconds_total 12.5
"""


def test_sums_over_engines() -> None:
    assert parse_vllm_load(VLLM_TEXT) == VllmLoad(running=7, waiting=4, kv_cache_usage=0.375)


def test_unlabelled_series() -> None:
    text = "vllm:num_requests_running 2\nvllm:num_requests_waiting 1\n"
    assert parse_vllm_load(text) == VllmLoad(2, 1, 0.0)


def test_no_vllm_metrics() -> None:
    assert parse_vllm_load("process_cpu_seconds_total 1.0\n") is None
    assert parse_vllm_load('vllm:num_requests_running{engine="0"} NaNx\n') is None
