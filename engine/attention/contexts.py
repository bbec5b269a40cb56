"""Attention contexts: what one forward needs to know about where K/V come from and go.

A context is built once per forward and passed to the model explicitly (no global state); each
layer's call carries its AttentionSpec (scale, sliding window, softcap):

    PrefillAttention      packed prompts, no pool: K/V go to a sink (the KV transfer)
    ExtendAttention       new tokens of sequences that already hold a cached prefix in a pool
                          (prefix-cached prefill, speculative verification, chunked prefill)
    PagedDecodeAttention  one new token per sequence over its paged cache
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention.base import AttentionBackend, AttentionSpec, VarlenBatch
from engine.attention.torch_ref import TorchBackend
from engine.kv_cache import KVPool
from engine.kv_quant import dequantize_kv, quantize_kv

# (layer, k [T, KVH, D], v [T, KVH, D]) for all packed tokens of a prefill batch.
KVSink = Callable[[int, torch.Tensor, torch.Tensor], None]


class PrefillAttention:
    """Causal attention over sequences packed back to back, no padding, no pool.

    Each layer's K/V (after RoPE) is handed to `kv_sink` before attention runs,
    so a transfer of layer i can overlap the compute of layer i+1.
    """

    def __init__(self, seq_lens: list[int], kv_sink: KVSink | None = None,
                 backend: AttentionBackend | None = None, device: torch.device | str = "cpu") -> None:
        self.batch = VarlenBatch.build(seq_lens, device=device)
        self.kv_sink = kv_sink
        self.backend = backend or TorchBackend()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               spec: AttentionSpec) -> torch.Tensor:
        if self.kv_sink is not None:
            self.kv_sink(layer, k, v)
        return self.backend.varlen_prefill(q, k, v, self.batch, None, None, spec.scale, window=spec.window,
                                           softcap=spec.softcap)


class ExtendAttention:
    """New tokens appended to sequences whose first prefix_lens[i] tokens are already in `pool`.

    The new tokens' K/V are stored at `slots` (so later steps read them from the pool) and handed
    to `kv_sink` if one is given; attention reads the prefix through the block tables. With an int8
    pool the new tokens are attended to as stored (quantized and back), as a decode step would read
    them: speculative verification then scores a draft exactly as plain decoding would."""

    def __init__(self, pool: KVPool, slots: torch.Tensor, batch: VarlenBatch, backend: AttentionBackend,
                 kv_sink: KVSink | None = None) -> None:
        if batch.has_prefix and batch.block_tables is None:
            raise ValueError("ExtendAttention needs block tables for the cached prefix")
        self.pool, self.slots, self.batch, self.backend, self.kv_sink = pool, slots, batch, backend, kv_sink

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               spec: AttentionSpec) -> torch.Tensor:
        cache, scales = self.pool.layer(layer), self.pool.layer_scales(layer)
        self.backend.store_kv(cache[0], cache[1], self.slots, k, v, *scales)
        if self.kv_sink is not None:
            self.kv_sink(layer, k, v)
        if scales[0] is not None:
            k, v = (dequantize_kv(*quantize_kv(x), x.dtype) for x in (k, v))
        return self.backend.paged_extend(q, k, v, self.batch, cache[0], cache[1], spec.scale, *scales,
                                         window=spec.window, softcap=spec.softcap)


class PagedDecodeAttention:
    """One new token per sequence, attending to its whole cache through its block table.

    The new token's K/V are written into the pool first (at `slots`), then the
    backend reads each sequence's cache through its block table.
    """

    def __init__(self, pool: KVPool, slots: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, backend: AttentionBackend | None = None) -> None:
        # slots: [B]; block_tables: [B, MB] (padding entries are never read); context_lens: [B]
        self.pool, self.slots, self.backend = pool, slots, backend or TorchBackend()
        self.block_tables, self.context_lens = block_tables, context_lens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               spec: AttentionSpec) -> torch.Tensor:
        cache, scales = self.pool.layer(layer), self.pool.layer_scales(layer)
        self.backend.store_kv(cache[0], cache[1], self.slots, k, v, *scales)
        return self.backend.paged_decode(q.contiguous(), cache[0], cache[1], self.block_tables,
                                         self.context_lens, spec.scale, *scales, window=spec.window,
                                         softcap=spec.softcap)
