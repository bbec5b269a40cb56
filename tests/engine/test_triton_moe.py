"""The Triton fused-MoE kernel against the grouped torch path (engine/model/moe.py), float and quantized
experts; on a CPU under TRITON_INTERPRET=1 (tests/conftest.py), on a GPU for real."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.triton_moe import align_by_expert, fused_experts
from engine.model.moe import grouped_experts, route
from engine.quant.experts import quantize_stacked
from engine.quant.scheme import dequantize
from tests.model_paths import tiny_moe_models  # noqa: F401 (a fixture)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(tokens: int, top_k: int, experts: int = 8, hidden: int = 32, inter: int = 48, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.2
    weights, ids = route(torch.randn(tokens, experts, generator=gen) * 3, top_k, True)
    return x, w13, w2, weights, ids


def _grouped(x, w13, w2, weights, ids):
    return grouped_experts(x, weights, ids, w13.shape[0], lambda e, r: F.linear(r, w13[e]),
                           lambda e, r: F.linear(r, w2[e]))


@pytest.mark.parametrize("tokens,top_k,block_m", [(1, 2, 16), (13, 3, 16), (70, 2, 16), (5, 1, 64)])
def test_align_groups_rows_by_expert_in_padded_blocks(tokens, top_k, block_m):
    _, _, _, _, ids = _problem(tokens, top_k)
    sorted_rows, block_experts, num_padded = align_by_expert(ids, 8, block_m)
    rows = tokens * top_k
    used = int(num_padded)
    assert used % block_m == 0 and sorted_rows.numel() >= used and sorted_rows.numel() % block_m == 0
    real = sorted_rows[:used][sorted_rows[:used] < rows].long()
    assert sorted(real.tolist()) == list(range(rows)), "every (token, expert) row exactly once"
    assert (sorted_rows[used:] == rows).all()
    flat = ids.reshape(-1)
    for b in range(used // block_m):
        block = sorted_rows[b * block_m:(b + 1) * block_m].long()
        block = block[block < rows]
        assert block.numel() > 0 and (flat[block] == block_experts[b]).all(), "one expert per block"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,top_k", [(1, 2), (13, 3), (37, 1), (70, 4)])
def test_fused_experts_equal_the_grouped_path(dtype, tokens, top_k):
    x, w13, w2, weights, ids = _problem(tokens, top_k, seed=tokens)
    ref = _grouped(x, w13, w2, weights, ids)
    d = dict(device=DEVICE)
    out = fused_experts(x.to(dtype).to(**d), w13.to(dtype).to(**d), w2.to(dtype).to(**d), weights.to(**d),
                        ids.to(**d))
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float().cpu(), ref, atol=tol, rtol=tol), (out.float().cpu() - ref).abs().max()


@pytest.mark.parametrize("scheme,group_size", [("int8", 0), ("int8", 16), ("int4", 16)])
def test_fused_quantized_experts_equal_dequantized_ones(scheme, group_size):
    x, w13, w2, weights, ids = _problem(11, 2, seed=3)
    q13 = quantize_stacked(w13, scheme, group_size or w13.shape[2])
    q2 = quantize_stacked(w2, scheme, group_size or w2.shape[2])
    deq13 = torch.stack([dequantize(q13.expert(e)) for e in range(8)])
    deq2 = torch.stack([dequantize(q2.expert(e)) for e in range(8)])
    ref = _grouped(x, deq13, deq2, weights, ids)
    out = fused_experts(x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE),
                        q13.to(DEVICE), q2.to(DEVICE))
    assert torch.allclose(out.cpu(), ref, atol=1e-5, rtol=1e-5), (out.cpu() - ref).abs().max()


def test_a_whole_moe_model_runs_its_experts_through_the_kernel(tiny_moe_models):  # noqa: F811
    """Every sparse layer of a tiny Qwen3-MoE through the Triton kernel: logits equal the grouped path's."""
    from engine.attention import PrefillAttention
    from engine.config import EngineConfig
    from engine.model.moe import Experts
    from engine.runner import ModelRunner

    runner = ModelRunner(EngineConfig(model=str(tiny_moe_models["qwen3_moe"]), dtype="float32", device=DEVICE))
    ids = torch.randint(0, 256, (19,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    positions = torch.arange(19, device=DEVICE)
    for m in runner.model.modules():
        if isinstance(m, Experts):
            m.kernel = "grouped"
    ref = runner.model(ids, positions, PrefillAttention([19], device=DEVICE))
    experts = [m for m in runner.model.modules() if isinstance(m, Experts)]
    assert experts
    for m in experts:
        m.kernel = "triton"
    out = runner.model(ids, positions, PrefillAttention([19], device=DEVICE))
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()

