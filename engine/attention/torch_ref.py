"""The reference backend: plain torch ops on any device. Slow where it loops over sequences,
exact where it matters (the oracle every kernel is tested against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, VarlenBatch
from engine.kv_quant import dequantize_kv


def _load(cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Blocks [n, BS, KVH, D] of one layer's K (or V) in `dtype`; an int8 cache is dequantized."""
    data = cache.index_select(0, blocks)
    return data if scales is None else dequantize_kv(data, scales.index_select(0, blocks), dtype)


def gather_prefix(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, length: int,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached tokens of one sequence: [length, KVH, D] each (`dtype` for an int8 cache)."""
    _, bs, kvh, d = k_cache.shape
    blocks = table[: -(-length // bs)].long()
    keys = _load(k_cache, k_scale, blocks, dtype).reshape(-1, kvh, d)[:length]
    values = _load(v_cache, v_scale, blocks, dtype).reshape(-1, kvh, d)[:length]
    return keys, values


def causal_with_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """q [n, H, D] at positions prefix..prefix+n-1; k, v [prefix + n, KVH, D]. -> [n, H, D]."""
    n, total = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    if prefix == 0:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)


def torch_paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Gather each sequence's blocks into a padded tensor (dequantized from an int8 pool), mask, SDPA."""
    b, mb = block_tables.shape
    _, bs, kvh, d = k_pool.shape
    flat = block_tables.reshape(-1).long()
    keys = _load(k_pool, k_scale, flat, q.dtype).view(b, mb * bs, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
    values = _load(v_pool, v_scale, flat, q.dtype).view(b, mb * bs, kvh, d).transpose(1, 2)
    mask = (torch.arange(mb * bs, device=q.device)[None, :] < context_lens[:, None]).view(b, 1, 1, mb * bs)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)


class TorchBackend(AttentionBackend):
    name = "torch"

    def varlen_prefill(self, q, k, v, batch: VarlenBatch, k_cache, v_cache, scale, k_scale=None, v_scale=None):
        if len(batch.q_lens) == 1 and not batch.has_prefix:
            return causal_with_prefix(q, k, v, 0, scale)
        out = torch.empty_like(q)
        start = 0
        for i, (n, prefix) in enumerate(zip(batch.q_lens, batch.prefix_lens_host)):
            qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
            if prefix:
                pk, pv = gather_prefix(k_cache, v_cache, batch.block_tables[i], prefix, k_scale, v_scale, q.dtype)
                ks, vs = torch.cat([pk, ks]), torch.cat([pv, vs])
            out[start:start + n] = causal_with_prefix(qs, ks, vs, prefix, scale)
            start += n
        return out

    def paged_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale, k_scale=None, v_scale=None):
        return torch_paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale)
