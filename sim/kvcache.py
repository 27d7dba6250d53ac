"""KV-cache occupancy and the prefix cache, in blocks, as vLLM's block manager sees them.

Occupancy: a running sequence holds ceil((prompt + generated + 1) / block_size)
blocks (the +1 is the slot of the token being decoded). `usage` is the held
fraction of the capacity: `vllm:kv_cache_usage_perc`. Sharing of cached prefix
blocks between running sequences is not modelled, so usage is an upper bound.

Prefix cache: full prompt blocks are identified by a chained hash (a block's
hash covers every token before it, as in vLLM), kept in an LRU as large as the
cache. A prefill looks up its leading blocks: hits are free to prefill and are
counted in `vllm:prefix_cache_hits_total`; all prompt tokens are counted in
`vllm:prefix_cache_queries_total`. At least one token is always computed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


def block_hashes(tokens: Sequence[Any], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of a prompt (the tail block is never cached)."""
    hashes: list[int] = []
    prev = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        prev = hash((prev, tuple(tokens[start : start + block_size])))
        hashes.append(prev)
    return hashes


class KVCache:
    def __init__(self, total_blocks: int, block_size: int) -> None:
        self.total_blocks = total_blocks
        self.block_size = block_size
        self.used_blocks = 0
        self._prefix: OrderedDict[int, None] = OrderedDict()

    @property
    def usage(self) -> float:
        return self.used_blocks / self.total_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-(tokens + 1) // self.block_size)

    def fits(self, tokens: int) -> bool:
        return self.used_blocks + self.blocks_for(tokens) <= self.total_blocks

    def resize(self, held_blocks: int, tokens: int) -> int:
        """Grow or shrink a sequence's allocation to cover `tokens`; returns the new size."""
        need = self.blocks_for(tokens)
        self.used_blocks += need - held_blocks
        return need

    def release(self, held_blocks: int) -> None:
        self.used_blocks -= held_blocks

    def match_prefix(self, hashes: list[int], prompt_tokens: int) -> int:
        """Number of prompt tokens served from the cache; caches the prompt's blocks."""
        cache = self._prefix
        hit_blocks = 0
        for h in hashes:
            if h not in cache:
                break
            cache.move_to_end(h)
            hit_blocks += 1
        for h in hashes[hit_blocks:]:
            cache[h] = None
        while len(cache) > self.total_blocks:
            cache.popitem(last=False)
        return max(0, min(hit_blocks * self.block_size, prompt_tokens - 1))

    def clear_prefix_cache(self) -> None:
        self._prefix.clear()
