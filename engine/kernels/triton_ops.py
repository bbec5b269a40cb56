"""Small fused Triton kernels for the CUDA forward (tested on the CPU under TRITON_INTERPRET=1).

    store_kv      a layer's K and V for every token of a batch into their pool slots, one launch
                  (quantized to int8 with a per-token-per-head scale for an int8 pool)
    rms_norm      RMSNorm, optionally fused with the residual add before it
    rope          rotary embedding of q and k in place, cos/sin gathered at each token's position

Each rounds where the torch reference (engine/model/llama.py) rounds, so fp32 results match it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(K, V, Kc, Vc, Slots, stride_kt, stride_vt, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        tl.store(Kc + slot * ROW + offs, tl.load(K + t * stride_kt + offs, mask=mask), mask=mask)
        tl.store(Vc + slot * ROW + offs, tl.load(V + t * stride_vt + offs, mask=mask), mask=mask)


@triton.jit
def _quantize_row(X, Xc, Xs, slot, KVH: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, QMAX: tl.constexpr, INV_QMAX: tl.constexpr, FLOOR: tl.constexpr):
    """One token's row [KVH, D] -> int8 at Xc[slot] and one scale per head at Xs[slot]: the same float32
    ops as engine/kv_quant.quantize_kv (max|x| * (1/127), floor(x / s + 0.5), clamp), so the bits agree."""
    heads, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < KVH) & (offs_d[None, :] < D)
    idx = heads[:, None] * D + offs_d[None, :]
    x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), 1), FLOOR) * INV_QMAX
    # div_rn: IEEE round-to-nearest division, as torch divides two tensors (CUDA's default `/` is approximate)
    qv = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x, s[:, None]) + 0.5), -QMAX), QMAX)
    tl.store(Xc + slot * (KVH * D) + idx, qv.to(tl.int8), mask=mask)
    tl.store(Xs + slot * KVH + heads, s, mask=heads < KVH)


@triton.jit
def _store_kv_int8_kernel(K, V, Kc, Vc, Ks, Vs, Slots, stride_kt, stride_vt, KVH: tl.constexpr, D: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QMAX: tl.constexpr, INV_QMAX: tl.constexpr,
                          FLOOR: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        _quantize_row(K + t * stride_kt, Kc, Ks, slot, KVH, D, BLOCK_H, BLOCK_D, QMAX, INV_QMAX, FLOOR)
        _quantize_row(V + t * stride_vt, Vc, Vs, slot, KVH, D, BLOCK_H, BLOCK_D, QMAX, INV_QMAX, FLOOR)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """k, v [T, KVH, D] (each token's row contiguous) -> caches [NB, BS, KVH, D] at flat slots; slot < 0 skips.
    With scales [NB, BS, KVH] float32 the caches are int8 and each row is quantized on the way in."""
    t, kvh, d = k.shape
    if t == 0:
        return
    assert k.stride(2) == 1 and k.stride(1) == d and v.stride(2) == 1 and v.stride(1) == d
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    if k_scale is None:
        _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), ROW=kvh * d,
                               BLOCK=triton.next_power_of_2(kvh * d))
        return
    from engine.kv_quant import INV_QMAX, QMAX, SCALE_FLOOR

    assert k_cache.dtype == torch.int8 and k_scale.is_contiguous() and v_scale.is_contiguous()
    _store_kv_int8_kernel[(t,)](k, v, k_cache, v_cache, k_scale, v_scale, slots, k.stride(0), v.stride(0),
                                KVH=kvh, D=d, BLOCK_H=triton.next_power_of_2(kvh), BLOCK_D=triton.next_power_of_2(d),
                                QMAX=QMAX, INV_QMAX=INV_QMAX, FLOOR=SCALE_FLOOR)


@triton.jit
def _rms_norm_kernel(X, R, W, Y, RO, stride_x, stride_r, N, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     UNIT_OFFSET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded as torch's add rounds
        tl.store(RO + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:  # Gemma: (1 + w) * norm in float32, rounded once
        y = (xf * inv) * (1.0 + w)
    else:  # the norm rounded to the input dtype, then times w (rounded again on the store)
        y = w * (xf * inv).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * N + offs, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] -> (weight * norm(x + residual), x + residual). Without a residual, the second is x.
    unit_offset (Gemma): (1 + weight) * norm, computed in float32."""
    t, n = x.shape
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else x
    if t:
        _rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out, new_residual,
                               x.stride(0), residual.stride(0) if residual is not None else 0, n, eps,
                               HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                               UNIT_OFFSET=unit_offset)
    return out, new_residual


@triton.jit
def _rope_kernel(Q, K, Cos, Sin, Pos, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                 H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    fmask = offs < HALF
    c1 = tl.load(Cos + pos * stride_c + offs, mask=fmask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + pos * stride_c + HALF + offs, mask=fmask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + pos * stride_c + offs, mask=fmask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + pos * stride_c + HALF + offs, mask=fmask, other=0.0).to(tl.float32)
    heads = tl.arange(0, BLOCK_H)
    for which in tl.static_range(2):  # q, then k
        X = Q if which == 0 else K
        stride_t = stride_qt if which == 0 else stride_kt
        stride_h = stride_qh if which == 0 else stride_kh
        nh = H if which == 0 else KVH
        mask = (heads[:, None] < nh) & fmask[None, :]
        base = X + t * stride_t + heads[:, None] * stride_h + offs[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(base, (x1 * c1[None, :] - x2 * s1[None, :]).to(X.dtype.element_ty), mask=mask)
        tl.store(base + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(X.dtype.element_ty), mask=mask)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: q [T, H, D], k [T, KVH, D]; cos/sin tables [max_pos, R]; positions [T]. The first R dims of
    each head rotate (R < D: partial rotary), the rest are left alone."""
    t, h, _ = q.shape
    kvh, r = k.shape[1], cos.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1
    if t:
        _rope_kernel[(t,)](q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           cos.stride(0), H=h, KVH=kvh, HALF=r // 2, BLOCK_H=triton.next_power_of_2(max(h, kvh)),
                           BLOCK_HALF=triton.next_power_of_2(r // 2))
    return q, k
