"""Writing a completion as Server-Sent Events, the way vLLM streams it.

One `data: {json}` event per generated token (chunks of one engine step are
written together), chat streams opening with a role chunk per choice, the
finish_reason on the last token's chunk, then the optional `choices: []` usage
chunk and `data: [DONE]`. With `continuous_usage_stats` every chunk carries
the choice's cumulative usage. A die-mid-stream fault cuts the connection
after `die_after_tokens` tokens, before `[DONE]`.
"""

from __future__ import annotations

from aiohttp import web

from sim.conn import ClientGone, Outcome, drop_connection, wait_watching
from sim.engine import SeqState, Sequence
from sim.protocol import GenerationRequest
from sim.responses import DONE, Shaper
from sim.state import SimState

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}


async def stream(
    request: web.Request,
    state: SimState,
    req: GenerationRequest,
    shaper: Shaper,
    seqs: list[Sequence],
    die_after: int | None,
) -> tuple[web.StreamResponse, Outcome]:
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    try:
        await resp.prepare(request)
        outcome = await _write_events(request, resp, req, shaper, seqs, die_after)
    except (ClientGone, ConnectionError):
        # Once prepared, the stream itself must be returned, whatever state it is in.
        return resp, Outcome.ABORTED
    if outcome is Outcome.FINISHED:
        state.stats.prompt_tokens += shaper.prompt_tokens
        state.stats.completion_tokens += sum(s.generated for s in seqs)
    return resp, outcome


async def _write_events(
    request: web.Request,
    resp: web.StreamResponse,
    req: GenerationRequest,
    shaper: Shaper,
    seqs: list[Sequence],
    die_after: int | None,
) -> Outcome:
    listener = seqs[0].listener
    continuous = req.continuous_usage
    parts: list[bytes] = []
    if shaper.kind == "chat":
        parts = [shaper.role_chunk(i, continuous) for i in range(len(seqs))]
    emitted = [0] * len(seqs)
    sent = 0
    while True:
        listener.clear()
        for i, seq in enumerate(seqs):
            while emitted[i] < seq.generated:
                if die_after is not None and sent >= die_after:
                    await resp.write(b"".join(parts))
                    drop_connection(request)
                    return Outcome.DROPPED
                pos = emitted[i]
                emitted[i] = pos + 1
                sent += 1
                last = pos + 1 == len(seq.output) and seq.state is SeqState.FINISHED
                finish = seq.finish_reason if last else None
                cumulative = pos + 1 if continuous else None
                parts.append(shaper.token_chunk(i, seq.output[pos], finish, cumulative))
        if parts:
            await resp.write(b"".join(parts))
            parts = []
        if all(s.done for s in seqs):
            break
        if not listener.is_set():
            await wait_watching(listener, request)
    if die_after is not None:
        # Shorter than die_after_tokens: still die, before the usage chunk and [DONE].
        drop_connection(request)
        return Outcome.DROPPED
    if req.include_usage:
        parts.append(shaper.usage_chunk(sent))
    parts.append(DONE)
    await resp.write(b"".join(parts))
    await resp.write_eof()
    return Outcome.FINISHED
