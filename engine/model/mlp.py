"""The decoder layer's MLP, chosen from the ModelArch: the one seam a new MLP kind plugs into.

`build_mlp(arch, layer)` returns a module mapping [T, hidden] -> [T, hidden]; the decoder layer
(engine/model/llama.py) knows nothing else about it. Its parameters live under `layers.{i}.mlp.`,
and engine/model/weights.py maps them to the checkpoint's names. A mixture-of-experts layer gets the
experts of engine/model/moe.py (SparseMoE); its dense layers (Qwen2/3-MoE's mlp_only_layers) a GatedMLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import Activation, ModelArch
from engine.model.moe import SparseMoE
from engine.model.ops import TORCH_OPS

ACTIVATIONS: dict[Activation, Callable[[torch.Tensor], torch.Tensor]] = {
    Activation.SILU: F.silu,
    Activation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one matmul: SwiGLU (SiLU) or GeGLU (GELU tanh).
    SwiGLU's SiLU * up is the model's ops (`ops`, set by CausalLM.use_ops: the fused native kernel on the CPU)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: Activation) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.activation == Activation.SILU:
            return self.down_proj(self.ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def build_mlp(arch: ModelArch, layer: int) -> nn.Module:
    """The MLP of decoder layer `layer`."""
    if arch.moe is not None and layer in arch.moe.sparse_layers:
        return SparseMoE(arch.moe, arch.hidden_size)
    return GatedMLP(arch.hidden_size, arch.intermediate_size, arch.activation)
