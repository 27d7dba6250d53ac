"""End to end against real vLLM on CPU (SmolLM2-135M) through the gateway, with the openai SDK.

One vLLM process serves both tiers under two aliases, as in deploy/local.
Output text differs between runs, so assertions are on structure,
finish_reason and usage, never on exact text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import KEY, OTHER_KEY, detailed_ready, gateway_config, with_ledger
from tests.support.postgres_server import PostgresServer
from tests.support.procs import Proc, free_port, start_gateway
from tests.support.redis_server import run_redis
from tests.support.vllm import run_vllm
from tests.support.watch import VllmWatcher

pytestmark = pytest.mark.vllm

TENANT = "vllm-e2e"  # OTHER_KEY's tenant here
MESSAGES: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def vllm_stack(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[tuple[Proc, str]]:
    """The gateway (its ledger in the suite's PostgreSQL), and the vLLM URL behind it."""
    log_dir = tmp_path_factory.mktemp("vllm")
    with (
        run_redis() as redis_server,
        run_vllm(
            free_port(),
            aliases=["smollm2-small", "smollm2-large"],
            max_num_seqs=4,
            log_path=log_dir / "vllm.log",
        ) as vllm_url,
    ):
        config = gateway_config([vllm_url], [vllm_url], redis_server.url)
        config["tiers"][0]["models"] = ["smollm2-small"]
        config["tiers"][1]["models"] = ["smollm2-large"]
        for tier in config["tiers"]:  # one process serves both tiers: one set of settings
            tier["replicas"][0].update(max_num_seqs=4, gpu_hourly_usd=1.0)
        config["upstream"] = {"first_byte_timeout_s": 120, "total_timeout_s": 300}
        config["scheduling"] = {"deadline_ms": 240_000}  # CPU vLLM is slow: queue, never shed
        config = with_ledger(config, postgres, log_dir / "spool")
        config["auth"]["keys"][1]["tenant"] = TENANT  # its own sums in the shared ledger
        gateway = start_gateway(log_dir, config)
        try:
            yield gateway, vllm_url
        finally:
            gateway.stop()


@pytest.fixture
def vllm_gateway(vllm_stack: tuple[Proc, str]) -> Proc:
    return vllm_stack[0]


@pytest.fixture
def vllm_url(vllm_stack: tuple[Proc, str]) -> str:
    return vllm_stack[1]


@pytest.fixture
def client(vllm_gateway: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_gateway.url + "/v1", api_key=KEY, max_retries=0)


def test_chat(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-small", messages=MESSAGES, max_tokens=16, temperature=0
    )
    completion = raw.parse()
    assert completion.model == "smollm2-small"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 16
    assert completion.usage.prompt_tokens > 5  # the chat template wraps the message
    assert raw.headers["x-tollway-tier"] == "small"


def test_completions_on_the_large_alias(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="smollm2-large", prompt="The three primary colours are", max_tokens=12
    )
    # vLLM answers with its first alias (smollm2-small); the gateway restores the name asked for.
    assert completion.model == "smollm2-large"
    assert completion.choices[0].text
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 12


def test_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="auto",
        messages=MESSAGES,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(content) >= 2
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    # A token can decode to an empty delta (part of a UTF-8 character), never to two chunks.
    assert len(content) <= usage.completion_tokens <= 16


def test_unknown_model_never_reaches_vllm(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="llama-70b", messages=MESSAGES)


def test_vllm_rejection_is_relayed_as_400(client: openai.OpenAI) -> None:
    too_long = [{"role": "user", "content": "word " * 3000}]  # over --max-model-len 2048
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2-small", messages=too_long, max_tokens=8)
    assert err.value.status_code == 400
    assert err.value.body is not None


async def test_eight_concurrent_requests_queue_in_the_gateway_not_in_vllm(
    vllm_gateway: Proc, vllm_url: str
) -> None:
    """vLLM runs --max-num-seqs 4: 4 run, 4 wait in the gateway, vLLM's own queue stays empty."""
    client = openai.AsyncOpenAI(base_url=vllm_gateway.url + "/v1", api_key=KEY, max_retries=0)
    with VllmWatcher(vllm_url, every_s=0.05, gateway=vllm_gateway.url) as watcher:
        async with client:
            results = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="smollm2-small" if i % 2 else "smollm2-large",
                        messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
                        max_tokens=24,
                    )
                    for i in range(8)
                )
            )
    assert watcher.samples > 5
    assert watcher.max_waiting == 0  # vLLM's num_requests_waiting never left 0
    assert watcher.max_running == 4  # its batch was full
    assert watcher.max_queued >= 1  # the rest waited in the gateway
    assert len(results) == 8
    for result in results:
        assert result.choices[0].finish_reason in ("stop", "length")
        assert result.usage is not None
        assert result.usage.completion_tokens > 0


def _occupancy(gateway: Proc) -> dict[str, float]:
    ready = detailed_ready(gateway)
    occupancy: dict[str, float] = ready["tiers"]["small"]["replicas"][0]["occupancy"]
    return occupancy


def _usage_total(gateway: Proc) -> dict[str, Any]:
    """The usage of TENANT, which only the metering test uses (no other test's records,
    still on their way to the ledger, can land in its window)."""
    response = httpx.get(
        gateway.url + "/v1/usage",
        params={"tenant": TENANT},
        headers={"authorization": f"Bearer {OTHER_KEY}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["total"]
    return result


async def test_metering_eight_concurrent_on_real_vllm(vllm_gateway: Proc) -> None:
    """Headers present and consistent, GPU-seconds conserved, usage API = sum of headers."""
    usage_before = _usage_total(vllm_gateway)
    before = _occupancy(vllm_gateway)
    client = openai.AsyncOpenAI(base_url=vllm_gateway.url + "/v1", api_key=OTHER_KEY, max_retries=0)
    async with client:
        raws = await asyncio.gather(
            *(
                client.chat.completions.with_raw_response.create(
                    model="smollm2-small",
                    messages=[{"role": "user", "content": f"Name a colour, take {i}."}],
                    max_tokens=16,
                )
                for i in range(8)
            )
        )
    after = _occupancy(vllm_gateway)
    cost = Decimal(0)
    for raw in raws:
        completion = raw.parse()
        assert completion.usage is not None
        headers = raw.headers
        assert int(headers["x-tollway-prompt-tokens"]) == completion.usage.prompt_tokens
        assert int(headers["x-tollway-completion-tokens"]) == completion.usage.completion_tokens
        gpu_seconds = Decimal(headers["x-tollway-gpu-seconds"])
        assert gpu_seconds > 0
        marginal = Decimal(headers["x-tollway-cost-usd"])
        assert abs(marginal - gpu_seconds / 3600) <= Decimal("1e-9")  # $1/GPU-hour here
        assert Decimal(headers["x-tollway-cost-loaded-usd"]) >= marginal
        cost += marginal
    header_gpu = sum(float(r.headers["x-tollway-gpu-seconds"]) for r in raws)
    attributed = after["attributed_gpu_s"] - before["attributed_gpu_s"]
    assert abs(header_gpu - attributed) <= 8 * 5e-7
    wall = after["wall_s"] - before["wall_s"]
    spent = sum(after[k] - before[k] for k in ("attributed_gpu_s", "foreign_gpu_s", "idle_gpu_s"))
    assert abs(spent - wall * after["gpus"]) <= 1e-9 * max(wall, 1.0)
    assert attributed <= wall * after["gpus"] + 1e-6  # shared, not double-counted

    deadline = time.monotonic() + 10
    while (usage := _usage_total(vllm_gateway))["requests"] < usage_before["requests"] + 8:
        assert time.monotonic() < deadline, "the ledger did not record the requests"
        await asyncio.sleep(0.1)
    assert usage["requests"] - usage_before["requests"] == 8
    assert Decimal(usage["cost_usd"]) - Decimal(usage_before["cost_usd"]) == cost


def test_gateway_log_has_no_errors(vllm_gateway: Proc) -> None:
    log = Path(vllm_gateway.log).read_text()
    assert "Traceback" not in log
    assert "ERROR" not in log
