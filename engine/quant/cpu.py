"""CPU matmuls against quantized weights.

Two shapes, measured on the Zen 4 build machine (2 cores, shared) with torch 2.13:
- decode (few rows): weight-bandwidth bound. torch's packed ops read the int8 /
  packed-int4 weight directly; with bfloat16 activations they beat an fp32 or
  bf16 `F.linear` (their float32-activation variants are a slow fallback, 10-100x
  slower, so activations go through bfloat16 here).
- prefill (many rows): compute bound. The packed ops lose to the float GEMM, so
  the weight is dequantized to the activation dtype and multiplied by `F.linear`.

`_weight_int8pack_mm` takes one scale per output channel only, so int8 with
groups shorter than K takes the dequantize path at any batch size.

int4 decode goes through our own kernel where it builds (engine/quant/int4_kernel.py: int4 x
int8-quantized activations, AVX512-VNNI or AVX2): on the Zen 4 machine at 1 thread it runs the
model's shapes 3.8-4.9x faster than `_weight_int4pack_mm_for_cpu` at 1 row and 1.6-3.5x at 4-64 rows
(`python -m pdserve.bench.int4_kernel`), so it replaces the torch op up to DECODE_MAX_ROWS (it also beat
dequantize + GEMM to 256 rows, but prefill keeps exact float activations); without a compiler, an AVX2
CPU, or groups of a multiple of 32, the torch op stays.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from engine.quant import int4_kernel
from engine.quant.scheme import QuantizedWeight, dequantize, unpack_int4

# Up to here the packed path, above it dequantize + GEMM. Measured at 1 thread (SmolLM2 shapes): at 64 rows
# the packed ops still beat dequantize + GEMM 2-10x; at 256 the two are level or the GEMM wins.
DECODE_MAX_ROWS = 64
INT4PACK_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu accepts
_decode_max_rows = DECODE_MAX_ROWS


@contextmanager
def decode_path_for_all_rows() -> Iterator[None]:
    """Every call takes the decode path, whatever its rows: `pdserve bench quant` scores perplexity through
    the decode kernels this way (their activation rounding included), where prefill would dequantize."""
    global _decode_max_rows
    _decode_max_rows = 1 << 62
    try:
        yield
    finally:
        _decode_max_rows = DECODE_MAX_ROWS


class CPUQuantMatmul:
    """x [M, K] @ W^T for one quantized weight, prepared once for the CPU ops."""

    def __init__(self, qw: QuantizedWeight, native: bool = True) -> None:
        self.qw = qw
        n, k = qw.shape
        self.int8pack = qw.scheme == "int8" and qw.group_size == k
        self.gemv = _native_gemv(qw) if native else None
        self.int4pack = (self.gemv is None and qw.scheme == "int4" and qw.group_size in INT4PACK_GROUPS
                         and k % 16 == 0 and n % 16 == 0)
        if self.int8pack:
            self.scales_bf16 = qw.scales[:, 0].to(torch.bfloat16).contiguous()  # [N]
        if self.int4pack:
            # tinygemm convention: w = (q - 8) * scale + zero, so zero = m + 8 * scale; [G, N, 2]
            q = unpack_int4(qw.qweight).to(torch.int32)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = torch.stack([qw.scales, qw.zeros + 8 * qw.scales], dim=-1)
            self.scale_zeros_bf16 = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
        self.fast_decode = self.int8pack or self.int4pack or self.gemv is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= _decode_max_rows and self.fast_decode:
            return self.gemv(x) if self.gemv is not None else self.decode(x)
        return self.prefill(x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None:
            return self.gemv(x)
        xb = x.to(torch.bfloat16).contiguous()
        if self.int8pack:
            out = torch.ops.aten._weight_int8pack_mm(xb, self.qw.qweight, self.scales_bf16)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.qw.group_size,
                                                             self.scale_zeros_bf16)
        return out.to(x.dtype)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.qw, x.dtype))


def _native_gemv(qw: QuantizedWeight) -> int4_kernel.Int4Gemv | None:
    """Our int4 kernel for this weight, or None (not int4 in groups of 32k, or no compiler here)."""
    if not int4_kernel.supports(qw):
        return None
    from engine.kernels import cpu_int4_gemv

    module = cpu_int4_gemv()
    if module is None:
        return None
    return int4_kernel.Int4Gemv(qw, module)
