"""The simulator's pure parts: tokenizer, output plans, histograms, faults, config."""

from __future__ import annotations

import pydantic
import pytest

from sim.config import SimConfig
from sim.faults import Fault, FaultInjector, FaultSettings
from sim.kvcache import KVCache, block_hashes
from sim.metrics import EngineMetrics, Histogram, render
from sim.protocol import error_type
from sim.textgen import TextGenerator, count_tokens, render_chat, request_key, tokenize


def test_tokenizer() -> None:
    assert tokenize("Hello, world!") == ["Hell", "o", ",", " worl", "d", "!"]
    assert count_tokens("") == 0
    assert count_tokens("a b  c   ") == 3  # trailing whitespace is free
    assert count_tokens("x" * 40) == 10


def test_chat_template_overhead() -> None:
    one = [{"role": "user", "content": "hi"}]
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert len(render_chat(one)) == 4 + 1 + 3
    assert len(render_chat(two)) == 4 + count_tokens("Be brief.") + 4 + 1 + 3
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]
    assert len(render_chat(parts)) == 4 + 1 + 1 + 3


def test_every_output_token_counts_as_one_token() -> None:
    gen = TextGenerator(seed=0, min_tokens=1, max_tokens=300)
    for i in range(200):
        plan = gen.plan(request_key(["m", f"prompt {i}", {}]), 0, room=10_000, max_tokens=None)
        text = "".join(plan.tokens)
        assert count_tokens(text) == len(plan.tokens)
        assert text == text.lstrip()
        assert text[0] not in ".,"
        assert plan.finish_reason == "stop"


def test_plans_are_deterministic_and_truncate_to_a_prefix() -> None:
    gen = TextGenerator(seed=0, min_tokens=20, max_tokens=40)
    key = request_key(["m", "hello", {"temperature": 0.2}])
    full = gen.plan(key, 0, room=1000, max_tokens=None)
    assert gen.plan(key, 0, room=1000, max_tokens=None) == full
    assert (
        TextGenerator(seed=0, min_tokens=20, max_tokens=40).plan(key, 0, room=1000, max_tokens=None)
        == full
    )
    short = gen.plan(key, 0, room=1000, max_tokens=5)
    assert short.tokens == full.tokens[:5]
    assert short.finish_reason == "length"
    assert gen.plan(key, 1, room=1000, max_tokens=None).tokens != full.tokens  # another choice
    assert gen.plan(key, 0, room=3, max_tokens=None) == gen.plan(key, 0, room=3, max_tokens=50)
    assert len(gen.plan(key, 0, room=1000, max_tokens=300, ignore_eos=True).tokens) == 300
    assert len(gen.plan(key, 0, room=1000, max_tokens=None, min_tokens=45).tokens) == 45
    # Longer than the corpus: wraps around rather than failing.
    assert len(gen.plan(key, 0, room=100_000, max_tokens=40_000, ignore_eos=True).tokens) == 40_000


def test_histogram_buckets_are_inclusive() -> None:
    hist = Histogram((0.1, 0.3, 1.0))
    for value in (0.1, 0.3, 0.31, 5.0):
        hist.observe(value)
    assert hist.counts == [1, 1, 1, 1]
    assert hist.count == 4
    assert hist.sum == pytest.approx(5.71)


def test_render_escapes_the_model_name() -> None:
    text = render(
        EngineMetrics(), model_name='we"ird\\name', running=1, waiting=0, kv_cache_usage=0.5
    )
    assert 'vllm:num_requests_running{engine="0",model_name="we\\"ird\\\\name"} 1.0' in text
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="we\\"ird\\\\name"} 0.5' in text


def test_kv_cache_blocks_and_prefix_matches() -> None:
    kv = KVCache(total_blocks=10, block_size=4)
    assert kv.blocks_for(3) == 1  # 3 tokens + the one being decoded
    assert kv.blocks_for(4) == 2
    held = kv.resize(0, 20)
    assert (held, kv.used_blocks, kv.usage) == (6, 6, 0.6)
    assert kv.fits(15)
    assert not kv.fits(16)
    kv.release(held)
    assert kv.used_blocks == 0

    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2  # the partial tail block is never cached
    assert kv.match_prefix(hashes, 10) == 0
    assert kv.match_prefix(hashes, 10) == 8
    assert kv.match_prefix(block_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4), 8) == 4
    assert kv.match_prefix(block_hashes([0, 1, 2, 3], 4), 4) == 3  # one token is computed


def test_fault_rates_of_one_and_zero_are_exact() -> None:
    always = FaultInjector(FaultSettings(error_rate=1.0), seed=0)
    assert {always.decide() for _ in range(1000)} == {Fault.ERROR}
    never = FaultInjector(FaultSettings(error_rate=0.0, hang_rate=0.0), seed=0)
    assert {never.decide() for _ in range(1000)} == {Fault.NONE}
    hang = FaultInjector(FaultSettings(hang_rate=1.0, die_mid_stream_rate=1.0), seed=0)
    assert hang.decide() is Fault.HANG  # checked before die-mid-stream
    assert hang.update({"hang_rate": 0.0}).die_mid_stream_rate == 1.0
    assert hang.decide() is Fault.DIE
    assert hang.clear() == FaultSettings()
    with pytest.raises(pydantic.ValidationError):
        hang.update({"hang_rate": -0.1})


def test_error_type_names() -> None:
    assert error_type(400) == "BadRequestError"
    assert error_type(404) == "NotFoundError"
    assert error_type(500) == "InternalServerError"
    assert error_type(503) == "ServiceUnavailableError"


def test_config_rejects_inconsistent_settings() -> None:
    with pytest.raises(pydantic.ValidationError):
        SimConfig(max_model_len=4096, kv_cache_tokens=1024)
    with pytest.raises(pydantic.ValidationError):
        SimConfig(served_model_names=["a", "a"])
    with pytest.raises(pydantic.ValidationError):
        SimConfig(served_model_names=[])
    with pytest.raises(pydantic.ValidationError):
        SimConfig(unknown_setting=1)  # type: ignore[call-arg]
    assert not SimConfig().zero_delay
    assert SimConfig(
        prefill_tokens_per_s=float("inf"), decode_base_ms=0, decode_per_seq_ms=0
    ).zero_delay
