"""Metered streams: what the gateway asks vLLM for, and what the client gets back.

The gateway always asks vLLM for ``include_usage`` and
``continuous_usage_stats`` so that every chunk carries the cumulative usage: a
stream the client aborts is still billed for what was generated. The client
gets what it asked for, as OpenAI would send it:

- per-chunk ``usage`` only if it asked for ``continuous_usage_stats``;
- the final usage chunk (``choices: []``) only if it asked for ``include_usage``.

The metered figures ride on the final data event before ``[DONE]``, as a
``tollway`` object beside ``usage``: on the usage chunk when the client asked
for it, otherwise on the last chunk that carries a ``finish_reason`` (held
back until the stream ends, which is the same engine step in vLLM, so it adds
no visible delay). ``model`` is set to the name the request resolved to (vLLM
reports its first served alias). Chunks that need no change are relayed as the
upstream's own bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.sse import CompletionBuilder, event
from metering.usage import StreamUsage

_DATA = b"data: "


def upstream_stream_options(client_options: Any) -> dict[str, Any]:
    """The ``stream_options`` sent to vLLM: the client's, plus usage on every chunk."""
    options = dict(client_options) if isinstance(client_options, dict) else {}
    options["include_usage"] = True
    options["continuous_usage_stats"] = True
    return options


class StreamShaper:
    def __init__(
        self, client_options: Any, model: str, on_first_token: Callable[[], None] = lambda: None
    ):
        self.model = model
        self.on_first_token = on_first_token
        self.builder: CompletionBuilder | None = None  # set to keep the answer for the cache
        options = client_options if isinstance(client_options, dict) else {}
        self.include_usage = bool(options.get("include_usage"))
        self.continuous_usage = bool(options.get("continuous_usage_stats"))
        self.usage = StreamUsage()
        self.finish_reasons: list[str] = []
        self.response_id: str | None = None
        self.first_token_at: float | None = None
        self._held: dict[str, Any] | None = None
        self._usage_chunk: dict[str, Any] | None = None

    def feed(self, raw: bytes) -> list[bytes]:
        """One upstream SSE event in; the events to send the client now out."""
        if not raw.startswith(b"data: {"):
            return [raw]
        chunk = orjson.loads(raw[len(_DATA) :])
        if not isinstance(chunk, dict):
            return [raw]
        self.usage.observe(chunk)
        if self.builder is not None:
            self.builder.add(chunk)  # before the client-facing edits below
        if self.response_id is None:
            self.response_id = chunk.get("id")
        changed = False
        if chunk.get("model") != self.model:  # vLLM reports its first alias
            chunk["model"] = self.model
            changed = True
        choices = chunk.get("choices")
        if not choices:
            if "usage" in chunk:  # the usage-only chunk: sent (or not) at the end
                self._usage_chunk = chunk
                return []
            return [event(chunk) if changed else raw]
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.on_first_token()
        if not self.continuous_usage and "usage" in chunk:
            del chunk["usage"]
            changed = True
        finishing = False
        for choice in choices:
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            if reason:
                self.finish_reasons.append(str(reason))
                finishing = True
        out: list[bytes] = []
        if finishing:
            if self._held is not None:
                out.append(event(self._held))
            self._held = chunk
            return out
        out.append(event(chunk) if changed else raw)
        return out

    def finish(self, tollway: dict[str, Any] | None) -> list[bytes]:
        """The held events, with the ``tollway`` figures on the last one (None: metering
        is off, no figures)."""
        out: list[bytes] = []
        if self.include_usage:
            if self._held is not None:
                out.append(event(self._held))
            final = self._usage_chunk or {
                "id": self.response_id,
                "model": self.model,
                "choices": [],
                "usage": None,
            }
            if tollway is not None:
                final["tollway"] = tollway
            out.append(event(final))
        elif self._held is not None:
            if tollway is not None:
                self._held["tollway"] = tollway
            out.append(event(self._held))
        return out
