"""Serving one completion request, for both endpoints, start to finish.

`serve` counts the request, validates it, applies the fault decided for it,
turns it into engine sequences (one per prompt and per `n`), and answers with a
full body here or an SSE stream through `sim.streaming`. Whatever happens, its
sequences are aborted on the way out, so a client that disconnects frees its
batch slots immediately.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from sim.conn import ClientGone, Outcome, drop_connection, unread, wait_watching
from sim.engine import Sequence
from sim.faults import Fault
from sim.kvcache import block_hashes
from sim.protocol import (
    SAMPLING_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    Kind,
    SimError,
    decode_json,
    validate_request,
)
from sim.responses import Shaper
from sim.state import ENDPOINTS, SIM_STATE, SimState
from sim.streaming import stream
from sim.textgen import render_chat, request_key, tokenize


def _error(exc: SimError) -> web.Response:
    return web.Response(body=exc.body(), status=exc.status, content_type="application/json")


async def serve(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    stats = state.stats
    stats.received[ENDPOINTS[kind]] += 1
    stats.in_flight += 1
    # A cancellation (the client went away under handler_cancellation) leaves this outcome.
    outcome = Outcome.ABORTED
    try:
        response, outcome = await _serve(request, state, kind)
        return response
    finally:
        stats.in_flight -= 1
        stats.count(outcome.value)


async def _serve(
    request: web.Request, state: SimState, kind: Kind
) -> tuple[web.StreamResponse, Outcome]:
    cfg = state.config
    body = await request.read()
    try:
        raw = decode_json(body)
    except SimError as exc:
        state.record(ENDPOINTS[kind], request.headers, body.decode(errors="replace"))
        return _error(exc), Outcome.REJECTED
    state.record(ENDPOINTS[kind], request.headers, raw)
    try:
        req = validate_request(kind, raw)
        _check_model(state, req)
        prompts = _prompts(req, raw)
        for _, tokens in prompts:
            _check_length(len(tokens), req.limit(), cfg.max_model_len)
    except SimError as exc:
        return _error(exc), Outcome.REJECTED

    faults = state.faults.settings
    if faults.added_latency_ms:
        await asyncio.sleep(faults.added_latency_ms / 1000.0)
    fault = state.faults.decide()
    if fault is Fault.ERROR:
        injected = SimError("Simulated failure (fault injection)", faults.error_status)
        return _error(injected), Outcome.FAILED
    if fault is Fault.HANG:
        state.stats.hung += 1
        try:
            await wait_watching(state.stopping, request)
        except ClientGone:
            return unread(), Outcome.ABORTED
        drop_connection(request)
        return unread(), Outcome.DROPPED

    seqs = _sequences(state, req, raw, prompts)
    engine = state.engine
    for seq in seqs:
        engine.add(seq)
    shaper = Shaper(
        kind,
        state.new_id("chatcmpl" if kind == "chat" else "cmpl"),
        int(time.time()),
        cfg.model_name,
        sum(len(tokens) for _, tokens in prompts),
    )
    die_after = faults.die_after_tokens if fault is Fault.DIE else None
    try:
        if req.stream:
            return await stream(request, state, req, shaper, seqs, die_after)
        return await _complete(request, state, shaper, seqs, die_after)
    except ClientGone:
        return unread(), Outcome.ABORTED
    finally:
        for seq in seqs:
            engine.abort(seq)  # a no-op for finished sequences


def _check_model(state: SimState, req: GenerationRequest) -> None:
    if req.model not in state.served_models:
        raise SimError(f"The model `{req.model}` does not exist.", 404, "model")


def _prompts(req: GenerationRequest, raw: dict[str, Any]) -> list[tuple[Any, list[Any]]]:
    """(what identifies the prompt, its tokens) for each prompt of the request."""
    if isinstance(req, ChatCompletionRequest):
        messages = raw["messages"]
        return [(messages, render_chat(messages))]
    assert isinstance(req, CompletionRequest)
    out: list[tuple[Any, list[Any]]] = []
    for prompt in req.prompts():
        tokens: list[Any] = tokenize(prompt) if isinstance(prompt, str) else prompt
        if not tokens:
            raise SimError("Prompt cannot be empty", 400, "prompt")
        out.append((prompt, tokens))
    return out


def _check_length(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    # The same two checks, and messages, as vLLM's OpenAIServing._validate_input.
    if prompt_tokens >= max_model_len:
        raise SimError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt_tokens} input tokens. Please reduce the length of the "
            "input messages.",
            400,
            "input_tokens",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise SimError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
            f"model's maximum context length is {max_model_len} tokens and your request has "
            f"{prompt_tokens} input tokens ({max_tokens} > {max_model_len} - {prompt_tokens}).",
            400,
            "max_tokens",
        )


def _sequences(
    state: SimState,
    req: GenerationRequest,
    raw: dict[str, Any],
    prompts: list[tuple[Any, list[Any]]],
) -> list[Sequence]:
    cfg = state.config
    sampling = {name: raw[name] for name in SAMPLING_FIELDS if name in raw}
    listener = asyncio.Event()
    seqs: list[Sequence] = []
    for identity, tokens in prompts:
        key = request_key([cfg.model_name, identity, sampling])
        hashes = block_hashes(tokens, cfg.block_size)
        for index in range(req.n):
            plan = state.textgen.plan(
                key,
                index,
                room=cfg.max_model_len - len(tokens),
                max_tokens=req.limit(),
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos,
            )
            seqs.append(Sequence(len(tokens), hashes, plan.tokens, plan.finish_reason, listener))
    return seqs


async def _complete(
    request: web.Request,
    state: SimState,
    shaper: Shaper,
    seqs: list[Sequence],
    die_after: int | None,
) -> tuple[web.StreamResponse, Outcome]:
    listener = seqs[0].listener
    while True:
        listener.clear()
        if die_after is not None and (
            sum(s.generated for s in seqs) >= die_after or all(s.done for s in seqs)
        ):
            drop_connection(request)
            return unread(), Outcome.DROPPED
        if all(s.done for s in seqs):
            break
        await wait_watching(listener, request)
    completion = sum(s.generated for s in seqs)
    body = shaper.full([("".join(s.output), s.finish_reason or "") for s in seqs], completion)
    state.stats.prompt_tokens += shaper.prompt_tokens
    state.stats.completion_tokens += completion
    return web.Response(body=body, content_type="application/json"), Outcome.FINISHED
