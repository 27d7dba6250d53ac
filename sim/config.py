"""Settings of one simulated vLLM server: what it serves and how fast it is.

`SimConfig` is the only input of `sim.app.create_app`. It is a strict pydantic
model (unknown fields are errors) so a typo in a test or in the CLI wiring fails
at start instead of silently running with a default. `FaultSettings` (in
`sim.faults`) is nested here as the faults active at start; it can be changed
at runtime through `/sim/faults`.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sim.faults import FaultSettings

# What `/version` reports: the vLLM release the simulator imitates, with a local
# version label so nobody mistakes it for the real thing.
SIM_VLLM_VERSION = "0.32.0+tollway.sim"


class SimConfig(BaseModel):
    """Everything that shapes the simulator's behaviour; see docs/simulator.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_model_names: list[str] = Field(default_factory=lambda: ["sim-model"], min_length=1)
    """Like vLLM's `--served-model-name a b c`: all are accepted, the first one is
    the name reported in responses and in the `model_name` metrics label."""

    max_num_seqs: int = Field(256, ge=1)
    """Batch slots: sequences decoded together in one engine step (vLLM's default)."""

    max_model_len: int = Field(8192, ge=2)
    """Context window: prompt tokens + max_tokens must fit, else 400."""

    kv_cache_tokens: int = Field(524_288, ge=16)
    """KV cache capacity in tokens; drives `vllm:kv_cache_usage_perc`, admission
    and preemption. Must hold at least one full-length sequence."""

    block_size: int = Field(16, ge=1)
    """KV block size in tokens (vLLM's default); also the prefix-cache granularity."""

    prefill_tokens_per_s: float = Field(20_000.0, gt=0)
    """Prefill speed. `inf` makes prefill free (used by the zero-delay mode)."""

    decode_base_ms: float = Field(8.0, ge=0)
    """Fixed cost of one decode step, whatever the batch size."""

    decode_per_seq_ms: float = Field(0.25, ge=0)
    """Extra step cost per running sequence."""

    output_tokens_min: int = Field(16, ge=1)
    output_tokens_max: int = Field(128, ge=1)
    """Range of the natural (finish_reason "stop") output length when max_tokens
    does not cut it first; the length inside the range is derived from the request hash."""

    seed: int = 0
    """Seeds the output text corpus and the fault RNG."""

    version: str = SIM_VLLM_VERSION

    faults: FaultSettings = Field(default_factory=FaultSettings)

    @model_validator(mode="after")
    def _check_consistent(self) -> SimConfig:
        if self.output_tokens_min > self.output_tokens_max:
            raise ValueError("output_tokens_min must not exceed output_tokens_max")
        if self.kv_cache_tokens < self.max_model_len:
            # vLLM refuses to start in the same situation: one request could never fit.
            raise ValueError("kv_cache_tokens must be at least max_model_len")
        if len(set(self.served_model_names)) != len(self.served_model_names):
            raise ValueError("served_model_names must be distinct")
        return self

    @property
    def model_name(self) -> str:
        """The canonical name: what responses and metrics report."""
        return self.served_model_names[0]

    @property
    def zero_delay(self) -> bool:
        """True when every step costs nothing, so requests complete without the step loop."""
        return (
            self.decode_base_ms == 0
            and self.decode_per_seq_ms == 0
            and math.isinf(self.prefill_tokens_per_s)
        )

    @property
    def kv_cache_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size
