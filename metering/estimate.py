"""What a request may cost at most, before it runs: the amount a budget reservation holds.

Worst case in tokens: the prompt (estimated from the body's size: a token is
at least about four bytes of JSON text, so bytes / 4 over-counts) plus the
most it may generate (``max_tokens``, else the tier's ``max_output_tokens``).
Priced at:

- a token-priced tier: its prices, with the overhead factor, exactly as the
  meter will price it;
- a GPU-priced tier: its loaded cost per token as observed on settled
  requests (a moving average per tier), never below ``floor``; before the
  tier has data, ``unobserved`` (documented as a deliberate over-estimate:
  a reservation too large only refuses early; one too small overspends).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from metering.money import Ratio
from metering.pricing import TokenPrices, price_tokens
from metering.report import RequestReport

NANOS_PER_USD_PER_MTOK = 1000  # 1 USD per million tokens is 1,000 nano-dollars a token
ALPHA = 0.1  # the moving average's weight for each new request


def prompt_tokens_at_most(body: Mapping[str, Any]) -> int:
    """An over-estimate of the prompt's tokens from the request body."""
    text = body.get("messages", body.get("prompt", ""))
    return len(orjson.dumps(text)) // 4 + 1


def output_tokens_at_most(body: Mapping[str, Any], tier_cap: int) -> int:
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(asked) if isinstance(asked, int) and asked > 0 else tier_cap


class CostEstimator:
    def __init__(
        self,
        token_prices: Mapping[str, TokenPrices],
        overhead: Ratio,
        *,
        unobserved_usd_per_mtok: float,
        floor_usd_per_mtok: float,
    ):
        self.token_prices = dict(token_prices)
        self.overhead = overhead
        self.unobserved = unobserved_usd_per_mtok * NANOS_PER_USD_PER_MTOK
        self.floor = floor_usd_per_mtok * NANOS_PER_USD_PER_MTOK
        self._per_token: dict[str, float] = {}  # tier -> loaded nano-dollars a token

    def observe(self, report: RequestReport) -> None:
        """Learn from a settled request that ran on the GPUs (a settlement sink)."""
        tokens = report.usage.total_tokens
        if report.free or tokens <= 0 or report.cost.loaded_nanos <= 0:
            return
        seen = report.cost.loaded_nanos / tokens
        last = self._per_token.get(report.tier)
        self._per_token[report.tier] = seen if last is None else last + ALPHA * (seen - last)

    def nanos(self, tier: str, prompt_tokens: int, output_tokens: int) -> int:
        """The most the request may cost (loaded nano-dollars), as this estimator sees it."""
        prices = self.token_prices.get(tier)
        if prices is not None:
            return price_tokens(prompt_tokens, output_tokens, prices, self.overhead).loaded_nanos
        per_token = max(self._per_token.get(tier, self.unobserved), self.floor)
        return int(per_token * (prompt_tokens + output_tokens)) + 1
