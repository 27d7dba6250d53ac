"""The continuous-batching engine: slots, the waiting queue and the step loop.

Scheduling, as in vLLM's scheduler (FCFS, no chunked prefill):

- `max_num_seqs` slots. A new sequence takes a free slot at once if nobody is
  waiting and its prompt fits in the KV cache; otherwise it joins a FIFO
  waiting queue. `num_requests_running` counts slot holders, `..._waiting` the
  queue, so a caller that never sends more than `max_num_seqs` never sees waiting.
- One loop steps the whole batch. A slot taken during a step joins the batch
  at the next step boundary, where its prefill happens; each step gives every
  sequence in the batch one token (a joining sequence gets its first token at
  the end of its prefill step). A sequence that finishes or is aborted frees
  its slot immediately and the head of the queue takes it.
- When the growing batch no longer fits the KV cache, the most recently
  admitted sequence is preempted (vLLM's recompute mode): it goes back to the
  head of the queue, keeps its generated tokens and re-prefills them later.

Step-time model (all knobs in `SimConfig`):

    step = prefill_tokens_of_joining_seqs / prefill_tokens_per_s
           + decode_base_ms + decode_per_seq_ms * batch_size

so a stream's tokens/s fall and the total tokens/s rise as the batch grows,
like a real GPU engine. Prefix-cache hits are not prefilled. Steps are timed
against an ideal clock so timer overshoot does not slow the simulated engine.

When every cost is zero (`SimConfig.zero_delay`) there is no loop at all: a
sequence is admitted and finished inside `add`, with the same counters and
metrics, which is what makes the simulator cheap enough to feed a load test.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from dataclasses import dataclass

from sim.config import SimConfig
from sim.kvcache import KVCache
from sim.metrics import EngineMetrics

# Past this lag behind the ideal clock (a stalled event loop, or an idle
# engine) the step clock restarts from now instead of trying to catch up.
_MAX_CATCH_UP_S = 0.05


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False, slots=True)
class Sequence:
    """One generation (one choice of one request) as the engine schedules it."""

    prompt_tokens: int
    prefix_hashes: list[int]
    output: list[str]
    natural_finish: str
    listener: asyncio.Event
    """Set whenever the sequence makes progress; shared by a request's sequences."""
    state: SeqState = SeqState.WAITING
    generated: int = 0
    finish_reason: str | None = None
    kv_blocks: int = 0
    arrival: float = 0.0
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.state is SeqState.FINISHED or self.state is SeqState.ABORTED


class Engine:
    def __init__(self, config: SimConfig, metrics: EngineMetrics) -> None:
        self._cfg = config
        self._metrics = metrics
        self._zero = config.zero_delay
        self.kv = KVCache(config.kv_cache_blocks, config.block_size)
        self._running: list[Sequence] = []  # the batch of the current step
        self._joining: list[Sequence] = []  # hold a slot, join at the next step boundary
        self._waiting: deque[Sequence] = deque()
        self._wakeup = asyncio.Event()
        self.max_running_seen = 0
        self.max_waiting_seen = 0

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._joining)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def reset_peaks(self) -> None:
        self.max_running_seen = self.num_running
        self.max_waiting_seen = self.num_waiting

    def add(self, seq: Sequence) -> None:
        seq.arrival = time.monotonic()
        if self._zero:
            self._complete_instantly(seq)
            return
        self._waiting.append(seq)
        self._admit()
        self._wakeup.set()

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is; its slot and KV blocks are free at once."""
        if seq.done:
            return
        if seq.state is SeqState.WAITING:
            self._waiting.remove(seq)
        else:
            (self._running if seq in self._running else self._joining).remove(seq)
            self.kv.release(seq.kv_blocks)
            seq.kv_blocks = 0
        seq.state = SeqState.ABORTED
        seq.finish_reason = "abort"
        seq.finished = time.monotonic()
        self._metrics.request_success["abort"] += 1
        seq.listener.set()
        self._admit()

    async def run(self) -> None:
        """The step loop; runs until cancelled (at app cleanup)."""
        cfg = self._cfg
        ideal = 0.0
        while True:
            if not self._running and not self._joining:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            start = ideal if 0.0 <= now - ideal <= _MAX_CATCH_UP_S else now
            prefill_tokens = self._join_batch(start)
            step_s = (
                prefill_tokens / cfg.prefill_tokens_per_s
                + (cfg.decode_base_ms + cfg.decode_per_seq_ms * len(self._running)) / 1000.0
            )
            ideal = start + step_s
            await asyncio.sleep(ideal - time.monotonic())
            self._end_step(time.monotonic())

    def _join_batch(self, start: float) -> int:
        """Move slot holders into the batch; returns the tokens they must prefill."""
        metrics = self._metrics
        tokens = 0
        for seq in self._joining:
            if seq.scheduled is None:
                seq.scheduled = start
            held = seq.prompt_tokens + seq.generated
            hits = self.kv.match_prefix(seq.prefix_hashes, held)
            metrics.prefix_cache_queries += held
            metrics.prefix_cache_hits += hits
            tokens += held - hits
            self._running.append(seq)
        self._joining = []
        return tokens

    def _end_step(self, now: float) -> None:
        metrics = self._metrics
        kv = self.kv
        still_running: list[Sequence] = []
        for seq in self._running:
            if seq.first_token is None:
                seq.first_token = now
                metrics.prompt_tokens += seq.prompt_tokens
                metrics.ttft.observe(now - seq.arrival)
            seq.generated += 1
            metrics.generation_tokens += 1
            if seq.generated >= len(seq.output):
                kv.release(seq.kv_blocks)
                seq.kv_blocks = 0
                self._finish(seq, now)
            else:
                seq.kv_blocks = kv.resize(seq.kv_blocks, seq.prompt_tokens + seq.generated)
                still_running.append(seq)
            seq.listener.set()
        self._running = still_running
        while kv.used_blocks > kv.total_blocks and self._running:
            self._preempt(self._running.pop())
        self._admit()

    def _preempt(self, seq: Sequence) -> None:
        self.kv.release(seq.kv_blocks)
        seq.kv_blocks = 0
        seq.state = SeqState.WAITING
        self._waiting.appendleft(seq)
        self._metrics.preemptions += 1

    def _admit(self) -> None:
        """Give free slots to the head of the queue, in order, while the KV cache allows."""
        waiting = self._waiting
        max_seqs = self._cfg.max_num_seqs
        while waiting and self.num_running < max_seqs:
            seq = waiting[0]
            held = seq.prompt_tokens + seq.generated
            if not self.kv.fits(held):
                break  # FCFS: nobody overtakes the head of the queue
            waiting.popleft()
            seq.kv_blocks = self.kv.resize(0, held)
            seq.state = SeqState.RUNNING
            self._joining.append(seq)
        self.max_running_seen = max(self.max_running_seen, self.num_running)
        self.max_waiting_seen = max(self.max_waiting_seen, len(waiting))

    def _finish(self, seq: Sequence, now: float) -> None:
        seq.state = SeqState.FINISHED
        seq.finish_reason = seq.natural_finish
        seq.finished = now
        scheduled = seq.scheduled if seq.scheduled is not None else now
        first = seq.first_token if seq.first_token is not None else now
        self._metrics.record_finished(
            seq.natural_finish,
            e2e=now - seq.arrival,
            queue=scheduled - seq.arrival,
            prefill=first - scheduled,
            decode=now - first,
        )

    def _complete_instantly(self, seq: Sequence) -> None:
        # With free steps nothing ever queues, so the sequence runs and finishes
        # here; it still passes through the prefix cache and every counter.
        metrics = self._metrics
        prompt = seq.prompt_tokens
        if seq.prefix_hashes:
            metrics.prefix_cache_hits += self.kv.match_prefix(seq.prefix_hashes, prompt)
        metrics.prefix_cache_queries += prompt
        metrics.prompt_tokens += prompt
        metrics.generation_tokens += len(seq.output)
        metrics.record_instant(seq.natural_finish)
        seq.generated = len(seq.output)
        seq.state = SeqState.FINISHED
        seq.finish_reason = seq.natural_finish
        seq.scheduled = seq.first_token = seq.finished = seq.arrival
        if not self.max_running_seen:
            self.max_running_seen = 1
