"""What a request may cost at most, before it runs: the amount a budget reservation holds.

Worst case in tokens: the prompt (estimated from the body's size: a token is
usually at least four bytes of JSON text, so bytes / 4 over-counts, though
token-id prompts and CJK text can hold more) plus the most it may generate
(``max_tokens`` for each choice, else the tier's ``max_output_tokens``).
Priced at:

- a token-priced tier: its prices, with the overhead factor, exactly as the
  meter will price it;
- a GPU-priced tier: the most GPU time a token took among its last
  ``WINDOW`` settled requests (a lone request has the GPU to itself: the
  most), priced as the meter will price it, at the dearest of the tier's
  replicas' current loaded tariff (idle share included, which moves with how
  long the replicas sat idle), and never below ``floor`` a token; before the
  tier has data, ``unobserved`` a token. The most, not an average, and times
  ``margin`` (2): a token's GPU time swings with how many share the batch, so
  the next request may take more than any seen lately; a reservation too
  large only refuses early, one too small overspends.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping

from metering.money import Ratio
from metering.pricing import TokenPrices, price_tokens
from metering.report import RequestReport

NANOS_PER_USD_PER_MTOK = 1000  # 1 USD per million tokens is 1,000 nano-dollars a token
WINDOW = 512  # settled requests per tier whose cost per token the estimate looks at


def prompt_tokens_at_most(body: bytes) -> int:
    """An over-estimate of the prompt's tokens: the request body's size / 4 (its messages,
    and its tools and parameters, which count too or add a little)."""
    return len(body) // 4 + 1


def output_tokens_at_most(asked: int | None, tier_cap: int) -> int:
    """What the client asked for at most (``max_completion_tokens`` or ``max_tokens``),
    else the tier's cap."""
    return asked if asked is not None and asked > 0 else tier_cap


class CostEstimator:
    def __init__(
        self,
        token_prices: Mapping[str, TokenPrices],
        overhead: Ratio,
        *,
        unobserved_usd_per_mtok: float,
        floor_usd_per_mtok: float,
        price_gpu: Callable[[str, int], int],
        margin: float = 1.0,
    ):
        self.margin = margin
        self.token_prices = dict(token_prices)
        self.overhead = overhead
        self.unobserved = unobserved_usd_per_mtok * NANOS_PER_USD_PER_MTOK
        self.floor = floor_usd_per_mtok * NANOS_PER_USD_PER_MTOK
        self.price_gpu = price_gpu  # (tier, micro-GPU-seconds) -> loaded nano-dollars now
        # tier -> micro-GPU-seconds a token of its last WINDOW requests, and their max
        self._seen: dict[str, deque[float]] = {}
        self._highest: dict[str, float] = {}

    def observe(self, report: RequestReport) -> None:
        """Learn from a settled request that ran on the GPUs (a settlement sink)."""
        tokens = report.usage.total_tokens
        if report.free or tokens <= 0 or report.gpu_us <= 0:
            return
        cost = report.gpu_us / tokens
        seen = self._seen.setdefault(report.tier, deque(maxlen=WINDOW))
        dropped = seen[0] if len(seen) == WINDOW else None
        seen.append(cost)
        highest = self._highest.get(report.tier, 0.0)
        if cost >= highest:
            self._highest[report.tier] = cost
        elif dropped is not None and dropped >= highest:  # the max left the window
            self._highest[report.tier] = max(seen)

    def nanos(self, tier: str, prompt_tokens: int, output_tokens: int) -> int:
        """The most the request may cost (loaded nano-dollars), as this estimator sees it."""
        prices = self.token_prices.get(tier)
        if prices is not None:
            return price_tokens(prompt_tokens, output_tokens, prices, self.overhead).loaded_nanos
        tokens = prompt_tokens + output_tokens
        us_per_token = self._highest.get(tier)
        if us_per_token is None:
            priced = self.unobserved * tokens
        else:
            priced = self.price_gpu(tier, math.ceil(us_per_token * self.margin * tokens))
        return int(max(priced, self.floor * tokens)) + 1
