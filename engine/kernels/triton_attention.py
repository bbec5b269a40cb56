"""Triton attention kernels over the paged pool (CUDA; tested on the CPU under TRITON_INTERPRET=1).

    paged_decode      one query token per sequence, GQA-grouped (all query heads of a KV head share
                      each K/V load) and split-KV (long contexts spread over NUM_SPLITS programs, then
                      merged by log-sum-exp) — the shape of SGLang's decode_attention.py.
    extend_attention  varlen causal attention over a packed batch in one launch; each sequence's
                      new tokens also see its cached prefix, read through its block table.

Per layer: a sliding window W (WINDOW > 0: a query at position p sees keys p - W < j <= p; tiles before
its window are not loaded, so freed blocks, -1 in a table, are never read) and a logit softcap
(SOFTCAP > 0: scores -> c * tanh(s / c) before masking, Gemma 2).

Pool layout (engine/kv_cache.py), one layer's K (or V):  cache[block, slot, kv_head, d]
A token at position p of a sequence lives at block table[p // BS], slot p % BS. An int8 pool
(QUANT) has scales[block, slot, kv_head] float32 beside it: each loaded tile is converted as
q8 * scale to the query's dtype in registers, so only the int8 bytes (and the scales) are read.
Accumulation is float32; fp32 inputs use IEEE dot products (no TF32), so fp32 parity holds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_WINDOW = 1 << 30  # WINDOW when a layer attends to every position


@triton.jit
def _online_step(q, k, v, valid, m_i, l_i, acc, scale, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """One tile of online softmax: scores of q [M, D] against k [N, D], masked by valid [M, N]."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if SOFTCAP > 0:  # c * tanh(s / c), tanh(x) = 2 * sigmoid(2x) - 1
        qk = SOFTCAP * (2.0 * tl.sigmoid(qk * (2.0 / SOFTCAP)) - 1.0)
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(qk - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _paged_kv_tile(K, V, KS, VS, table_row, pos, pmask, kvh, stride_b, stride_s, stride_h, offs_d, dmask,
                   BS: tl.constexpr, KVH: tl.constexpr, QUANT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """K and V of the tokens at positions `pos` of one sequence ([N, D] each, OUT_DTYPE), found through
    its block table row: token p lives at block table[p // BS], slot p % BS. QUANT: int8 data times its
    scale (scales [NB, BS, KVH] contiguous)."""
    blk = tl.load(table_row + pos // BS, mask=pmask, other=0).to(tl.int64)
    off = blk * stride_b + (pos % BS) * stride_s + kvh * stride_h
    kv_mask = pmask[:, None] & dmask[None, :]
    k = tl.load(K + off[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    v = tl.load(V + off[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    if QUANT:
        soff = (blk * BS + pos % BS) * KVH + kvh
        ks = tl.load(KS + soff, mask=pmask, other=0.0)
        vs = tl.load(VS + soff, mask=pmask, other=0.0)
        k = (k.to(tl.float32) * ks[:, None]).to(OUT_DTYPE)
        v = (v.to(tl.float32) * vs[:, None]).to(OUT_DTYPE)
    return k, v


@triton.jit
def _decode_split_kernel(Q, K, V, KS, VS, Tables, Lens, MidO, MidLse, scale, window,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb,
                         G: tl.constexpr, BLOCK_H: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         PRECISION: tl.constexpr, KVH: tl.constexpr, QUANT: tl.constexpr, SOFTCAP: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(Lens + b)
    first = tl.maximum(length - window, 0)  # the oldest key in the window
    split_len = tl.cdiv(tl.cdiv(length - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, length)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask, dmask = offs_h < G, offs_d < D
    heads = kvh * G + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        k, v = _paged_kv_tile(K, V, KS, VS, Tables + b * stride_tb, pos, pmask, kvh, stride_kb, stride_ks,
                              stride_kh, offs_d, dmask, BS, KVH, QUANT, Q.dtype.element_ty)
        m_i, l_i, acc = _online_step(q, k, v, hmask[:, None] & pmask[None, :], m_i, l_i, acc, scale, PRECISION,
                                     SOFTCAP)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
    mid = ((b * NUM_SPLITS + split) * (G * tl.num_programs(1)) + heads)  # [B, S, H] row index
    tl.store(MidO + mid[:, None] * D + offs_d[None, :], out, mask=hmask[:, None] & dmask[None, :])
    tl.store(MidLse + mid, lse, mask=hmask)


@triton.jit
def _decode_merge_kernel(MidO, MidLse, Out, stride_ob, stride_oh, H,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask, dmask = offs_s < NUM_SPLITS, offs_d < D
    rows = (b * NUM_SPLITS + offs_s) * H + h
    lse = tl.load(MidLse + rows, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    o = tl.load(MidO + rows[:, None] * D + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=dmask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_splits(batch: int, kv_heads: int, max_context: int, target_programs: int = 264) -> int:
    """Split-KV factor: enough programs to fill the GPU (~2 per SM on an H100/H200) for small
    batches, never more splits than 256-token pieces of the longest possible context. A pure
    function of static sizes, so a CUDA graph captured for a batch size keeps it."""
    want = triton.next_power_of_2(max(1, -(-target_programs // max(1, batch * kv_heads))))
    by_len = triton.next_power_of_2(max(1, -(-max_context // 256)))
    return max(1, min(want, by_len, 64))


def _scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None,
            v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The scale pointers a kernel gets (any tensor when the cache is not int8) and QUANT."""
    if k_scale is None:
        return k_cache, k_cache, False
    assert k_cache.dtype == torch.int8 and k_scale.is_contiguous() and v_scale.is_contiguous()
    return k_scale, v_scale, True


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [B, H, D]; caches [NB, BS, KVH, D] (int8 with scales [NB, BS, KVH]); block_tables [B, MB];
    context_lens [B] -> [B, H, D]. Each sequence sees its last `window` cached tokens (None: all)."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    g = h // kvh
    splits = num_splits or decode_splits(b, kvh, min(block_tables.shape[1] * bs, window or NO_WINDOW))
    mid_o = torch.empty(b, splits, h, d, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(b, splits, h, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    ks, vs, quant = _scales(k_cache, k_scale, v_scale)
    _decode_split_kernel[(b, kvh, splits)](
        q, k_cache, v_cache, ks, vs, block_tables, context_lens, mid_o, mid_lse, scale, window or NO_WINDOW,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=g, BLOCK_H=max(16, triton.next_power_of_2(g)), BS=bs, D=d, BLOCK_D=block_d, BLOCK_N=32,
        NUM_SPLITS=splits, PRECISION=_precision(q.dtype), KVH=kvh, QUANT=quant, SOFTCAP=float(softcap or 0.0))
    _decode_merge_kernel[(b, h)](mid_o, mid_lse, out, out.stride(0), out.stride(1), h, D=d, BLOCK_D=block_d,
                                 NUM_SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return out


@triton.jit
def _extend_kernel(Q, Kn, Vn, Kc, Vc, KS, VS, CuQ, PrefixLens, Tables, Out, scale, window,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_cb, stride_cs, stride_ch, stride_tb, stride_ot, stride_oh,
                   G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PREFIX: tl.constexpr,
                   PRECISION: tl.constexpr, KVH: tl.constexpr, QUANT: tl.constexpr, SOFTCAP: tl.constexpr):
    b, h, mblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CuQ + b)
    q_len = tl.load(CuQ + b + 1) - q_start
    if mblk * BLOCK_M < q_len:
        kvh = h // G
        offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask, dmask = offs_m < q_len, offs_d < D
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo = mblk * BLOCK_M - window + 1  # the tile's first query sees new tokens from here on (may be < 0)
        if HAS_PREFIX:  # the cached prefix: each new token sees it within its window
            prefix = tl.load(PrefixLens + b)
            for n0 in range(tl.maximum(prefix + lo, 0) // BLOCK_N * BLOCK_N, prefix, BLOCK_N):
                pos = n0 + tl.arange(0, BLOCK_N)
                pmask = (pos < prefix) & (pos >= prefix + lo)  # before it: no query of the tile sees it
                k, v = _paged_kv_tile(Kc, Vc, KS, VS, Tables + b * stride_tb, pos, pmask, kvh, stride_cb,
                                      stride_cs, stride_ch, offs_d, dmask, BS, KVH, QUANT, Q.dtype.element_ty)
                seen = pos[None, :] > prefix + offs_m[:, None] - window
                m_i, l_i, acc = _online_step(q, k, v, mmask[:, None] & pmask[None, :] & seen, m_i, l_i, acc, scale,
                                             PRECISION, SOFTCAP)
        hi = tl.minimum(q_len, (mblk + 1) * BLOCK_M)
        for n0 in range(tl.maximum(lo, 0) // BLOCK_N * BLOCK_N, hi, BLOCK_N):  # the new tokens themselves, causally
            pos = n0 + tl.arange(0, BLOCK_N)
            pmask = pos < q_len
            krow = (q_start + pos).to(tl.int64)
            kv_mask = pmask[:, None] & dmask[None, :]
            k = tl.load(Kn + krow[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(Vn + krow[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            causal = ((pos[None, :] <= offs_m[:, None]) & (pos[None, :] > offs_m[:, None] - window)
                      & pmask[None, :] & mmask[:, None])
            m_i, l_i, acc = _online_step(q, k, v, causal, m_i, l_i, acc, scale, PRECISION, SOFTCAP)
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, max_q_len: int,
                     prefix_lens: torch.Tensor | None, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                     block_tables: torch.Tensor | None, scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, window: int | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] packed by cu_q [B+1]; with a prefix, sequence i first sees its
    prefix_lens[i] cached tokens through block_tables[i] (an int8 cache with its scales), each query only
    the last `window` positions up to its own. -> [T, H, D]."""
    t, h, d = q.shape
    kvh = k.shape[1]
    b = cu_q.shape[0] - 1
    out = torch.empty_like(q)
    has_prefix = prefix_lens is not None
    if not has_prefix:  # unused pointers: any tensor of the right dtype
        prefix_lens, k_cache, v_cache, block_tables = cu_q, k.unsqueeze(0), v.unsqueeze(0), cu_q.view(1, -1)
        k_scale = v_scale = None
    ks, vs, quant = _scales(k_cache, k_scale, v_scale)
    block_m = 64 if max_q_len > 32 else 16
    _extend_kernel[(b, h, triton.cdiv(max_q_len, block_m))](
        q, k, v, k_cache, v_cache, ks, vs, cu_q, prefix_lens, block_tables, out, scale, window or NO_WINDOW,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        G=h // kvh, BS=k_cache.shape[1], D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m,
        BLOCK_N=32, HAS_PREFIX=has_prefix, PRECISION=_precision(q.dtype), KVH=kvh, QUANT=quant,
        SOFTCAP=float(softcap or 0.0))
    return out
