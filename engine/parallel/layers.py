"""The layers that talk across ranks, and `parallelize`, which puts them into a built decoder.

The decoder (engine/model/llama.py) stays one decoder: built with the rank's shape (`ShardPlan.rank_arch`),
its column-parallel projections (q/k/v, gate/up) are plain linears over the rank's rows; `parallelize`
swaps in, under the same parameter names, the three kinds below. Each keeps the TP-1 arithmetic of its
rows: the embedding and the logits are exact (one rank computes each value), the two all-reduces per layer
sum partial products in another order than one GEMM would (fp32 logits differ by rounding only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.mlp import GatedMLP
from engine.parallel.group import TensorParallel
from engine.parallel.shard import ShardPlan, TensorParallelUnsupported


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_r @ W_r^T): each rank holds some input columns (o_proj, down_proj). No bias: none of
    our row-parallel projections has one, and a bias would have to be added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + per) of the embedding; a token outside them contributes zeros, so the
    all-reduce gives each token its one row exactly."""

    def __init__(self, per: int, hidden: int, start: int, tp: TensorParallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(per, hidden))
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [T] -> [T, hidden]
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside[:, None], 0))


class ParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, gathered so every rank (and the sampler) sees all
    `vocab_size` columns; the padding rows of the last rank are cut off."""

    def __init__(self, per: int, hidden: int, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(per, hidden))
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        return self.tp.all_gather_last(F.linear(x, self.weight))[..., :self.vocab_size]


def parallelize(model: nn.Module, plan: ShardPlan, tp: TensorParallel) -> None:
    """Swap the cross-rank layers into `model`, a CausalLM built with `plan.rank_arch` (on the meta device,
    before its weights are assigned). Refuses an MLP that is not the dense gated one (mixture of experts)."""
    if tp.size == 1:
        return
    arch = plan.arch
    start, per = plan.vocab_rows
    model.embed = VocabParallelEmbedding(per, arch.hidden_size, start, tp)
    model.lm_head = ParallelLMHead(per, arch.hidden_size, arch.vocab_size, tp)
    local = plan.rank_arch
    for i, layer in enumerate(model.layers):
        if type(layer.mlp) is not GatedMLP:
            raise TensorParallelUnsupported(
                f"tensor parallelism splits dense gated MLPs only; layer {i}'s MLP is {type(layer.mlp).__name__} "
                "(mixture-of-experts models run with tensor parallel size 1)")
        layer.o_proj = RowParallelLinear(local.num_heads * arch.head_dim, arch.hidden_size, tp)
        layer.mlp.down_proj = RowParallelLinear(local.intermediate_size, arch.hidden_size, tp)
