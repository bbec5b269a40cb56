"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): top-k routing, then each expert runs
once over the tokens routed to it.

    route     p = softmax(x Wr^T) in float32 [T, E];  (w, ids) = top-k of p [T, K];  w /= sum(w) if norm
    experts   the T*K (token, expert) rows sorted by expert; per active expert e, one matmul pair:
              y = (silu(x Wg_e^T) * x Wu_e^T) Wd_e^T over its rows only (CPU: torch's grouped_mm, or for
              decode-sized bf16 batches our grouped GEMV, engine/kernels/moe_experts_cpu.cpp; CUDA: one
              Triton launch per projection over all experts, engine/kernels/triton_moe.py)
    combine   out[t] = sum_j w[t, j] y[t, j], added in expert order as transformers adds them
    shared    (Qwen2-MoE) out += sigmoid(x Wsg^T) * SwiGLU_shared(x)

Expert weights are stacked as w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]: transformers'
fused layout and vLLM's fused_moe's, so every kernel reads them as stored. The router's weights are
plain parameters, not nn.Linear, so weight quantization (engine/quant) leaves routing in float.
engine/model/mlp.py builds one per sparse layer; engine/model/weights.py stacks the checkpoint's experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import MoEArch

ExpertMatmul = Callable[[int, torch.Tensor], torch.Tensor]  # (expert, rows [n, K]) -> [n, N]
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")  # torch >= 2.8; else one matmul pair per expert from Python
# Up to this many (token, expert) rows per expert on average, bf16 experts on a CPU take our grouped GEMV
# rather than torch's grouped_mm. olmoe-mini's layer (64 experts of 512x256, top-8) on the shared 2-core
# Zen 4, CPU ms per layer, 1 thread: 3.0 vs 10.6 at 8 tokens, 4.7 vs 13.9 at 32, 18 vs 23 at 256, 36 vs 36
# at 512 (64 rows per expert), 62 vs 57-61 at 1024; on 2 threads of the loaded machine (load ~20) the
# GEMV's one parallel region per projection took 0.2-0.4 s of wall time at 512 tokens where grouped_mm's
# 128 regions per layer took 2-2.5 s. Above this, grouped_mm (oneDNN's compute-bound GEMMs) serves.
GEMV_MAX_ROWS_PER_EXPERT = 128


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] float32, expert ids [T, K] int64), as transformers routes."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def combine_weights(weights: torch.Tensor, dtype: torch.dtype, fp32: bool) -> torch.Tensor:
    """The factor each (token, expert) output is scaled by: float32 (Mixtral), or cast to the model dtype
    first (the others), rounding where transformers rounds."""
    return weights if fp32 else weights.to(dtype)


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                    up: ExpertMatmul, down: ExpertMatmul) -> torch.Tensor:
    """x [T, H], weights/ids [T, K] -> [T, H]: rows sorted by expert, one matmul pair per active expert
    (no loop over tokens, no compute for experts nobody chose). `up` gives [n, 2I] (gate | up).
    Any per-expert kernel fits (quantized experts use this); float weights take grouped_mm_experts."""
    order, tokens = _sort_rows(ids)
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).tolist()  # the one host sync
    rows = x.index_select(0, tokens)  # [T*K, H]
    out = torch.empty_like(rows)
    start = 0
    for expert, n in enumerate(counts):
        if n:
            gate, value = up(expert, rows[start:start + n]).chunk(2, dim=-1)
            out[start:start + n] = down(expert, F.silu(gate) * value)
            start += n
    return _combine(x, out, weights, order, tokens)


def grouped_mm_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                       w2: torch.Tensor) -> torch.Tensor:
    """grouped_experts for float weights as two torch._grouped_mm calls, each over every expert's group of
    rows at once: ~10 ops per layer whatever the number of experts are active, and no host sync. On the
    2-core Zen 4 (1 thread, a heavily shared machine) decode steps of olmoe-mini took the same CPU time
    as with the per-expert loop (torch's CPU op is itself a loop of matmuls); it is kept for the fewer
    dispatches, which count where a step is launch-bound."""
    order, tokens = _sort_rows(ids)
    offsets = torch.bincount(ids.reshape(-1), minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    rows = x.index_select(0, tokens)
    gate, value = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * value, w2.transpose(1, 2), offs=offsets)
    return _combine(x, out, weights, order, tokens)


def gemv_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 kernel) -> torch.Tensor:
    """grouped_mm_experts through our bf16 grouped GEMV (`kernel`: engine.kernels.cpu_moe_experts())."""
    order, tokens = _sort_rows(ids)
    offsets = torch.zeros(w13.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(ids.reshape(-1), minlength=w13.shape[0]).cumsum(0)
    gate, value = kernel.grouped_gemv_bf16(x.index_select(0, tokens), w13, offsets).chunk(2, dim=-1)
    out = kernel.grouped_gemv_bf16((F.silu(gate) * value).contiguous(), w2, offsets)
    return _combine(x, out, weights, order, tokens)


def _cpu_gemv(x: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """Our grouped GEMV module when it serves this call (bf16 on a CPU with AVX512-BF16, decode-sized), else None."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or ids.numel() > GEMV_MAX_ROWS_PER_EXPERT * num_experts:
        return None
    from engine.kernels import cpu_moe_experts

    return cpu_moe_experts()


def _sort_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The T*K (token, slot) rows grouped by expert, tokens ascending within each: (order, token of each)."""
    order = torch.argsort(ids.reshape(-1), stable=True)
    return order, order // ids.shape[1]


def _combine(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
             tokens: torch.Tensor) -> torch.Tensor:
    """Sum each token's expert outputs (rows in expert order, as transformers adds them), weighted."""
    scaled = (out * weights.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, scaled)


class Experts(nn.Module):
    """The stacked experts of one layer, in float or quantized (engine/quant/experts.py) form."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)
        self.quantized = None  # a QuantizedExperts once quantize_model ran; then w13/w2 are empty
        self.kernel = "auto"  # auto: Triton on CUDA; CPU: gemv or grouped by size | gemv | grouped | loop | triton

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton" or (self.kernel == "auto" and x.is_cuda):
            from engine.kernels.triton_moe import fused_experts

            q = self.quantized
            return fused_experts(x, self.w13, self.w2, weights, ids,
                                 None if q is None else q.w13, None if q is None else q.w2)
        if self.quantized is not None:
            return grouped_experts(x, weights, ids, self.num_experts, self.quantized.up, self.quantized.down)
        gemv = _cpu_gemv(x, ids, self.num_experts) if self.kernel in ("auto", "gemv") else None
        if self.kernel == "gemv" and gemv is None:
            raise RuntimeError("the grouped GEMV takes bf16 experts on a CPU with AVX512-BF16, decode-sized")
        if gemv is not None:
            return gemv_experts(x, weights, ids, self.w13, self.w2, gemv)
        if HAS_GROUPED_MM and self.kernel != "loop":
            return grouped_mm_experts(x, weights, ids, self.w13, self.w2)
        w13, w2 = self.w13, self.w2
        return grouped_experts(x, weights, ids, self.num_experts,
                               lambda e, rows: F.linear(rows, w13[e]), lambda e, rows: F.linear(rows, w2[e]))

    def extra_repr(self) -> str:
        form = "float" if self.quantized is None else self.quantized.describe()
        return f"num_experts={self.num_experts}, {form}, kernel={self.kernel}"


class SparseMoE(nn.Module):
    """One decoder layer's MLP when the layer is sparse: router, experts, optional shared expert."""

    def __init__(self, moe: MoEArch, hidden: int) -> None:
        super().__init__()
        self.top_k, self.normalize, self.fp32_weights = moe.top_k, moe.norm_topk_prob, moe.fp32_route_weights
        self.router = nn.Parameter(torch.empty(moe.num_experts, hidden), requires_grad=False)
        self.experts = Experts(moe.num_experts, hidden, moe.expert_intermediate_size)
        shared = moe.shared_expert_intermediate_size
        self.shared_gate_up = nn.Linear(hidden, 2 * shared, bias=False) if shared else None
        self.shared_down = nn.Linear(shared, hidden, bias=False) if shared else None
        self.shared_gate = nn.Parameter(torch.empty(1, hidden), requires_grad=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H] -> [T, H]
        weights, ids = route(F.linear(x, self.router), self.top_k, self.normalize)
        out = self.experts(x, combine_weights(weights, x.dtype, self.fp32_weights), ids)
        if self.shared_gate_up is not None:
            gate, value = self.shared_gate_up(x).chunk(2, dim=-1)
            shared = self.shared_down(F.silu(gate) * value)
            out = out + torch.sigmoid(F.linear(x, self.shared_gate)) * shared
        return out

