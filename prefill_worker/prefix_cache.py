"""The prefill worker's prefix cache: its own paged KV pool, kept between batches.

A batch's prompts are allocated in the pool (sharing the leading full blocks an earlier prompt
left there), only the uncached suffix is computed (`ModelRunner.extend` attends to the cached
prefix through the block tables and stores the new K/V in the pool), and afterwards the prompts'
full blocks get their keys and are released into the pool's LRU for later batches.

A batch with no hit at all costs what caching off costs: the plain packed prefill runs, and the
pool keeps only the rows a later prompt can reuse, those of full blocks (`full_block_writer`).

    prompt i:   [ cached prefix: p_i tokens | computed: len_i - p_i tokens ]
    sent:                 [ from cached_blocks * BS on: what the decode worker lacks ]

What is sent may start inside the cached prefix (the decode worker lacks blocks this pool holds:
read back from the pool) or inside the computed part (the decode worker holds more than we do).
"""

from __future__ import annotations

import torch

from engine.attention import KVSink
from engine.kv_cache import BlockManager, KVPool
from engine.runner import ModelRunner, token_slots


class PrefillCache:
    def __init__(self, runner: ModelRunner, gib: float, salt: str) -> None:
        probe = runner.kv_layout(num_blocks=1)
        num_blocks = max(1, int(gib * 2**30) // probe.nbytes)
        self.layout = runner.kv_layout(num_blocks=num_blocks)
        self.pool = KVPool.allocate(self.layout, runner.config.device)
        self.blocks = BlockManager(num_blocks, self.layout.block_size, enable_prefix_caching=True, salt=salt)
        self.hit_tokens = 0
        self.prompt_tokens = 0

    def allocate(self, ids: list[str], prompts: list[list[int]]) -> list[int] | None:
        """Hold blocks for every prompt; return each one's cached tokens (at least one token is left
        to compute: its logits give the first token). None, holding nothing, if the batch does not fit."""
        bs = self.layout.block_size
        cached = []
        for rid, prompt in zip(ids, prompts):
            max_shared = (len(prompt) - 1) // bs
            if not self.blocks.can_allocate(len(prompt), prompt, max_shared):
                self.release(ids)
                return None
            self.blocks.allocate(rid, len(prompt), prompt, max_shared)
            cached.append(self.blocks.shared_blocks(rid) * bs)
        self.hit_tokens += sum(cached)
        self.prompt_tokens += sum(len(p) for p in prompts)
        return cached

    def tables(self, ids: list[str]) -> list[list[int]]:
        return [self.blocks.table(rid) for rid in ids]

    def full_block_writer(self, prompts: list[list[int]], tables: list[list[int]]) -> KVSink:
        """A KV sink for a plain packed prefill of `prompts` (allocated here, nothing cached): stores each
        prompt's full blocks into the pool, the only rows `commit` keys; a partial last block is never read."""
        bs = self.layout.block_size
        rows: list[int] = []
        slots: list[int] = []
        start = 0
        for prompt, table in zip(prompts, tables):
            full = len(prompt) // bs * bs
            rows += range(start, start + full)
            slots += token_slots(table, full, bs)
            start += len(prompt)
        device = self.pool.device
        row_index = torch.tensor(rows, dtype=torch.long, device=device)
        slot_index = torch.tensor(slots, dtype=torch.long, device=device)

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if len(rows) == start:  # every prompt block-aligned: no gather
                self.pool.write_tokens(layer, slot_index, k, v)
            elif rows:
                self.pool.write_tokens(layer, slot_index, k.index_select(0, row_index), v.index_select(0, row_index))

        return write

    def cached_rows(self, layer: int, table: list[int], start: int,
                    end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """K, V [end - start, KVH, D] of tokens [start, end) of a prompt held in this pool (block-aligned), as
        stored, and for an int8 pool their scales [end - start, KVH] (else None): shipped as they are."""
        bs = self.layout.block_size
        ids = torch.tensor(table[start // bs:end // bs], device=self.pool.device)
        k, v = self.pool.read_blocks(layer, ids)
        spec = self.layout.layer(layer)
        shape = (-1, spec.num_kv_heads, spec.head_dim)
        if not self.layout.quantized:
            return k.reshape(shape), v.reshape(shape), None, None
        ks, vs = self.pool.read_block_scales(layer, ids)
        return k.reshape(shape), v.reshape(shape), ks.reshape(shape[:2]), vs.reshape(shape[:2])

    def commit(self, ids: list[str], prompts: list[list[int]]) -> None:
        """The batch's KV is in the pool: key its full blocks for later requests and drop our references."""
        for rid, prompt in zip(ids, prompts):
            self.blocks.register(rid, prompt)
        self.release(ids)

    def release(self, ids: list[str]) -> None:
        for rid in ids:
            self.blocks.free(rid)
