"""QuantLinear: a drop-in for nn.Linear whose weight is stored quantized.

The quantized tensors are plain attributes, not buffers: the module is built on
its final device by `quantize_model`, and a later `model.to(dtype=...)` must not
turn the scales into bfloat16 or move the packed layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant.scheme import QuantizedWeight, dequantize


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b, computed by a kernel chosen for the weight's device."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str = "auto",
                 int8_activations: bool = False) -> None:
        super().__init__()
        self.qw = qw
        self.out_features, self.in_features = qw.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = _select_kernel(qw, kernel, int8_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2  # the model's [tokens, features]: no reshapes (a decode step makes ~120 calls)
        y = self.kernel(x if flat else x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.qw.nbytes() + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.qw.scheme}, "
                f"group_size={self.qw.group_size}, kernel={type(self.kernel).__name__}")


class ReferenceMatmul:
    """Dequantize the whole weight to the activation dtype, then a float matmul (any device)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.qw = qw

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.qw, x.dtype))


def _select_kernel(qw: QuantizedWeight, kernel: str, int8_activations: bool = False):
    """w8a8: the int8 GEMM on any device. Otherwise auto: Triton on CUDA, the packed/dequantize pair
    on CPU; reference: dequantize + matmul."""
    if kernel not in ("auto", "reference"):
        raise ValueError(f"unknown quant kernel {kernel!r}; auto or reference")
    if int8_activations:
        from engine.quant.w8a8 import DynamicInt8Matmul

        return DynamicInt8Matmul(qw)
    if kernel == "reference":
        return ReferenceMatmul(qw)
    if qw.qweight.device.type == "cuda":
        from engine.quant.triton_gemm import TritonQuantMatmul

        return TritonQuantMatmul(qw)
    if qw.qweight.device.type == "cpu":
        from engine.quant.cpu import CPUQuantMatmul

        return CPUQuantMatmul(qw)
    return ReferenceMatmul(qw)
