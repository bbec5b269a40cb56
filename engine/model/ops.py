"""The elementwise ops of the forward, chosen per attention backend: torch (the reference), fused
Triton kernels on CUDA (one launch each instead of a chain of small ones), fused native kernels with
the CPU backend (engine/kernels/fused_ops_cpu.h: one pass over a row instead of several torch ops; the
compiled decode step, engine/compiled_step.py, runs the same kernels, so the two agree bit for bit).

    rms_norm(x, weight, eps, residual, unit_offset) -> (weight * norm(x + residual), x + residual)
                                          unit_offset (Gemma): (1 + weight) * norm, in float32, then rounded
    rope(q, k, rotary)                 -> q, k rotated at each token's position (the table's leading dims)
    silu_mul(gate_up)                  -> SiLU(gate) * up, gate_up = [gate | up] along the last dim

The native CPU kernels cover the common shapes; Gemma's unit-offset norm and partial rotary go to torch's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.kernels import cpu_kernels

    if unit_offset:  # Gemma's (1 + w) in float32: the native kernel scales in the input dtype
        return torch_rms_norm(x, weight, eps, residual, unit_offset)

    return cpu_kernels().add_rms_norm(x, residual, weight, eps)


def cpu_rope(q: torch.Tensor, k: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.kernels import cpu_kernels

    if rotary.cos.shape[-1] != q.shape[-1]:  # partial rotary: the native kernel rotates whole heads
        return torch_rope(q, k, rotary)

    return cpu_kernels().rope(q, k, rotary.cos, rotary.sin, rotary.positions)


def cpu_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    from engine.kernels import cpu_kernels

    return cpu_kernels().silu_mul(gate_up)


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
    silu_mul: Callable[[torch.Tensor], torch.Tensor]


TORCH_OPS = ModelOps("torch", torch_rms_norm, torch_rope, torch_silu_mul)
TRITON_OPS = ModelOps("triton", triton_rms_norm, triton_rope, torch_silu_mul)
CPU_OPS = ModelOps("cpu", cpu_rms_norm, cpu_rope, cpu_silu_mul)


def ops_for(backend_name: str) -> ModelOps:
    """Triton elementwise kernels go with the Triton attention backend, the native fused ones with the CPU
    backend (torch's where they cannot be built here); the torch backend keeps torch's."""
    if backend_name == "triton":
        return TRITON_OPS
    if backend_name == "cpu":
        from engine.kernels import cpu_kernels

        return CPU_OPS if cpu_kernels() is not None else TORCH_OPS
    return TORCH_OPS
