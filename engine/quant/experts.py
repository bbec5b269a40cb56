"""int8 / int4 experts: each expert's weight quantized as a linear layer's is (engine/quant/scheme.py),
stacked along a leading expert axis.

    qweight  int8 [E, N, K] | uint8 [E, N, K // 2]      scales, zeros  float32 [E, N, G]

The grouped CPU path multiplies each active expert through the same kernels a QuantLinear uses
(engine/quant/cpu.py: torch's packed ops or our int4 GEMV for decode rows, dequantize + GEMM for
prefill); the Triton fused-MoE kernel (engine/kernels/triton_moe.py) reads the stacked tensors directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from engine.quant.linear import QuantLinear
from engine.quant.scheme import QuantizedWeight, quantize, resolve_group_size


@dataclass(frozen=True)
class StackedQuantWeight:
    """E quantized weights of one shape [N, K]; expert(e) is the e-th as a QuantizedWeight (views)."""

    scheme: str
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def in_features(self) -> int:
        return self.scales.shape[2] * self.group_size

    def expert(self, e: int) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.group_size, self.qweight[e], self.scales[e],
                               None if self.zeros is None else self.zeros[e])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(cls, scheme: str, group_size: int, state: dict[str, torch.Tensor],
                     prefix: str) -> StackedQuantWeight:
        return cls(scheme, group_size, state[f"{prefix}.qweight"], state[f"{prefix}.scales"],
                   state.get(f"{prefix}.zeros"))

    def to(self, device: torch.device | str) -> StackedQuantWeight:
        z = None if self.zeros is None else self.zeros.to(device)
        return StackedQuantWeight(self.scheme, self.group_size, self.qweight.to(device), self.scales.to(device), z)


def quantize_stacked(w: torch.Tensor, scheme: str, group_size: int) -> StackedQuantWeight:
    """w [E, N, K] float -> each expert quantized on its own (its own scales), stacked."""
    parts = [quantize(w[e], scheme, group_size) for e in range(w.shape[0])]
    zeros = None if parts[0].zeros is None else torch.stack([p.zeros for p in parts])
    return StackedQuantWeight(scheme, group_size, torch.stack([p.qweight for p in parts]),
                              torch.stack([p.scales for p in parts]), zeros)


class QuantizedExperts:
    """Both projections of one layer's experts; up/down(e, rows) multiply through expert e's kernel."""

    def __init__(self, w13: StackedQuantWeight, w2: StackedQuantWeight, kernel: str = "auto") -> None:
        self.w13, self.w2 = w13, w2
        # Plain lists, not submodules: the kernels hold views of w13/w2, which are not parameters either.
        self._up = [QuantLinear(w13.expert(e), None, kernel) for e in range(w13.num_experts)]
        self._down = [QuantLinear(w2.expert(e), None, kernel) for e in range(w2.num_experts)]

    @property
    def num_experts(self) -> int:
        return self.w13.num_experts

    def up(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        return self._up[expert](rows)

    def down(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        return self._down[expert](rows)

    def nbytes(self) -> int:
        return self.w13.nbytes() + self.w2.nbytes()

    def describe(self) -> str:
        return f"{self.w13.scheme} g{self.w13.group_size}/g{self.w2.group_size}"


@runtime_checkable
class StackedExperts(Protocol):
    """What weight quantization takes from a mixture-of-experts layer (engine/model/moe.Experts), declared
    here so engine/quant never imports the model: float experts stacked as w13 [E, 2I, H] and w2 [E, H, I],
    and the slot their quantized form goes in."""

    w13: nn.Parameter
    w2: nn.Parameter
    quantized: QuantizedExperts | None


def expert_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer's experts by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, StackedExperts)}


def _group(scheme: str, group_size: int, in_features: int) -> int:
    return resolve_group_size(scheme, group_size, in_features)


def quantize_experts(experts: dict[str, nn.Module], scheme: str, group_size: int) -> dict[str, torch.Tensor]:
    """The canonical (cached) tensors of every expert projection: `<name>.w13.qweight` etc."""
    out: dict[str, torch.Tensor] = {}
    for name, m in experts.items():
        for proj in ("w13", "w2"):
            w = getattr(m, proj)
            out.update(quantize_stacked(w, scheme, _group(scheme, group_size, w.shape[2])).tensors(f"{name}.{proj}"))
    return out


def load_quantized_experts(experts: dict[str, nn.Module], state: dict[str, torch.Tensor], scheme: str,
                           group_size: int, device: torch.device, kernel: str = "auto") -> None:
    """Hand each Experts module its quantized weights (on `device`) and drop its float ones."""
    for name, m in experts.items():
        stacked = [StackedQuantWeight.from_tensors(scheme, _group(scheme, group_size, getattr(m, p).shape[2]), state,
                                                   f"{name}.{p}").to(device) for p in ("w13", "w2")]
        m.quantized = QuantizedExperts(*stacked, kernel)
        m.w13 = nn.Parameter(torch.empty(0), requires_grad=False)
        m.w2 = nn.Parameter(torch.empty(0), requires_grad=False)
