"""Per-request cache controls, with their HTTP meaning, and the decision to look up and store.

Request headers read:

- ``Cache-Control`` (RFC 9111 request directives):
  ``no-cache``: do not answer from the cache, but store the fresh answer;
  ``no-store``: neither look up nor store;
  ``max-age=N``: accept a stored answer at most N seconds old.
  Directive names are case-insensitive, spaces around commas and ``=`` are
  tolerated, values may be quoted (``max-age="60"``) and other directives
  (``no-transform``, ``max-stale``, ``only-if-cached``...) are ignored. A
  ``max-age`` that is not a non-negative whole number is ignored, like a
  directive the cache does not recognise (RFC 9111 section 5.2.3): the
  request is served as if it had not sent it. One above 2^31 counts as 2^31
  (section 1.2.2). Of several ``max-age`` the smallest wins: the most
  restrictive directive is honoured (section 4.2.1).
- ``x-tollway-cache-ttl``: how long to keep this answer, in whole seconds
  (positive; capped at the configured maximum). An invalid value raises
  ``InvalidCacheHeader`` (a ``ValueError`` naming the header) for the
  gateway to answer 400: unlike ``Cache-Control`` it is our own header, and
  silently storing for an hour what the client asked to keep for a minute
  would be worse than refusing.

The response says what happened in ``x-tollway-cache`` (``hit``, ``miss``,
``bypass`` when the cache was not consulted, ``coalesced``) and ``Age`` on a hit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cache.cache_key import is_deterministic

CACHE_CONTROL_HEADER = "cache-control"
TTL_HEADER = "x-tollway-cache-ttl"
STATUS_HEADER = "x-tollway-cache"

Policy = Literal["always", "deterministic", "never"]
MAX_DELTA_SECONDS = 2**31
_MAX_DIGITS = 20  # no int() of a megabyte of digits


class InvalidCacheHeader(ValueError):
    """A cache header the gateway must refuse with a 400; ``header`` names it."""

    def __init__(self, header: str, message: str) -> None:
        super().__init__(message)
        self.header = header


@dataclass(frozen=True, slots=True)
class CacheControl:
    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None  # seconds; None: any age
    ttl_s: int | None = None  # None: the cache's default TTL


@dataclass(frozen=True, slots=True)
class CacheDecision:
    lookup: bool
    store: bool
    reason: str  # policy_never | not_deterministic | no_store | no_cache | cacheable

    @property
    def bypass(self) -> bool:
        """The cache is not consulted: the response says ``x-tollway-cache: bypass``."""
        return not self.lookup


def parse_cache_control(
    cache_control: str | None, cache_ttl: str | None = None, *, max_ttl_s: int
) -> CacheControl:
    """The controls of one request, from its ``Cache-Control`` and ``x-tollway-cache-ttl`` values.

    Several ``Cache-Control`` header lines mean their comma-joined list
    (RFC 9110 section 5.3): pass ``", ".join(headers.getlist("cache-control"))``.
    Raises ``InvalidCacheHeader`` for a bad ``x-tollway-cache-ttl``.
    """
    no_cache = no_store = False
    max_age: int | None = None
    for name, value in _directives(cache_control or ""):
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            seconds = _delta_seconds(value)
            if seconds is not None:
                max_age = seconds if max_age is None else min(max_age, seconds)
    ttl = None if cache_ttl is None else _ttl(cache_ttl, max_ttl_s)
    return CacheControl(no_cache, no_store, max_age, ttl)


def decide(policy: Policy, body: Mapping[str, Any], control: CacheControl) -> CacheDecision:
    """Whether to look the request up and whether to store its answer.

    The tier's policy comes first (``never``, or ``deterministic`` for a
    sampled request: bypass), then the client's ``no-store`` (bypass), then
    its ``no-cache`` (store the fresh answer without looking up).
    """
    if policy == "never":
        return CacheDecision(False, False, "policy_never")
    if policy == "deterministic" and not is_deterministic(body):
        return CacheDecision(False, False, "not_deterministic")
    if control.no_store:
        return CacheDecision(False, False, "no_store")
    if control.no_cache:
        return CacheDecision(False, True, "no_cache")
    return CacheDecision(True, True, "cacheable")


def _directives(header: str) -> Iterator[tuple[str, str | None]]:
    """``(name, value)`` per comma-separated directive; a comma inside quotes separates nothing."""
    for item in _split_outside_quotes(header):
        name, eq, value = item.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        yield name, _unquote(value.strip()) if eq else None


def _split_outside_quotes(header: str) -> Iterator[str]:
    start = 0
    quoted = escaped = False
    for i, char in enumerate(header):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            yield header[start:i]
            start = i + 1
    yield header[start:]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for char in inner:
            if char == "\\" and not escaped:
                escaped = True
                continue
            out.append(char)
            escaped = False
        return "".join(out)
    return value


def _delta_seconds(value: str | None) -> int | None:
    if value is None or not value.isascii() or not value.isdigit():
        return None
    if len(value) > _MAX_DIGITS:
        return MAX_DELTA_SECONDS
    return min(int(value), MAX_DELTA_SECONDS)


def _ttl(raw: str, max_ttl_s: int) -> int:
    digits = raw.strip()
    if digits.isascii() and digits.isdigit():
        significant = digits.lstrip("0")
        if significant:
            return max_ttl_s if len(significant) > _MAX_DIGITS else min(int(significant), max_ttl_s)
    raise InvalidCacheHeader(
        TTL_HEADER,
        f"Invalid value for header '{TTL_HEADER}': expected a positive whole number "
        f"of seconds, got {raw[:40]!r}.",
    )
