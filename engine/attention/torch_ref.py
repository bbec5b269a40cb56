"""The reference backend: plain torch ops on any device. Slow where it loops over sequences,
exact where it matters (the oracle every kernel is tested against).

A sliding window or a softcap goes through `masked_attention` (scores, mask, float32 softmax: what
transformers' eager attention computes); plain causal attention keeps SDPA."""

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
                  dtype: torch.dtype = torch.float32, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached tokens [start, length) of one sequence: [length - start, KVH, D] each (`dtype` for an int8 cache).
    Blocks wholly before `start` are not read (they may be freed: -1 in the table)."""
    _, bs, kvh, d = k_cache.shape
    first = start // bs
    blocks = table[first: -(-length // bs)].long()
    lo, hi = start - first * bs, length - first * bs
    keys = _load(k_cache, k_scale, blocks, dtype).reshape(-1, kvh, d)[lo:hi]
    values = _load(v_cache, v_scale, blocks, dtype).reshape(-1, kvh, d)[lo:hi]
    return keys, values


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
    """q [B, H, M, D], k/v [B, KVH, N, D], mask [B or 1, 1, M, N] (True: attend) -> [B, H, M, D].
    Scores in q's dtype, capped, masked, softmax in float32: transformers' eager attention."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def causal_with_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float,
                       window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [n, H, D] at positions prefix..prefix+n-1; k, v [prefix + n, KVH, D] from position 0 (or, with a
    window, the keys from position prefix + n - len(k) on). -> [n, H, D]."""
    n, total = q.shape[0], k.shape[0]
    first_key = prefix + n - total  # position of k[0]
    qh, kh, vh = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    if window is None and softcap is None and first_key == 0:
        if prefix == 0:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)
    qpos = torch.arange(prefix, prefix + n, device=q.device)[:, None]
    kpos = torch.arange(first_key, prefix + n, device=q.device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return masked_attention(qh, kh, vh, mask[None, None], scale, softcap).squeeze(0).transpose(0, 1)


def torch_paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None, *, window: int | None = None,
                       softcap: float | None = None) -> torch.Tensor:
    """Gather each sequence's blocks into a padded tensor (dequantized from an int8 pool), mask, attend.
    Table entries outside the window may be -1 (freed): they are read as block 0 and masked."""
    b, mb = block_tables.shape
    _, bs, kvh, d = k_pool.shape
    flat = block_tables.reshape(-1).long().clamp_min(0)
    keys = _load(k_pool, k_scale, flat, q.dtype).view(b, mb * bs, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
    values = _load(v_pool, v_scale, flat, q.dtype).view(b, mb * bs, kvh, d).transpose(1, 2)
    pos = torch.arange(mb * bs, device=q.device)[None, :]
    mask = pos < context_lens[:, None]
    if window is not None:
        mask &= pos >= context_lens[:, None] - window
        # Slots before the window may hold anything (a freed block, reused): zeros, so 0 * NaN cannot leak in.
        keep = mask.view(b, 1, mb * bs, 1)
        keys, values = keys.where(keep, 0), values.where(keep, 0)
    mask = mask.view(b, 1, 1, mb * bs)
    if window is None and softcap is None:
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
    else:
        o = masked_attention(q.unsqueeze(2), keys, values, mask, scale, softcap)
    return o.squeeze(2)


class TorchBackend(AttentionBackend):
    name = "torch"

    def varlen_prefill(self, q, k, v, batch: VarlenBatch, k_cache, v_cache, scale, k_scale=None, v_scale=None, *,
                       window=None, softcap=None):
        if len(batch.q_lens) == 1 and not batch.has_prefix:
            return causal_with_prefix(q, k, v, 0, scale, window, softcap)
        out = torch.empty_like(q)
        start = 0
        for i, (n, prefix) in enumerate(zip(batch.q_lens, batch.prefix_lens_host)):
            qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
            if prefix:
                first = 0 if window is None else max(0, prefix - window + 1)  # the first query's oldest key
                pk, pv = gather_prefix(k_cache, v_cache, batch.block_tables[i], prefix, k_scale, v_scale, q.dtype,
                                       start=first)
                ks, vs = torch.cat([pk, ks]), torch.cat([pv, vs])
            out[start:start + n] = causal_with_prefix(qs, ks, vs, prefix, scale, window, softcap)
            start += n
        return out

    def paged_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale, k_scale=None, v_scale=None, *,
                     window=None, softcap=None):
        return torch_paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                  window=window, softcap=softcap)
