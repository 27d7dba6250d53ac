"""Ledger rows equal the requests served, field by field, as the client saw them.

A real gateway process (its ledger in the suite's PostgreSQL, its cache and
idempotency in this module's Redis) in front of two simulator replicas, asked
with the ``openai`` SDK. For each kind of request the test reads what the
client got (the ``x-tollway-*`` headers, or a stream's final ``tollway``
object), waits for the request's row in ``usage_requests`` (polling SQL with a
deadline) and compares every column with it: who (tenant, key id), where
(tier, model, replica, endpoint, route score, fallback), how it ended (status,
error type, cache status, attempts), what it used and cost (tokens, GPU
micro-seconds against the six-decimal header, nano-dollars against the
nine-decimal ones, saved), and when (finished within the client's call,
duration and time to first token no longer than the client waited).

Kinds: a non-streamed answer (chat and text completion), one routed by score,
one served by a fallback tier, a stream (the figures of its final ``tollway``
object), a cache hit, an idempotent replay, an upstream failure (a 502 row
with its error type), and requests refused before routing (401, 400, 404),
which have no row at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from tests.conftest import FAST_SIM, KEY, OTHER_KEY, gateway_config, set_faults, with_ledger
from tests.support.postgres_server import PostgresServer
from tests.support.procs import Proc, start_gateway, start_sim
from tests.support.redis_server import run_redis

TENANTS = {KEY: "acme", OTHER_KEY: "globex"}  # tests/conftest.py gateway_config
ROW_WAIT_S = 15.0


def key_id(key: str) -> str:
    """A config key's ledger id: the first 12 hex digits of its SHA-256 (gateway/auth.py)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class Ledgered:
    gateway: Proc
    small: Proc
    large: Proc
    postgres: PostgresServer

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.gateway.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def ledgered(
    log_dir: Path, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ledgered]:
    """Tiers ``small`` and ``large`` (one replica each) and ``gone`` (its one replica never
    answers, so it falls back to ``large``); the alias ``auto`` is routed by score."""
    with run_redis() as redis:
        procs: list[Proc] = []
        try:
            small = start_sim(log_dir, ["sim-small"], "--max-num-seqs", "4", *FAST_SIM)
            procs.append(small)
            large = start_sim(log_dir, ["sim-large"], *FAST_SIM)
            procs.append(large)
            config = gateway_config([small.url], [large.url], redis.url)
            config["tiers"].append(
                {
                    "name": "gone",
                    "models": ["sim-gone"],
                    "replicas": [{"url": "http://127.0.0.1:1"}],  # nothing listens there
                    "fallback": ["large"],
                }
            )
            config["routing"]["cut_points"] = [0.3, 1.0]  # auto: small or large, never gone
            config = with_ledger(config, postgres, tmp_path_factory.mktemp("spool"))
            config["ledger"]["write_interval_s"] = 0.2  # rows in the database sooner
            gateway = start_gateway(log_dir, config)
            procs.append(gateway)
            yield Ledgered(gateway, small, large, postgres)
        finally:
            for proc in reversed(procs):
                proc.stop()


# -- what the client saw -------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One answer's figures as the client read them, and when it asked."""

    request_id: str
    status: int
    tier: str
    model: str
    cache: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    gpu_us: int
    cost_nanos: int
    cost_loaded_nanos: int
    saved_nanos: int | None  # None: not a free answer (no saved figure was shown)
    route_score: str | None  # x-tollway-route-score, 4 decimals
    fallback_from: str | None
    began: float = 0.0  # wall clock, before the call
    ended: float = 0.0  # wall clock, after the last byte
    waited_s: float = 0.0  # monotonic, the whole call


def units(text: str, decimals: int) -> int:
    """A fixed-point header (``decimals`` places, as the gateway prints it) in whole units."""
    whole, point, frac = text.partition(".")
    assert point, text
    assert len(frac) == decimals, text
    assert (whole + frac).isdigit(), text
    return int(whole + frac)


def seen_in_headers(headers: Any, status: int) -> Seen:
    saved = headers.get("x-tollway-cost-saved-usd")
    return Seen(
        request_id=headers["x-tollway-request-id"],
        status=status,
        tier=headers["x-tollway-tier"],
        model=headers["x-tollway-model"],
        cache=headers["x-tollway-cache"],
        prompt_tokens=int(headers["x-tollway-prompt-tokens"]),
        completion_tokens=int(headers["x-tollway-completion-tokens"]),
        cached_tokens=int(headers.get("x-tollway-cached-prompt-tokens", "0")),
        gpu_us=units(headers["x-tollway-gpu-seconds"], 6),
        cost_nanos=units(headers["x-tollway-cost-usd"], 9),
        cost_loaded_nanos=units(headers["x-tollway-cost-loaded-usd"], 9),
        saved_nanos=None if saved is None else units(saved, 9),
        route_score=headers.get("x-tollway-route-score"),
        fallback_from=headers.get("x-tollway-fallback-from"),
    )


def seen_in_stream(headers: Any, tollway: dict[str, Any]) -> Seen:
    """A stream: who and where from its headers, the figures from its final ``tollway``."""
    saved = tollway["cost_saved_usd"]
    assert tollway["request_id"] == headers["x-request-id"]  # its figures come at the end
    assert (tollway["tier"], tollway["model"]) == (
        headers["x-tollway-tier"],
        headers["x-tollway-model"],
    )
    assert tollway["cache"] == headers["x-tollway-cache"]
    return Seen(
        request_id=tollway["request_id"],
        status=200,
        tier=tollway["tier"],
        model=tollway["model"],
        cache=tollway["cache"],
        prompt_tokens=tollway["prompt_tokens"],
        completion_tokens=tollway["completion_tokens"],
        cached_tokens=tollway["cached_prompt_tokens"],
        gpu_us=round(Decimal(str(tollway["gpu_seconds"])) * 1_000_000),
        cost_nanos=units(tollway["cost_usd"], 9),
        cost_loaded_nanos=units(tollway["cost_loaded_usd"], 9),
        saved_nanos=None if saved is None else units(saved, 9),
        route_score=headers.get("x-tollway-route-score"),
        fallback_from=headers.get("x-tollway-fallback-from"),
    )


class Clock:
    """``with Clock() as clock:`` around a call: when it began and ended, and how long."""

    def __enter__(self) -> Clock:
        self.began = time.time()
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.waited_s = time.monotonic() - self._start
        self.ended = time.time()

    def stamp(self, seen: Seen) -> Seen:
        return dataclasses.replace(seen, began=self.began, ended=self.ended, waited_s=self.waited_s)


# -- what the ledger holds -------------------------------------------------------------------


async def rows_of(postgres: PostgresServer, request_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(postgres.url)
    try:
        return await conn.fetch("SELECT * FROM usage_requests WHERE request_id = $1", request_id)
    finally:
        await conn.close()


async def row_of(postgres: PostgresServer, request_id: str) -> asyncpg.Record:
    """The request's one row, once the writer has stored it."""
    deadline = time.monotonic() + ROW_WAIT_S
    while not (rows := await rows_of(postgres, request_id)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no ledger row for {request_id} after {ROW_WAIT_S} s")
        await asyncio.sleep(0.05)
    assert len(rows) == 1, rows
    return rows[0]


def assert_row(
    row: asyncpg.Record,
    seen: Seen,
    *,
    key: str = KEY,
    replica: str,
    endpoint: str = "chat",
    attempts: int = 1,
    error_type: str | None = None,
    streamed: bool = False,
) -> None:
    """Every column of ``row`` against what the client saw (and what the test knows)."""
    got = dict(row)
    finished = got.pop("finished_at").timestamp()
    duration_us, ttft_us, score = got.pop("duration_us"), got.pop("ttft_us"), got.pop("route_score")
    assert got == {
        "request_id": seen.request_id,
        "tenant": TENANTS[key],
        "key_id": key_id(key),
        "tier": seen.tier,
        "model": seen.model,
        "replica": replica,
        "endpoint": endpoint,
        "status": seen.status,
        "error_type": error_type,
        "cache": seen.cache,
        "prompt_tokens": seen.prompt_tokens,
        "completion_tokens": seen.completion_tokens,
        "cached_tokens": seen.cached_tokens,
        "gpu_us": seen.gpu_us,
        "cost_nanos": seen.cost_nanos,
        "cost_loaded_nanos": seen.cost_loaded_nanos,
        "saved_nanos": seen.saved_nanos or 0,
        "attempts": attempts,
        "fallback_from": seen.fallback_from,
    }
    if seen.route_score is None:
        assert score is None
    else:  # a real (float4) in the row, four decimals in the header
        assert abs(score - float(seen.route_score)) <= 0.00005 + 1e-6
    # When: within the client's call (the same clock, micro-second stamps).
    assert seen.began - 0.001 <= finished <= seen.ended + 0.001
    assert 0 < duration_us <= seen.waited_s * 1_000_000
    if streamed:
        assert ttft_us is not None
        assert 0 < ttft_us <= duration_us
    else:
        assert ttft_us is None


def prompt(what: str) -> list[Any]:
    return [{"role": "user", "content": f"{what} {uuid.uuid4()}"}]


# -- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "text_completion"])
async def test_answer_row_equals_its_headers(ledgered: Ledgered, endpoint: str) -> None:
    async with ledgered.client() as client:
        with Clock() as clock:
            if endpoint == "chat":
                raw: Any = await client.chat.completions.with_raw_response.create(
                    model="sim-small", messages=prompt("an answer"), max_tokens=8
                )
            else:
                raw = await client.completions.with_raw_response.create(
                    model="sim-small", prompt=f"a text completion {uuid.uuid4()}", max_tokens=8
                )
            answer = raw.parse()
    seen = clock.stamp(seen_in_headers(raw.headers, raw.status_code))
    assert (seen.status, seen.tier, seen.cache, seen.saved_nanos) == (200, "small", "bypass", None)
    assert seen.completion_tokens == answer.usage.completion_tokens > 0
    assert seen.gpu_us > 0
    assert 0 < seen.cost_nanos < seen.cost_loaded_nanos
    row = await row_of(ledgered.postgres, seen.request_id)
    assert_row(row, seen, replica=ledgered.small.url, endpoint=endpoint)


async def test_routed_answer_row_has_its_score(ledgered: Ledgered) -> None:
    async with ledgered.client() as client:
        with Clock() as clock:
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=prompt("a short question"), max_tokens=8
            )
    seen = clock.stamp(seen_in_headers(raw.headers, raw.status_code))
    assert seen.route_score is not None
    assert seen.tier == "small"
    row = await row_of(ledgered.postgres, seen.request_id)
    assert_row(row, seen, replica=ledgered.small.url)


async def test_fallback_answer_row_names_the_tier_first_chosen(ledgered: Ledgered) -> None:
    async with ledgered.client() as client:
        with Clock() as clock:
            raw = await client.chat.completions.with_raw_response.create(
                model="sim-gone", messages=prompt("to a tier that is down"), max_tokens=8
            )
    seen = clock.stamp(seen_in_headers(raw.headers, raw.status_code))
    assert (seen.tier, seen.model, seen.fallback_from) == ("large", "sim-large", "gone")
    row = await row_of(ledgered.postgres, seen.request_id)
    assert_row(row, seen, replica=ledgered.large.url)


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_row_equals_its_final_tollway_object(
    ledgered: Ledgered, include_usage: bool
) -> None:
    async with ledgered.client(OTHER_KEY) as client:
        with Clock() as clock:
            raw = await client.chat.completions.with_raw_response.create(
                model="sim-large",
                messages=prompt("a stream"),
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": include_usage},
            )
            chunks = [chunk async for chunk in raw.parse()]
    tollway = (chunks[-1].model_extra or {})["tollway"]
    assert sum(1 for c in chunks if "tollway" in (c.model_extra or {})) == 1
    seen = clock.stamp(seen_in_stream(raw.headers, tollway))
    assert (seen.tier, seen.cache, seen.saved_nanos) == ("large", "bypass", None)
    assert min(seen.completion_tokens, seen.gpu_us, seen.cost_nanos) > 0
    if include_usage:
        assert chunks[-1].usage is not None
        assert seen.completion_tokens == chunks[-1].usage.completion_tokens
    row = await row_of(ledgered.postgres, seen.request_id)
    assert_row(row, seen, key=OTHER_KEY, replica=ledgered.large.url, streamed=True)


# -- free answers: nothing ran, what it would have cost is saved ---------------------------------


async def test_cache_hit_row_costs_nothing_and_saves_the_first_cost(ledgered: Ledgered) -> None:
    messages = prompt("the same question at temperature 0")
    seen = []
    async with ledgered.client() as client:
        for _ in range(2):
            with Clock() as clock:
                raw = await client.chat.completions.with_raw_response.create(
                    model="sim-small", messages=messages, max_tokens=8, temperature=0
                )
            seen.append(clock.stamp(seen_in_headers(raw.headers, raw.status_code)))
    first, hit = seen
    assert (first.cache, hit.cache) == ("miss", "hit")
    assert first.cost_nanos > 0
    assert first.saved_nanos is None
    assert (hit.gpu_us, hit.cost_nanos, hit.cost_loaded_nanos) == (0, 0, 0)
    assert hit.saved_nanos == first.cost_nanos
    assert hit.prompt_tokens == first.prompt_tokens
    assert hit.completion_tokens == first.completion_tokens
    assert_row(await row_of(ledgered.postgres, first.request_id), first, replica=ledgered.small.url)
    # Answered from the cache: no replica was reached, no attempt made.
    assert_row(await row_of(ledgered.postgres, hit.request_id), hit, replica="", attempts=0)


async def test_idempotent_replay_row_costs_nothing_and_saves_the_first_cost(
    ledgered: Ledgered,
) -> None:
    messages = prompt("an idempotent request")
    key = f"idem-{uuid.uuid4()}"
    seen = []
    async with ledgered.client() as client:
        for _ in range(2):
            with Clock() as clock:
                raw = await client.chat.completions.with_raw_response.create(
                    model="sim-small",
                    messages=messages,
                    max_tokens=8,
                    extra_headers={"Idempotency-Key": key},
                )
            assert raw.status_code == 200
            seen.append(clock.stamp(seen_in_headers(raw.headers, raw.status_code)))
            replayed = raw.headers.get("idempotent-replayed")
    first, replay = seen
    assert (first.cache, replay.cache, replayed) == ("bypass", "replay", "true")
    assert first.request_id != replay.request_id
    assert (replay.gpu_us, replay.cost_nanos, replay.cost_loaded_nanos) == (0, 0, 0)
    assert replay.saved_nanos == first.cost_nanos > 0
    assert_row(await row_of(ledgered.postgres, first.request_id), first, replica=ledgered.small.url)
    assert_row(await row_of(ledgered.postgres, replay.request_id), replay, replica="", attempts=0)


# -- failures ---------------------------------------------------------------------------------


async def test_upstream_failure_row_is_a_502_with_its_error_type(ledgered: Ledgered) -> None:
    """The replica answers 500 (not retried): a 502, billed for the GPU time it took."""
    set_faults(ledgered.small, error_rate=1.0, error_status=500)
    try:
        async with ledgered.client() as client:
            with Clock() as clock, pytest.raises(openai.APIStatusError) as failed:
                await client.chat.completions.create(
                    model="sim-small", messages=prompt("a failure"), max_tokens=8
                )
    finally:
        set_faults(ledgered.small, error_rate=0.0)
    response = failed.value.response
    assert failed.value.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    seen = clock.stamp(seen_in_headers(response.headers, 502))
    assert (seen.tier, seen.cache, seen.prompt_tokens, seen.completion_tokens) == (
        "small",
        "bypass",
        0,
        0,
    )
    row = await row_of(ledgered.postgres, seen.request_id)
    assert_row(row, seen, replica=ledgered.small.url, error_type="upstream_error")


async def test_refused_before_routing_has_no_row(ledgered: Ledgered) -> None:
    """A bad key, a body that does not validate, an unknown model: refused before any
    work, so no row. Rows reach the database in the order they were settled, so once a
    request sent after them has its row, theirs would be there too."""
    run = uuid.uuid4().hex
    refused = {f"refused-{run}-{kind}": kind for kind in ("401", "400", "404")}
    async with (
        ledgered.client("sk-not-a-key-at-all") as stranger,
        ledgered.client() as client,
    ):
        for rid, kind in refused.items():
            with pytest.raises(openai.APIStatusError) as failed:
                await (stranger if kind == "401" else client).chat.completions.create(
                    model="sim-nowhere" if kind == "404" else "sim-small",
                    messages=[{"role": "nobody" if kind == "400" else "user", "content": "x"}],
                    max_tokens=8,
                    extra_headers={"x-request-id": rid},
                )
            assert failed.value.status_code == int(kind)
            assert failed.value.response.headers["x-request-id"] == rid
            assert "x-tollway-cost-usd" not in failed.value.response.headers
        raw = await client.chat.completions.with_raw_response.create(
            model="sim-small", messages=prompt("after the refusals"), max_tokens=8
        )
    await row_of(ledgered.postgres, raw.headers["x-tollway-request-id"])
    for rid in refused:
        assert await rows_of(ledgered.postgres, rid) == [], rid
