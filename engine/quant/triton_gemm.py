"""Triton dequantize-in-the-GEMM for CUDA: x [M, K] @ dequant(W)^T without a float copy of W.

Each program owns a BLOCK_M x BLOCK_N output tile and walks K in BLOCK_K steps that
never straddle a quantization group (BLOCK_K divides group_size), so one scale
(and zero point) per output channel serves the whole step:

    int8: w[n, k] = q[n, k] * s[n, k // G]
    int4: w[n, k] = nibble(q[n, k // 2], k % 2) * s[n, k // G] + m[n, k // G]

`@triton.jit` reads TRITON_INTERPRET when this module is imported: set it before
importing to run the kernel on the CPU under Triton's interpreter (the tests do).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.quant.scheme import QuantizedWeight


@triton.jit
def _quant_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K,
                       stride_xm, stride_qn, stride_sn, stride_om,
                       GROUP: tl.constexpr, INT4: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None], other=0.0)  # [BM, BK]
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)  # [BN]
        if INT4:
            byte = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :] // 2, mask=n_ok[:, None], other=0)
            q = ((byte >> ((rk[None, :] % 2) * 4)) & 0xF).to(tl.float32)  # [BN, BK]
            m = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)
            w = q * s[:, None] + m[:, None]
        else:
            q = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=n_ok[:, None], other=0)
            w = q.to(tl.float32) * s[:, None]
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def block_k(group_size: int) -> int:
    """The largest power of two <= 64 that divides the group (tl.dot needs >= 16)."""
    return math.gcd(group_size, 64)


class TritonQuantMatmul:
    """x [M, K] (fp32/bf16/fp16) @ dequant(W)^T -> [M, N] in x's dtype, fp32 accumulation."""

    def __init__(self, qw: QuantizedWeight) -> None:
        if block_k(qw.group_size) < 16:
            raise ValueError(f"the Triton quant kernel needs group_size divisible by 16, got {qw.group_size}")
        self.qw = qw
        self.scales = qw.scales.float().contiguous()
        self.zeros = qw.zeros.float().contiguous() if qw.zeros is not None else self.scales  # int8: unused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        m, k = x.shape
        n = self.qw.shape[0]
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        bm = 16 if m <= 16 else 64
        bn = 64
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _quant_gemm_kernel[grid](x, self.qw.qweight, self.scales, self.zeros, out, m, n, k,
                                 x.stride(0), self.qw.qweight.stride(0), self.scales.stride(0), out.stride(0),
                                 GROUP=self.qw.group_size, INT4=self.qw.scheme == "int4",
                                 IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn,
                                 BLOCK_K=block_k(self.qw.group_size))
        return out
