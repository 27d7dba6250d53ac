"""Synthetic settled requests for the ledger benchmark: what a busy gateway's recorder hands on.

Seeded, so every run stores the same rows (only the request ids' prefix and
the hours move with the clock). The mix is a gateway's: several tenants with a
few keys each, two tiers with their models and replicas, chat mostly, some
streams (a time to first token), cache hits and coalesced answers (free, with
the saved cost), a few 429s and upstream errors, a route score on routed
requests and a fallback now and then, spread over the last few hours, so a
batch's hourly sums fall into several (hour, tenant, key, tier, model, cache)
groups as they do in production.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

from metering.pricing import Cost
from metering.report import RequestReport
from metering.usage import TokenUsage

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark")
KEYS_PER_TENANT = 3


@dataclass(frozen=True)
class Tier:
    name: str
    model: str
    replicas: tuple[str, ...]
    nanos_per_token: int  # the marginal price, in nano-dollars per token
    share: float  # of the requests


TIERS = (
    Tier("small", "llama-3.1-8b-instruct", ("small-0", "small-1", "small-2", "small-3"), 60, 0.7),
    Tier("large", "llama-3.1-70b-instruct", ("large-0", "large-1"), 700, 0.3),
)
# (cache status, share): free answers carry what they saved instead of a cost.
CACHE = (("miss", 0.78), ("hit", 0.12), ("bypass", 0.06), ("coalesced", 0.03), ("replay", 0.01))
# (status, error type, share) of the requests that are not a 200.
ERRORS = (
    (429, "rate_limited", 0.02),
    (503, "upstream_503", 0.005),
    (400, "invalid_request", 0.005),
)


def reports(count: int, *, hours: float = 3.0, seed: int = 20) -> list[RequestReport]:
    """``count`` settled requests, finished over the last ``hours`` (oldest first)."""
    rng = random.Random(seed)
    prefix = "req_" + os.urandom(6).hex()  # unique across runs, like the gateway's ids
    now_us = time.time_ns() // 1000
    span_us = int(hours * 3600e6)
    keys = {t: [f"{rng.getrandbits(48):012x}" for _ in range(KEYS_PER_TENANT)] for t in TENANTS}
    tenant_weights = [2.0**-i for i in range(len(TENANTS))]  # a few big tenants, a long tail
    out = []
    for i in range(count):
        tenant = rng.choices(TENANTS, tenant_weights)[0]
        tier = rng.choices(TIERS, [t.share for t in TIERS])[0]
        cache = rng.choices([c for c, _ in CACHE], [s for _, s in CACHE])[0]
        status, error_type = 200, None
        draw = rng.random()
        for code, kind, share in ERRORS:
            if draw < share:
                status, error_type = code, kind
                break
            draw -= share
        failed = status != 200
        prompt = 0 if failed else rng.randint(20, 3000)
        completion = 0 if failed else rng.randint(1, 800)
        cached = prompt // 2 if prompt and rng.random() < 0.3 else 0
        free = cache in ("hit", "coalesced", "replay")
        price = (prompt + completion) * tier.nanos_per_token
        stream = rng.random() < 0.4
        duration = 0.002 if failed else rng.uniform(0.05, 0.02 * completion + 0.2)
        routed = rng.random() < 0.5
        out.append(
            RequestReport(
                request_id=f"{prefix}{i:010x}",
                tenant=tenant,
                tier=tier.name,
                model=tier.model,
                operation="chat" if rng.random() < 0.9 else "text_completion",
                usage=TokenUsage(prompt, completion, cached),
                gpu_us=0 if failed or free else rng.randint(1_000, 2_000_000),
                cost=Cost() if failed or free else Cost(price, price * 13 // 10),
                cache=cache,
                saved_nanos=price if free else 0,
                replica="" if failed or free else rng.choice(tier.replicas),
                attempts=0 if free else 1 + (rng.random() < 0.01),
                status=status,
                finished_us=now_us - span_us + span_us * i // max(count, 1),
                duration_s=duration,
                ttft_s=duration * rng.uniform(0.05, 0.3) if stream and not failed else None,
                error_type=error_type,
                key_id=rng.choice(keys[tenant]),
                route_score=round(rng.random(), 4) if routed else None,
                fallback_from="large" if tier.name == "small" and rng.random() < 0.01 else None,
            )
        )
    return out
