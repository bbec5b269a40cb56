"""Attention contexts: packed causal prefill, and decode over paged block tables.

Both use torch's scaled_dot_product_attention, which runs on CPU and CUDA.
A context is built once per forward and passed to the model explicitly.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from engine.kv_cache import KVPool

# (layer, k [T, KVH, D], v [T, KVH, D]) for all packed tokens of a prefill batch.
KVSink = Callable[[int, torch.Tensor, torch.Tensor], None]


class PrefillAttention:
    """Causal attention over sequences packed back to back, no padding.

    Each layer's K/V (after RoPE) is handed to `kv_sink` before attention runs,
    so a transfer of layer i can overlap the compute of layer i+1.
    """

    def __init__(self, seq_lens: list[int], kv_sink: KVSink | None = None) -> None:
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for n in seq_lens:
            self.bounds.append((start, start + n))
            start += n
        self.kv_sink = kv_sink

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_sink is not None:
            self.kv_sink(layer, k, v)
        if len(self.bounds) == 1:
            return _causal(q, k, v)
        out = torch.empty_like(q)
        for s, e in self.bounds:
            out[s:e] = _causal(q[s:e], k[s:e], v[s:e])
        return out


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [L, H, D] -> [1, H, L, D]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        is_causal=True, enable_gqa=True,
    )
    return o.squeeze(0).transpose(0, 1)


class PagedDecodeAttention:
    """One new token per sequence, attending to its whole cache through its block table.

    The new token's K/V are written into the pool first (at `slots`), then
    each sequence's blocks are gathered block-wise (contiguous copies of
    BS*KVH*D values) and masked beyond its context length.
    """

    def __init__(self, pool: KVPool, slots: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor) -> None:
        # slots: [B]; block_tables: [B, MB] (padded with any valid block id); context_lens: [B]
        self.pool = pool
        self.slots = slots
        self.flat_tables = block_tables.reshape(-1)
        b, mb = block_tables.shape
        bs = pool.layout.block_size
        self.shape = (b, mb * bs, pool.layout.num_kv_heads, pool.layout.head_dim)
        positions = torch.arange(mb * bs, device=context_lens.device)
        self.mask = (positions[None, :] < context_lens[:, None]).view(b, 1, 1, mb * bs)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pool.write_tokens(layer, self.slots, k, v)
        cache = self.pool.tensor[layer]
        keys = cache[0].index_select(0, self.flat_tables).view(self.shape).transpose(1, 2)  # [B, KVH, L, D]
        values = cache[1].index_select(0, self.flat_tables).view(self.shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=self.mask, enable_gqa=True)
        return o.squeeze(2)  # [B, H, D]
