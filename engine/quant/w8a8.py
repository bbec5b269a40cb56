"""`--quantization w8a8`: int8 weights times int8 activations, quantized per token at each call.

The weight is `int8` per output channel, of W * diag(s) with SmoothQuant's factors s
(smooth.py: outliers moved from the activations into the weight); each call
divides its activations by s, quantizes its activation rows symmetrically (scale = max|x_row| / 127,
round to nearest) and multiplies int8 x int8 -> int32 (`torch._int_mm`: oneDNN's
VNNI / AVX2 int8 GEMM on a CPU, cuBLASLt on CUDA), then rescales by row scale x
channel scale. Weight-only int8 has to turn weight or activations back into
floats before the multiply, so past a few rows it runs at float GEMM speed or
slower; the int8 GEMM does not. `pdserve bench quant --settings
bfloat16,int8+bf16,w8a8+bf16 --threads 1` measures it (README: on the Zen 4 build
machine, decode at batch 64 w8a8 + bf16 472-489 tok/s vs bf16 393-405).

The int32 sum is exact; converting it to float32 (past 2^24) and the two rescaling
multiplies add a few float32 roundings, so the only error of note is the
activations' rounding, |x / s - xq * s_x| <= s_x / 2 per element.
"""

from __future__ import annotations

import torch

from engine.quant.scheme import QuantizedWeight

CUDA_MIN_ROWS = 17  # cuBLASLt's int8 GEMM wants more than 16 rows: fewer are padded


def quantize_rows(x: torch.Tensor, inv_smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float (times inv_smooth [K]) -> (int8 [M, K], float32 scales [M, 1]); a zero row gets scale 1."""
    xf = x.float() if inv_smooth is None else x.float() * inv_smooth
    scale = xf.abs().amax(-1, keepdim=True).div_(127)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


class DynamicInt8Matmul:
    """x [M, K] @ W^T for a per-output-channel int8 weight, activations quantized per row at each call."""

    def __init__(self, qw: QuantizedWeight) -> None:
        n, k = qw.shape
        if qw.scheme != "int8" or qw.group_size != k:
            raise ValueError("w8a8 needs int8 weights with one scale per output channel "
                             f"(--quant-group-size 0 or {k}), got {qw.scheme} groups of {qw.group_size}")
        if qw.qweight.is_cuda and (n % 8 or k % 8):
            raise ValueError(f"w8a8 on CUDA runs cuBLASLt's int8 GEMM, which needs both sizes of the weight to be "
                             f"multiples of 8; this layer is {n}x{k}: use --quantization int8 for this model")
        self.qw = qw
        self.weight_t = qw.qweight.t()  # [K, N]: _int_mm's second operand, a view
        self.channel_scales = qw.scales[:, 0].float()  # [N]
        self.inv_smooth = None if qw.smooth is None else 1 / qw.smooth.float()  # [K]: undoes W * diag(smooth)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq, row_scales = quantize_rows(x, self.inv_smooth)
        rows = xq.shape[0]
        if xq.is_cuda and rows < CUDA_MIN_ROWS:
            xq = torch.cat([xq, xq.new_zeros(CUDA_MIN_ROWS - rows, xq.shape[1])])
        acc = torch._int_mm(xq, self.weight_t)[:rows]
        return (acc.float() * row_scales * self.channel_scales).to(x.dtype)
