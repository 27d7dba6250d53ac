"""One request's metered outcome, and how it is shown: headers and the stream's ``tollway`` object.

Plain data: the gateway fills it in once per request, and every sink reads
the same object: the response headers, Prometheus, the span and the usage
ledger. Every figure is an integer: tokens, GPU time in micro-GPU-seconds
(``gpu_us``, what the header's six decimals print) and dollars in nano-dollars
(``Cost``, the nine decimals), so headers, Prometheus and the ledger all sum
exactly what was printed, and a batch of reports can be read column by column
in C (``metering.batch``, for Prometheus and ``cache.ledger_write``) instead
of a Python loop per request.

Text fields must not hold tabs (the ledger's separator): the gateway's names
come from the validated configuration and request ids from
``gateway.request_id``; the ledger checks each batch anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from functools import partial
from operator import attrgetter
from typing import Any, NamedTuple

from metering.money import NANOS_PER_USD, fmt_nanos, from_nanos
from metering.pricing import MICROS_PER_SECOND, NO_COST, Cost
from metering.usage import NO_USAGE, TokenUsage

MICROS = MICROS_PER_SECOND  # gpu_us per GPU-second
FREE = frozenset({"hit", "coalesced", "replay"})  # cache statuses served without the model

HEADER_PREFIX = "x-tollway-"
_H_REQUEST_ID = HEADER_PREFIX + "request-id"
_H_TIER = HEADER_PREFIX + "tier"
_H_MODEL = HEADER_PREFIX + "model"
_H_PROMPT = HEADER_PREFIX + "prompt-tokens"
_H_COMPLETION = HEADER_PREFIX + "completion-tokens"
_H_GPU = HEADER_PREFIX + "gpu-seconds"
_H_COST = HEADER_PREFIX + "cost-usd"
_H_LOADED = HEADER_PREFIX + "cost-loaded-usd"
_H_CACHED = HEADER_PREFIX + "cached-prompt-tokens"
_H_SAVED = HEADER_PREFIX + "cost-saved-usd"
# The figures' names as the ASGI response wants them: encoded once, not per request.
_B_REQUEST_ID, _B_PROMPT, _B_COMPLETION, _B_GPU, _B_COST, _B_LOADED, _B_CACHED, _B_SAVED = (
    name.encode("latin-1")
    for name in (
        _H_REQUEST_ID,
        _H_PROMPT,
        _H_COMPLETION,
        _H_GPU,
        _H_COST,
        _H_LOADED,
        _H_CACHED,
        _H_SAVED,
    )
)


# The figures' head lines, one formatting for all (``RequestReport.head_lines``).
_LINES_HEAD = b"%b: %%b\r\n%b: %%d\r\n%b: %%d\r\n%b: %%d.%%06d\r\n" % (
    _B_REQUEST_ID, _B_PROMPT, _B_COMPLETION, _B_GPU,
)  # fmt: skip
# ``FIGURE_LINES % (request_id, prompt, completion, *divmod(gpu_us, MICROS),
# *divmod(marginal, NANOS_PER_USD), *divmod(loaded, NANOS_PER_USD))``: both prices >= 0.
FIGURE_LINES = _LINES_HEAD + b"%b: %%d.%%09d\r\n%b: %%d.%%09d\r\n" % (_B_COST, _B_LOADED)
_SIGNED_LINES = _LINES_HEAD + b"%b: %%b\r\n%b: %%b\r\n" % (_B_COST, _B_LOADED)
CACHED_LINE = _B_CACHED + b": %d\r\n"  # % cached prompt tokens, when not 0
# The names of FIGURE_LINES and CACHED_LINE in their order, for ``metering.native``.
FIGURE_NAMES = (_B_REQUEST_ID, _B_PROMPT, _B_COMPLETION, _B_GPU, _B_COST, _B_LOADED, _B_CACHED)
_SAVED_LINE = _B_SAVED + b": %b\r\n"


def header_pairs(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Finished head lines (``RequestReport.head_lines``) as ASGI header pairs (name, value)."""
    pairs = []
    for line in lines.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b": ")
        pairs.append((name, value))
    return pairs


def _nanos_bytes(nanos: int) -> bytes:
    """``fmt_nanos(nanos)`` as header bytes, formatted as bytes directly."""
    if nanos < 0:
        return fmt_nanos(nanos).encode("latin-1")
    return b"%d.%09d" % divmod(nanos, NANOS_PER_USD)


def to_micros(seconds: float) -> int:
    """Whole micro-units of ``seconds``, rounded; 0 for NaN or an infinity (never raises)."""
    try:
        return round(seconds * MICROS)
    except (ValueError, OverflowError):  # NaN, inf: a bug upstream must not fail a request
        return 0


class RequestReport(NamedTuple):
    # gateway/meter.py builds this from one tuple in field order (``report_of``): keep it.

    request_id: str
    tenant: str
    tier: str
    model: str
    operation: str
    usage: TokenUsage = NO_USAGE
    gpu_us: int = 0  # micro-GPU-seconds, every attempt's share
    cost: Cost = NO_COST
    cache: str = "miss"  # miss | hit | bypass | coalesced | replay
    saved_nanos: int = 0  # what a free answer (``cache`` in FREE) would have cost
    replica: str = ""  # the last attempt's vLLM replica; "" when none was reached
    attempts: int = 0
    status: int = 200
    finished_us: int = 0  # Unix time in whole micro-seconds
    duration_s: float = 0.0  # arrival to last byte
    ttft_s: float | None = None  # arrival to first token (streams)
    finish_reasons: tuple[str, ...] = ()  # these two only span attributes read: a
    response_id: str | None = None  # non-streamed answer fills them only when traced
    error_type: str | None = None

    @property
    def gpu_seconds(self) -> float:
        return self.gpu_us / MICROS

    @property
    def free(self) -> bool:
        """Served without running the model: a cache hit, a coalesced answer, a replay."""
        return self.cache in FREE

    @property
    def saved(self) -> Decimal | None:
        """What a free answer would have cost (None for any other)."""
        return from_nanos(self.saved_nanos) if self.cache in FREE else None

    def figures(self) -> dict[str, str]:
        """The numbers, by short name: header suffixes and the stream object's keys."""
        n = len(HEADER_PREFIX)
        return {name[n:]: value for name, value in self.headers().items()}

    def headers(self) -> dict[str, str]:
        """Every ``x-tollway-*`` header of the report: tier and model, then ``raw_headers``."""
        out = {_H_TIER: self.tier, _H_MODEL: self.model}
        for name, value in self.raw_headers():
            out[name.decode("latin-1")] = value.decode("latin-1")
        return out

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The figures' headers as ASGI header pairs (``head_lines``, split).

        Tier and model are not among them: a routed response carries those
        already (``headers()`` has all of them).
        """
        return header_pairs(self.head_lines())

    def head_lines(self) -> bytes:
        """The figures' headers as finished HTTP head lines, each ending in CRLF.

        The hot path's form (``gateway.head_lines``): one bytes formatting for
        all of them. Tier and model are not among them (see ``raw_headers``).
        """
        usage = self.usage
        cost = self.cost
        marginal, loaded = cost.marginal_nanos, cost.loaded_nanos
        if marginal >= 0 and loaded >= 0:
            lines = FIGURE_LINES % (
                self.request_id.encode("latin-1"), usage[0], usage[1],
                *divmod(self.gpu_us, MICROS),
                *divmod(marginal, NANOS_PER_USD), *divmod(loaded, NANOS_PER_USD),
            )  # fmt: skip
        else:  # a negative price is a bug upstream, spelled as such rather than hidden
            lines = _SIGNED_LINES % (
                self.request_id.encode("latin-1"), usage[0], usage[1],
                *divmod(self.gpu_us, MICROS), _nanos_bytes(marginal), _nanos_bytes(loaded),
            )  # fmt: skip
        if usage[2]:
            lines += CACHED_LINE % usage[2]
        if self.cache in FREE:
            lines += _SAVED_LINE % _nanos_bytes(self.saved_nanos)
        return lines

    def stream_object(self) -> dict[str, Any]:
        """The ``tollway`` object put beside ``usage`` in a stream's final data event."""
        return {
            "request_id": self.request_id,
            "tier": self.tier,
            "model": self.model,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "cached_prompt_tokens": self.usage.cached_prompt_tokens,
            "gpu_seconds": self.gpu_seconds,  # six decimals: whole micro-GPU-seconds
            "cost_usd": fmt_nanos(self.cost.marginal_nanos),
            "cost_loaded_usd": fmt_nanos(self.cost.loaded_nanos),
            "cost_saved_usd": fmt_nanos(self.saved_nanos) if self.cache in FREE else None,
            "cache": self.cache,
        }


# RequestReport((field, ...)) without the Python-level ``__new__``: the hot path's.
report_of: Callable[[tuple[Any, ...]], RequestReport] = partial(tuple.__new__, RequestReport)

# A report's summed figures as C-level getters, one report at a time (the ledger's
# text path checks each): tokens (prompt, completion, cached), micro-GPU-seconds,
# nano-dollars (marginal, loaded, saved), in this order, which
# ``metering.batch.Columns.figures`` keeps for a batch's columns.
FIGURES = tuple(
    attrgetter(name)
    for name in (
        "usage.prompt_tokens", "usage.completion_tokens", "usage.cached_prompt_tokens",
        "gpu_us", "cost.marginal_nanos", "cost.loaded_nanos", "saved_nanos",
    )
)  # fmt: skip

# A report is a tuple: its fields' positions, for ``itemgetter``s (``metering.batch``).
FIELD = {name: index for index, name in enumerate(RequestReport._fields)}
