"""Fused mixture-of-experts for CUDA: each expert projection is one grouped GEMM launch over all experts.

After vLLM's fused_moe. The T*K (token, expert) rows are sorted by expert and each expert's segment is
padded to a multiple of BLOCK_M (`align_by_expert`), so every row block belongs to one expert:

    sorted_rows    [P]       row ids (token * K + slot) grouped by expert; padding holds T*K (skipped)
    block_experts  [P / BM]  the expert of each row block
    num_padded     [1]       how many entries of sorted_rows are used (P is the bound T*K + E*(BM-1))

A program owns BLOCK_M rows x BLOCK_N outputs of one expert and reads only that expert's weight:

    up:    C1[r] = A[r // K] @ W13[e]^T          [T*K, 2I]   then silu(gate) * up in torch
    down:  C2[r] = w[r] * (H[r] @ W2[e]^T)       [T*K, H]    then summed over each token's K rows

Nothing depends on values on the host (no sync, fixed grid), so a decode step stays capturable in a
CUDA graph. Weights may be float, or int8 / int4 group-wise as engine/quant/scheme.py stores them
(dequantized in the inner loop, as engine/quant/triton_gemm.py does). Tested on the CPU under
TRITON_INTERPRET=1 against engine/model/moe.grouped_experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.quant.triton_gemm import block_k

QUANT_CODES = {None: 0, "int8": 1, "int4": 2}


@triton.jit
def _moe_gemm_kernel(A, B, C, RouteW, S, Z, SortedRows, BlockExperts, NumPadded, N, K, num_rows,
                     stride_am, stride_be, stride_bn, stride_cm, stride_se, stride_sn,
                     ROWS_PER_A: tl.constexpr, MUL_WEIGHT: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    rows = tl.load(SortedRows + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    row_ok = rows < num_rows
    a_rows = (rows // ROWS_PER_A).to(tl.int64)
    expert = tl.load(BlockExperts + pid_m).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    b_base = B + expert * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(A + a_rows[:, None] * stride_am + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if QUANT == 0:
            w = tl.load(b_base + rn[:, None] * stride_bn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            s = tl.load(S + expert * stride_se + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)  # [BN]
            if QUANT == 1:
                q = tl.load(b_base + rn[:, None] * stride_bn + rk[None, :], mask=n_ok[:, None], other=0)
                w = q.to(tl.float32) * s[:, None]
            else:
                byte = tl.load(b_base + rn[:, None] * stride_bn + rk[None, :] // 2, mask=n_ok[:, None], other=0)
                q = ((byte >> ((rk[None, :] % 2) * 4)) & 0xF).to(tl.float32)
                m = tl.load(Z + expert * stride_se + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
                w = q * s[:, None] + m[:, None]
        if IEEE:
            acc += tl.dot(a, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    if MUL_WEIGHT:
        acc = acc * tl.load(RouteW + rows, mask=row_ok, other=0.0)[:, None]
    out = C + rows.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(out, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """ids [T, K] -> (sorted_rows [P] int32, block_experts [P // block_m] int32, num_padded [1] int32),
    with P = T*K + E*(block_m - 1) rounded up to block_m: every shape is fixed by T, K and E."""
    rows = ids.numel()
    flat = ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(rows, device=ids.device) - (counts.cumsum(0) - counts)[expert_of]
    bound = -(-(rows + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_rows = torch.full((bound,), rows, dtype=torch.int32, device=ids.device)
    sorted_rows[(ends - padded)[expert_of] + rank] = order.to(torch.int32)
    starts = torch.arange(0, bound, block_m, device=ids.device)
    block_experts = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_rows, block_experts, ends[-1:].to(torch.int32)


def _gemm(a: torch.Tensor, weight: torch.Tensor, quant, out_features: int, in_features: int,
          aligned: tuple[torch.Tensor, ...], num_rows: int, rows_per_a: int, route_w: torch.Tensor | None,
          block_m: int) -> torch.Tensor:
    sorted_rows, block_experts, num_padded = aligned
    c = torch.empty(num_rows, out_features, dtype=a.dtype, device=a.device)
    if quant is None:
        b, s, z, group, bk = weight, weight, weight, 1, 32
    else:
        b, s, group, bk = quant.qweight, quant.scales, quant.group_size, block_k(quant.group_size)
        z = quant.zeros if quant.zeros is not None else s
    bn = 64
    grid = (block_experts.numel(), triton.cdiv(out_features, bn))
    _moe_gemm_kernel[grid](a, b, c, route_w if route_w is not None else a, s, z, sorted_rows, block_experts,
                           num_padded, out_features, in_features, num_rows,
                           a.stride(0), b.stride(0), b.stride(1), c.stride(0), s.stride(0), s.stride(1),
                           ROWS_PER_A=rows_per_a, MUL_WEIGHT=route_w is not None,
                           QUANT=QUANT_CODES[None if quant is None else quant.scheme], GROUP=group,
                           IEEE=a.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    return c


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  q13=None, q2=None, block_m: int | None = None) -> torch.Tensor:
    """x [T, H], weights [T, K] (float32 or x's dtype), ids [T, K] -> [T, H] in x's dtype.
    Float experts: w13 [E, 2I, H], w2 [E, H, I]; quantized ones (q13/q2, engine/quant/experts.py) use
    their stacked qweight/scales/zeros instead and only the shapes of w13/w2 are not read."""
    t, k = ids.shape
    x = x.contiguous()
    num_experts = q13.num_experts if q13 is not None else w13.shape[0]
    two_i, hidden = (q13.out_features, q13.in_features) if q13 is not None else w13.shape[1:]
    inter = two_i // 2
    block_m = block_m or (16 if t * k <= 64 * num_experts else 64)
    aligned = align_by_expert(ids, num_experts, block_m)
    up = _gemm(x, w13, q13, two_i, hidden, aligned, t * k, k, None, block_m)
    gate, value = up.chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate) * value).contiguous()
    route_w = weights.reshape(-1).to(torch.float32).contiguous()
    down = _gemm(h, w2, q2, hidden, inter, aligned, t * k, 1, route_w, block_m)
    return down.view(t, k, hidden).sum(dim=1)
