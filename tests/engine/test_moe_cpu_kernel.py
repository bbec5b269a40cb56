"""The bf16 experts' grouped GEMV (engine/kernels/moe_experts_cpu.cpp) against the float32 product it
rounds, and whole experts through it against torch's grouped_mm. Needs AVX512-BF16 and a compiler; other
CPUs keep torch's path (tested everywhere by tests/engine/test_moe.py)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_moe_experts
from engine.model.moe import Experts, grouped_mm_experts, route

KERNEL = cpu_moe_experts()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no AVX512-BF16 on this CPU (or no C++ compiler)")
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits): one rounding is within this, relative


@pytest.mark.parametrize("n,k", [(48, 80), (512, 256), (17, 32), (64, 7)])
def test_each_output_is_the_float32_product_rounded_to_bf16(n, k):
    gen = torch.Generator().manual_seed(n + k)
    counts = torch.tensor([2, 0, 5, 1, 0, 9, 4, 3])  # empty experts, odd row counts (blocks of 4, 2, 1)
    offsets = torch.zeros(9, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    w = torch.randn(8, n, k, generator=gen).bfloat16()
    x = torch.randn(int(counts.sum()), k, generator=gen).bfloat16()
    y = KERNEL.grouped_gemv_bf16(x, w, offsets)
    assert y.dtype == torch.bfloat16 and y.shape == (x.shape[0], n)
    exact = torch.cat([x[offsets[e]:offsets[e + 1]].double() @ w[e].double().T for e in range(8)])
    # one rounding to bf16 after a float32 sum (whose order differs from torch's)
    bound = BF16_U * exact.abs() + 1e-6 * torch.cat(
        [x[offsets[e]:offsets[e + 1]].double().abs() @ w[e].double().abs().T for e in range(8)])
    assert ((y.double() - exact).abs() <= bound * 1.01 + 1e-30).all()
    assert (y.double() - exact).abs().max() > 0 or n * k < 100  # really rounded to bf16


def test_bad_inputs_are_refused():
    w = torch.randn(2, 16, 32).bfloat16()
    ok = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="bfloat16"):
        KERNEL.grouped_gemv_bf16(torch.randn(2, 32), w, ok)
    with pytest.raises(RuntimeError, match="offsets"):
        KERNEL.grouped_gemv_bf16(torch.randn(2, 32).bfloat16(), w, torch.tensor([0, 1, 3]))
    with pytest.raises(RuntimeError, match="inputs"):
        KERNEL.grouped_gemv_bf16(torch.randn(2, 16).bfloat16(), w, ok)


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_experts_through_the_gemv_equal_grouped_mm(tokens):
    gen = torch.Generator().manual_seed(tokens)
    e, h, i = 16, 64, 48
    module = Experts(e, h, i)
    with torch.no_grad():
        module.w13.copy_(torch.randn(e, 2 * i, h, generator=gen) * 0.1)
        module.w2.copy_(torch.randn(e, h, i, generator=gen) * 0.1)
    module = module.to(torch.bfloat16)
    x = torch.randn(tokens, h, generator=gen).bfloat16()
    weights, ids = route(torch.randn(tokens, e, generator=gen) * 3, 4, True)
    weights = weights.bfloat16()
    module.kernel = "gemv"
    out = module(x, weights, ids)
    ref = grouped_mm_experts(x, weights, ids, module.w13, module.w2)
    scale = ref.float().abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= 4 * BF16_U * scale
