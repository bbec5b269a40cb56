"""The elementwise ops of the forward, chosen per device: torch on the CPU (the reference), fused
Triton kernels on CUDA (one launch each instead of a chain of small ones).

    rms_norm(x, weight, eps, residual, unit_offset) -> (weight * norm(x + residual), x + residual)
                                          unit_offset (Gemma): (1 + weight) * norm, in float32, then rounded
    rope(q, k, rotary)                 -> q, k rotated at each token's position (the table's leading dims)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.model.rope import apply_rope


class Rotary:
    """RoPE tables [max_pos, D] and this forward's positions [T]; the torch path gathers rows once."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
        self.cos, self.sin, self.positions = cos, sin, positions

    @functools.cached_property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[self.positions], self.sin[self.positions]


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    # Normalise in float32 and scale in the input dtype (Gemma: in float32), exactly as the reference does.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).to(x.dtype), x
    return weight * h.to(x.dtype), x


def torch_rope(q: torch.Tensor, k: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary.rows
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def triton_rope(q: torch.Tensor, k: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.kernels.triton_ops import rope

    return rope(q, k, rotary.cos, rotary.sin, rotary.positions)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.kernels.triton_ops import rms_norm

    return rms_norm(x, weight, eps, residual, unit_offset)


@dataclass(frozen=True)
class ModelOps:
    name: str
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[[torch.Tensor, torch.Tensor, Rotary], tuple[torch.Tensor, torch.Tensor]]


TORCH_OPS = ModelOps("torch", torch_rms_norm, torch_rope)
TRITON_OPS = ModelOps("triton", triton_rms_norm, triton_rope)


def ops_for(backend_name: str) -> ModelOps:
    """Triton elementwise kernels go with the Triton attention backend; everything else uses torch."""
    return TRITON_OPS if backend_name == "triton" else TORCH_OPS
