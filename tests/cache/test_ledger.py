"""The usage ledger against a real Redis: exact sums, scoping, and no harm when Redis fails."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import redis
from redis.crc import key_slot

from cache.ledger import GroupBy, LedgerUnavailable, UsageLedger, UsageRow, totals
from cache.ledger_write import STREAM_FIELDS
from cache.redis_client import RedisClient
from metering.money import from_nanos, to_nanos, usd
from metering.pricing import NO_COST, Cost
from metering.report import RequestReport
from metering.usage import TokenUsage
from tests.support.redis_server import run_redis


def _tenth_of_last_month() -> datetime:
    """17:30 on the 10th of last month: in the past, within retention, days 10-13 in one month."""
    first = datetime.now(UTC).replace(day=1, hour=17, minute=30, second=0, microsecond=0)
    return (first - timedelta(days=1)).replace(day=10)


T0 = _tenth_of_last_month()
DAY0 = f"{T0:%Y-%m-%d}"
DAY1 = f"{T0 + timedelta(days=1):%Y-%m-%d}"
HOUR0 = f"{T0:%Y%m%d%H}"
MakeLedger = Callable[..., Awaitable[UsageLedger]]


def report(
    tenant: str = "acme",
    tier: str = "small",
    model: str = "m-small",
    *,
    cache: str = "miss",
    prompt: int = 10,
    completion: int = 20,
    cached: int = 0,
    gpu_us: float = 500_000,  # a float only to test a NaN
    cost: str = "0.000125",
    loaded: str = "0.0002",
    saved: str | None = None,
    at: datetime = T0,
) -> RequestReport:
    return RequestReport(
        request_id=f"req-{random.random()}",
        tenant=tenant,
        tier=tier,
        model=model,
        operation="chat",
        usage=TokenUsage(prompt, completion, cached),
        gpu_us=gpu_us,  # type: ignore[arg-type]
        cost=Cost.of_usd(usd(cost), usd(loaded)),
        cache=cache,
        saved_nanos=0 if saved is None else to_nanos(usd(saved)),
        replica="http://replica-1",
        finished_us=round(ts(at) * 1_000_000),
    )


def ts(moment: datetime) -> float:
    return moment.timestamp()


def record(ledger: UsageLedger, rep: RequestReport, at: float) -> None:
    ledger.record(rep._replace(finished_us=round(at * 1_000_000)))


@pytest.fixture
async def make_ledger() -> AsyncIterator[MakeLedger]:
    owned: list[tuple[UsageLedger, RedisClient]] = []

    async def make(url: str, *, start: bool = True, **kwargs: object) -> UsageLedger:
        client = RedisClient(
            url,
            call_budget_s=float(str(kwargs.pop("call_budget_s", 0.5))),
            backoff_s=float(str(kwargs.pop("backoff_s", 1.0))),
        )
        await client.start()
        ledger = UsageLedger(client, **kwargs)  # type: ignore[arg-type]
        if start:
            await ledger.start()
        owned.append((ledger, client))
        return ledger

    yield make
    for ledger, client in owned:
        await ledger.stop(grace_s=1.0)
        await client.close()


async def query(
    ledger: UsageLedger,
    group_by: GroupBy,
    tenant: str | None = None,
    start: datetime = T0 - timedelta(days=2),
    end: datetime = T0 + timedelta(days=2),
) -> dict[str, UsageRow]:
    rows = await ledger.query(group_by=group_by, start=start, end=end, tenant=tenant)
    return {row.key: row for row in rows}


@pytest.fixture
async def populated(make_ledger: MakeLedger, redis_url: str) -> UsageLedger:
    ledger = await make_ledger(redis_url)
    record(ledger, report("acme", "small", "m-small", cost="0.1", loaded="0.2"), ts(T0))
    record(ledger, report("acme", "large", "m-large", cost="1", loaded="2"), ts(T0))
    record(
        ledger,
        report("acme", "small", "m-small", cache="hit", cost="0", loaded="0", saved="0.1"),
        ts(T0 + timedelta(hours=1)),
    )
    record(ledger, report("globex", "large", "m-large", cost="3", loaded="4"), ts(T0))
    record(
        ledger,
        report("globex", "small", "m-small", cost="0.5", loaded="0.75"),
        ts(T0 + timedelta(days=1)),
    )
    assert await ledger.flush()
    assert ledger.lost == 0
    assert ledger.written == 5
    return ledger


async def test_query_groups_by_tenant(populated: UsageLedger) -> None:
    rows = await query(populated, "tenant")
    assert sorted(rows) == ["acme", "globex"]
    assert rows["acme"].requests == 3
    assert rows["acme"].cost_usd == Decimal("1.1")
    assert rows["acme"].cost_loaded_usd == Decimal("2.2")
    assert rows["acme"].saved_usd == Decimal("0.1")
    assert rows["acme"].prompt_tokens == 30
    assert rows["acme"].completion_tokens == 60
    assert rows["acme"].gpu_seconds == pytest.approx(1.5)
    assert rows["globex"].cost_usd == Decimal("3.5")


async def test_query_groups_by_tier_model_cache_and_day(populated: UsageLedger) -> None:
    tiers = await query(populated, "tier")
    assert {k: r.cost_usd for k, r in tiers.items()} == {"large": 4, "small": Decimal("0.6")}
    models = await query(populated, "model")
    assert {k: r.requests for k, r in models.items()} == {"m-large": 2, "m-small": 3}
    caches = await query(populated, "cache")
    assert {k: r.requests for k, r in caches.items()} == {"hit": 1, "miss": 4}
    days = await query(populated, "day")
    assert {k: r.cost_usd for k, r in days.items()} == {
        DAY0: Decimal("4.1"),
        DAY1: Decimal("0.5"),
    }


async def test_a_tenant_sees_only_its_own_usage(populated: UsageLedger) -> None:
    acme = await query(populated, "tier", tenant="acme")
    assert {k: r.cost_usd for k, r in acme.items()} == {"large": 1, "small": Decimal("0.1")}
    assert await query(populated, "tenant", tenant="globex") == {
        "globex": (await query(populated, "tenant"))["globex"]
    }
    assert await query(populated, "tenant", tenant="nobody") == {}


async def test_query_counts_every_hour_overlapping_the_range(populated: UsageLedger) -> None:
    six = T0.replace(hour=18, minute=0)
    # [17:59, 18:00) overlaps hour 17 only; [18:00, 18:01) hour 18 only.
    hour17 = await query(populated, "tenant", "acme", six - timedelta(minutes=1), six)
    assert hour17["acme"].requests == 2
    hour18 = await query(populated, "tenant", "acme", six, six + timedelta(minutes=1))
    assert hour18["acme"].requests == 1
    assert await query(populated, "tenant", None, T0, T0) == {}
    # Naive datetimes are UTC.
    midnight = T0.replace(hour=0, minute=0, tzinfo=None)
    naive = await query(populated, "tenant", "acme", midnight, midnight + timedelta(days=1))
    assert naive["acme"].requests == 3


async def test_spend_for_budgets(populated: UsageLedger) -> None:
    spend = await populated.spend("globex", T0 + timedelta(days=1))
    assert spend is not None
    assert spend.day == Cost.of_usd(Decimal("0.5"), Decimal("0.75"))
    assert spend.month == Cost.of_usd(Decimal("3.5"), Decimal("4.75"))
    nothing = await populated.spend("globex", T0 + timedelta(days=40))
    assert nothing is not None
    assert nothing.day == nothing.month == NO_COST


async def test_each_request_is_in_the_stream(populated: UsageLedger, redis_url: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        entries = client.xrange(populated.stream_key())
    assert len(entries) == 5
    assert all(tuple(fields) == STREAM_FIELDS for _, fields in entries)  # named, in order
    # A batch's entries come grouped by what they share (tenant, tier, model...);
    # each is dated by its own at_us.
    got = sorted(
        (f["tenant"], f["tier"], f["model"], f["cache"], int(f["at_us"])) for _, f in entries
    )
    assert got == sorted(
        [
            ("acme", "small", "m-small", "miss", round(ts(T0) * 1_000_000)),
            ("acme", "large", "m-large", "miss", round(ts(T0) * 1_000_000)),
            ("acme", "small", "m-small", "hit", round(ts(T0 + timedelta(hours=1)) * 1_000_000)),
            ("globex", "large", "m-large", "miss", round(ts(T0) * 1_000_000)),
            ("globex", "small", "m-small", "miss", round(ts(T0 + timedelta(days=1)) * 1_000_000)),
        ]
    )
    (fields,) = [
        f for _, f in entries if (f["tenant"], f["tier"], f["cache"]) == ("acme", "small", "miss")
    ]
    assert (fields["operation"], fields["status"], fields["replica"]) == (
        "chat",
        "200",
        "http://replica-1",
    )
    assert fields["cost_nanos"] == str(to_nanos(Decimal("0.1")))
    assert fields["saved_nanos"] == "0"  # a miss saved nothing
    assert fields["request_id"].startswith("req-")


async def test_keys_expire_with_the_retention(populated: UsageLedger, redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        ttl = client.ttl(populated.tenant_hash(HOUR0, "acme"))
        stream_ttl = client.ttl(populated.stream_key())
    assert 399 * 86_400 < ttl <= 400 * 86_400
    assert stream_ttl == -1  # bounded by MAXLEN instead


async def test_totals_equal_the_exact_sum_of_1000_random_requests(
    make_ledger: MakeLedger, redis_url: str
) -> None:
    rng = random.Random(20261122)
    ledger = await make_ledger(redis_url, batch_size=97)
    cost_nanos = loaded_nanos = saved_nanos = gpu_us = tokens = 0
    for _ in range(1000):
        cache = rng.choice(["miss", "hit", "bypass"])
        rep = report(
            rng.choice(["acme", "globex", "initech"]),
            rng.choice(["small", "large"]),
            rng.choice(["m-a", "m-b", "org/m-c:v1"]),
            cache=cache,
            prompt=rng.randrange(10_000),
            completion=rng.randrange(4_000),
            gpu_us=rng.randrange(30_000_000),
            cost=str(from_nanos(rng.randrange(50_000_000))),
            loaded=str(from_nanos(rng.randrange(90_000_000))),
            saved=str(from_nanos(rng.randrange(1000))) if cache == "hit" else None,
        )
        headers = rep.headers()
        # The sums the client could add up from the headers it received.
        cost_nanos += to_nanos(Decimal(headers["x-tollway-cost-usd"]))
        loaded_nanos += to_nanos(Decimal(headers["x-tollway-cost-loaded-usd"]))
        saved_nanos += to_nanos(Decimal(headers.get("x-tollway-cost-saved-usd", "0")))
        gpu_us += int(Decimal(headers["x-tollway-gpu-seconds"]) * 1_000_000)
        tokens += rep.usage.total_tokens
        record(ledger, rep, ts(T0) + rng.uniform(0, 3 * 86_400))
    assert await ledger.flush(within_s=10)
    assert ledger.lost == 0
    for group_by in ("tenant", "tier", "model", "day", "cache"):
        rows = await ledger.query(
            group_by=group_by,
            start=T0 - timedelta(hours=1),
            end=T0 + timedelta(days=4),
            tenant=None,
        )
        total = totals(rows)
        assert total.requests == 1000
        assert to_nanos(total.cost_usd) == cost_nanos
        assert to_nanos(total.cost_loaded_usd) == loaded_nanos
        assert to_nanos(total.saved_usd) == saved_nanos
        assert total.gpu_us == gpu_us
        assert total.total_tokens == tokens


async def test_a_retried_batch_counts_once(make_ledger: MakeLedger, redis_url: str) -> None:
    ledger = await make_ledger(redis_url, start=False)
    writes = ledger._build([_entry(report(cost="1"))])
    # The reply to the first attempt was lost; the retry carries the same batch number.
    assert await ledger._apply(writes, seq=7)
    assert await ledger._apply(writes, seq=7)
    assert (await query(ledger, "tenant"))["acme"].cost_usd == 1
    with redis.Redis.from_url(redis_url) as client:
        assert client.xlen(ledger.stream_key()) == 1
    assert await ledger._apply(ledger._build([_entry(report(cost="1"))]), seq=8)
    assert (await query(ledger, "tenant"))["acme"].cost_usd == 2


def _entry(rep: RequestReport) -> RequestReport:
    return rep  # dated T0


async def test_keys_written_together_share_a_cluster_slot(
    make_ledger: MakeLedger, redis_url: str
) -> None:
    ledger = await make_ledger(redis_url, start=False)
    batch = [_entry(report(tenant, tier)) for tenant in ("a", "b") for tier in ("x", "y")]
    batch.append(report("a", at=T0 + timedelta(hours=5)))
    writes = ledger._build(batch)
    assert len(writes) == 5  # the stream, two hours, two tenants' spend
    for write in writes:
        assert len({key_slot(key.encode()) for key in write.keys}) == 1, write.keys


async def test_record_never_blocks_and_drops_when_the_queue_is_full(
    make_ledger: MakeLedger, redis_url: str
) -> None:
    lost: list[int] = []
    ledger = await make_ledger(redis_url, start=False, max_queue=1000, on_lost=lost.append)
    rep = report()
    began = time.perf_counter()
    for _ in range(1500):
        record(ledger, rep, ts(T0))
    elapsed = time.perf_counter() - began
    assert elapsed < 1.0, f"1500 record() calls took {elapsed:.3f} s"
    assert ledger.queued == 1000
    assert ledger.lost == 500
    assert sum(lost) == 500
    await ledger.start()
    assert await ledger.flush()
    assert ledger.written == 1000


async def test_stop_writes_what_is_queued(make_ledger: MakeLedger, redis_url: str) -> None:
    ledger = await make_ledger(redis_url)
    for _ in range(50):
        record(ledger, report(), ts(T0))
    await ledger.stop()
    assert ledger.written == 50
    record(ledger, report(), ts(T0))  # after stop: counted lost, not raised
    assert ledger.lost == 1


async def test_redis_down_counts_writes_lost_and_they_resume_when_it_returns(
    make_ledger: MakeLedger,
) -> None:
    lost: list[int] = []
    with run_redis() as server:
        ledger = await make_ledger(
            server.url,
            backoff_s=0.1,
            retry_delay_s=0.15,
            call_budget_s=0.05,
            on_lost=lost.append,
        )
        server.stop()
        began = time.perf_counter()
        for _ in range(20):
            record(ledger, report(), ts(T0))
            await asyncio.sleep(0)
        assert time.perf_counter() - began < 0.5
        assert await ledger.flush(within_s=5)
        assert ledger.lost == 20
        assert sum(lost) == 20
        assert ledger.redis.failures >= 2
        with pytest.raises(LedgerUnavailable):
            await query(ledger, "tenant")
        assert await ledger.spend("acme", T0) is None

        server.start()  # same port, empty
        await asyncio.sleep(0.15)  # past the client's backoff
        for _ in range(3):
            record(ledger, report(), ts(T0))
        assert await ledger.flush(within_s=5)
        assert (await query(ledger, "tenant"))["acme"].requests == 3
        assert ledger.lost == 20


async def test_a_batch_is_retried_once_before_it_is_lost(make_ledger: MakeLedger) -> None:
    with run_redis() as server:
        ledger = await make_ledger(server.url, backoff_s=0.1, retry_delay_s=1.0, call_budget_s=0.05)
        server.stop()
        record(ledger, report(), ts(T0))
        deadline = time.monotonic() + 5
        while ledger.redis.failures == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        server.start()  # well within the retry delay
        assert await ledger.flush(within_s=5)
        assert ledger.lost == 0
        assert (await query(ledger, "tenant"))["acme"].requests == 1


async def test_a_report_that_cannot_be_recorded_is_lost_not_raised(
    make_ledger: MakeLedger, redis_url: str
) -> None:
    ledger = await make_ledger(redis_url)
    record(ledger, report(gpu_us=float("nan")), ts(T0))
    record(ledger, report(), ts(T0))
    record(ledger, report(gpu_us=1.5), ts(T0))  # Redis sums integers only
    record(ledger, report(prompt=2**63), ts(T0))  # nor beyond 64 bits
    assert await ledger.flush()
    assert (ledger.lost, ledger.written) == (3, 1)
    assert (await query(ledger, "tenant"))["acme"].requests == 1


def _entry_of(rep: RequestReport) -> dict[str, str]:
    """What the stream must hold for ``rep``: every field spelled in decimal."""
    figures = (
        *rep.usage,
        rep.gpu_us,
        rep.cost.marginal_nanos,
        rep.cost.loaded_nanos,
        rep.saved_nanos,
    )
    values = (rep.finished_us, rep.request_id, *figures, rep.tenant, rep.tier, rep.model)
    rest = (rep.cache, rep.operation, rep.status, rep.replica)
    return dict(zip(STREAM_FIELDS, map(str, (*values, *rest)), strict=True))


@pytest.mark.parametrize(
    "big",
    [0, 2**53 - 1, 2**53, 2**62],
    ids=["small", "largest-packed", "first-spelled", "huge"],
)
async def test_stream_entries_spell_every_figure_exactly(
    make_ledger: MakeLedger, redis_url: str, big: int
) -> None:
    # Groups of ordinary figures are packed as 64-bit integers that the Lua script
    # spells; a group with a figure Lua's doubles cannot hold exactly is spelled as
    # text by the gateway. Either way the entry is the report, digit for digit.
    rng = random.Random(big)
    reports = [
        report(tenant=rng.choice(["acme", "globex"]), cache=rng.choice(["miss", "hit"]))._replace(
            usage=TokenUsage(rng.randrange(10**6), rng.randrange(10**6), rng.randrange(10**3)),
            gpu_us=rng.randrange(10**9),
            cost=Cost(rng.randrange(10**12), rng.randrange(10**12)),
            saved_nanos=rng.randrange(10**9),
            finished_us=round(ts(T0) * 1_000_000) + rng.randrange(10**9),
        )
        for _ in range(40)
    ]
    reports[7] = reports[7]._replace(cost=Cost(big, big + 1), usage=TokenUsage(big, 1, 0))
    ledger = await make_ledger(redis_url)
    ledger.record_many(reports)
    assert await ledger.flush()
    assert (ledger.lost, ledger.written) == (0, 40)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        entries = [fields for _, fields in client.xrange(ledger.stream_key())]
    assert sorted(entries, key=lambda e: e["request_id"]) == sorted(
        map(_entry_of, reports), key=lambda e: e["request_id"]
    )
    rows = (await query(ledger, "tenant")).values()
    assert sum(row.prompt_tokens for row in rows) == sum(r.usage[0] for r in reports)
    assert sum(row.cost_usd for row in rows) == from_nanos(sum(r.cost[0] for r in reports))


async def test_a_tab_in_a_request_id_is_written_as_a_space(
    make_ledger: MakeLedger, redis_url: str
) -> None:
    # The batch no longer spells one tab-separated entry per report: it is written
    # entry by entry, and every report still lands, each in its own entry.
    ledger = await make_ledger(redis_url)
    odd = report()._replace(request_id="req\twith\ttabs")
    ledger.record_many([report(), odd, report()])
    assert await ledger.flush()
    assert (ledger.lost, ledger.written) == (0, 3)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        entries = [fields for _, fields in client.xrange(ledger.stream_key())]
    assert len(entries) == 3  # one group: written entry by entry, in order
    assert [e["request_id"] == "req with tabs" for e in entries] == [False, True, False]
    assert all(tuple(fields) == STREAM_FIELDS for fields in entries)
    assert (await query(ledger, "tenant"))["acme"].requests == 3


async def test_a_report_that_cannot_be_dated_or_grouped_is_lost_alone(
    make_ledger: MakeLedger, redis_url: str
) -> None:
    ledger = await make_ledger(redis_url)
    undated = report()._replace(finished_us="yesterday")
    unhashable = report()._replace(replica=["not", "a", "name"])
    ledger.record_many([report(), undated, report(), unhashable])
    assert await ledger.flush()
    assert (ledger.lost, ledger.written) == (2, 2)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert client.xlen(ledger.stream_key()) == 2
    assert (await query(ledger, "tenant"))["acme"].requests == 2
