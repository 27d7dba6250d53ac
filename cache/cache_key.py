"""The response cache's key: which requests are the same request, and which are deterministic.

``cache_digest`` is the SHA-256 (hex, 64 characters) of one canonical JSON
document (orjson, keys sorted at every level)::

    {"v": KEY_VERSION, "tenant": ..., "model": <resolved model>,
     "endpoint": "chat.completions" | "completions", "body": <body minus IGNORED_FIELDS>}

The tenant, model and endpoint are fields of their own beside the body, so
no request body (not even one with a ``tenant`` field) can produce another
tenant's digest: tenants can neither read nor poison each other's entries.

Every body field is kept except the documented ``IGNORED_FIELDS``, the ones
that cannot change the generated output. A field the gateway does not know
is kept: vLLM takes dozens of extra sampling parameters (``top_k``,
``min_p``, ``repetition_penalty``, ``structured_outputs``,
``chat_template_kwargs``...) and new ones arrive with each release; a
needless miss costs one upstream call, a wrong hit serves a wrong answer.
For the same reason nothing is normalised: values are hashed as sent, so
``0`` and ``0.0``, or ``null`` and an absent field, give different keys.

``is_deterministic`` is the ``deterministic`` tier policy's test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

KEY_VERSION = 1
"""Bump when the canonical form changes, so old entries stop matching instead of lying."""

IGNORED_FIELDS = frozenset(
    {
        # Framing only: a hit is served as JSON or replayed as SSE either way.
        "stream",
        "stream_options",  # include_usage, continuous_usage_stats: where usage is shown
        # Replaced by the resolved model, a separate part of the key: "auto" routed
        # to a model and that model asked for by name are the same request.
        "model",
        # Labels for the caller's bookkeeping and abuse monitoring, never seen by the model.
        "user",
        "safety_identifier",  # OpenAI's successor to ``user``
        "metadata",
        "store",  # OpenAI stored completions
        "request_id",  # vLLM: the id vLLM logs the request under
        # Scheduling and provider-side prefix caching: when and how fast, not what.
        "service_tier",
        "priority",  # vLLM priority scheduling
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
    }
)
"""Body fields left out of the key: none of them changes the generated output.

Deliberately kept (they look like bookkeeping but are not): ``n``, ``logprobs``
and ``top_logprobs`` (they change the response), ``moderation`` (can block
output), ``cache_salt`` (vLLM: the client asked for isolation, so it gets
its own entries too), ``kv_transfer_params`` (per request: such requests
simply miss).
"""


def cache_digest(tenant: str, model: str, endpoint: str, body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical request: tenant, resolved model, endpoint and output fields.

    ``body`` is the client's JSON as orjson parsed it (so every integer fits
    in 64 bits; orjson cannot serialise a bigger one and raises TypeError).
    The gateway's own rewrites of ``model`` and ``stream_options`` do not
    matter, both are left out.
    """
    canonical = {
        "v": KEY_VERSION,
        "tenant": tenant,
        "model": model,
        "endpoint": endpoint,
        "body": {name: value for name, value in body.items() if name not in IGNORED_FIELDS},
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """Temperature 0, or a seed given: the request asks for a reproducible answer.

    An absent temperature is OpenAI's default of 1 (sampled), so a request
    with neither is not deterministic. ``n`` does not matter: ``n=2`` at
    temperature 0 still asks for the same answers every time.
    """
    temperature = body.get("temperature")
    if _is_number(temperature) and temperature == 0:
        return True
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def _is_number(value: Any) -> bool:
    # bool is an int: ``"temperature": false`` is not a temperature.
    return isinstance(value, int | float) and not isinstance(value, bool)
