"""int8 KV cache (`--kv-cache-dtype int8`): per-token-per-head symmetric quantization.

Each token's K (or V) row of one KV head, x [D], is stored as q = round(x / s) in int8 with one
float32 scale s = max|x| * (1/127), so |x - q * s| <= s / 2 element-wise. The torch functions here are the
reference every store path (torch, native CPU, Triton) must reproduce bit for bit: the same float32
ops in the same order, and round-half-up (floor(y + 0.5)), which Triton can express too. The scale is a
multiplication by the float32 1/127, not a division by 127: torch on CUDA turns a division by a Python
scalar into a multiplication by its reciprocal, so only the multiplication rounds alike everywhere.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype
QMAX = 127.0
INV_QMAX = float(torch.tensor(1 / QMAX, dtype=torch.float32))  # exactly representable: no double rounding
SCALE_FLOOR = 1e-12  # a row of zeros still gets a finite scale (and quantizes to zeros)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) -> (q [..., D] int8, scale [...] float32), one scale per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=SCALE_FLOOR) * INV_QMAX
    q = (xf / scale.unsqueeze(-1) + 0.5).floor().clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., D] int8, scale [...]) -> q * scale in `dtype` (computed in float32)."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)
