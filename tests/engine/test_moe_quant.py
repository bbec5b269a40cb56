"""int8 / int4 experts: each expert projection within its quantization's bound of the float one, and a
whole tiny MoE model's logits equal to the float model run with the dequantized weights (up to the
kernels' activation rounding)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from engine.config import EngineConfig
from engine.kv_cache import KVPool
from engine.model.moe import Experts, grouped_experts, route
from engine.quant.experts import QuantizedExperts, quantize_stacked
from engine.quant.scheme import dequantize
from engine.runner import ModelRunner, pool_writer, token_slots
from tests.model_paths import tiny_moe_models  # noqa: F401 (a fixture)

BF16_EPS = 2.0**-8


@pytest.mark.parametrize("scheme,group_size", [("int8", 0), ("int8", 16), ("int4", 32), ("int4", 16)])
def test_each_expert_projection_is_within_half_a_step_per_input(scheme, group_size):
    """|x W^T - x Wq^T| <= sum_k |x_k| s(n, k) / 2 for every routed row and expert (fp32 reference kernels)."""
    gen = torch.Generator().manual_seed(0)
    e, h, i = 6, 64, 32
    w13, w2 = torch.randn(e, 2 * i, h, generator=gen) * 0.1, torch.randn(e, h, i, generator=gen) * 0.1
    q13, q2 = (quantize_stacked(w, scheme, group_size or w.shape[2]) for w in (w13, w2))
    experts = QuantizedExperts(q13, q2, kernel="reference")
    for expert in range(e):
        for proj, w, q, k in ((experts.up, w13, q13, h), (experts.down, w2, q2, i)):
            rows = torch.randn(5, k, generator=gen)
            step = q.expert(expert).scales.repeat_interleave(q.group_size, dim=1)  # [N, K]
            bound = rows.abs() @ (step / 2).T
            err = (proj(expert, rows) - F.linear(rows, w[expert])).abs()
            assert (err <= bound * (1 + 1e-5) + 1e-6).all(), f"{scheme} expert {expert}: {(err - bound).max():.2e}"
            assert err.max() > 0  # the quantized weight really ran


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [3, 90])
def test_quantized_experts_equal_the_dequantized_float_ones(scheme, tokens):
    """The CPU kernels (packed bf16-activation ops or our int4 GEMV for few rows, dequantize + GEMM for
    many) against float experts holding dequant(quant(W)): within the activations' bf16 rounding."""
    gen = torch.Generator().manual_seed(tokens)
    e, h, i = 8, 64, 32
    w13, w2 = torch.randn(e, 2 * i, h, generator=gen) * 0.1, torch.randn(e, h, i, generator=gen) * 0.1
    q13, q2 = (quantize_stacked(w, scheme, w.shape[2] if scheme == "int8" else 32) for w in (w13, w2))
    x = torch.randn(tokens, h, generator=gen)
    weights, ids = route(torch.randn(tokens, e, generator=gen) * 3, 2, True)
    module = Experts(e, h, i)
    module.quantized = QuantizedExperts(q13, q2)
    out = module(x, weights, ids)
    deq13 = torch.stack([dequantize(q13.expert(k)) for k in range(e)])
    deq2 = torch.stack([dequantize(q2.expert(k)) for k in range(e)])
    ref = grouped_experts(x, weights, ids, e, lambda k, r: F.linear(r, deq13[k]), lambda k, r: F.linear(r, deq2[k]))
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() < 8 * BF16_EPS * scale


def _dequantized_float_runner(config: EngineConfig) -> ModelRunner:
    """The same model unquantized, with every quantized weight (linears and experts) set to dequant(quant(w))."""
    from engine.quant.apply import linear_targets, resolve_group_size
    from engine.quant.scheme import quantize

    runner = ModelRunner(replace(config, quantization="none"))
    scheme, gs = config.quantization, config.quant_group_size
    with torch.no_grad():
        for m in linear_targets(runner.model, False).values():
            m.weight.copy_(dequantize(quantize(m.weight, scheme, resolve_group_size(scheme, gs, m.in_features))))
        for m in runner.model.modules():
            if isinstance(m, Experts):
                for w in (m.w13, m.w2):
                    q = quantize_stacked(w, scheme, resolve_group_size(scheme, gs, w.shape[2]))
                    w.copy_(torch.stack([dequantize(q.expert(k)) for k in range(w.shape[0])]))
    return runner


@pytest.mark.parametrize("name,scheme,group", [("mixtral", "int8", 0), ("qwen2_moe", "int4", 16), ("olmoe", "int4", 0),
                                               ("qwen3_moe", "int8", 16)])
def test_quantized_moe_model_matches_its_dequantized_float_twin(tiny_moe_models, tmp_path, name, scheme,  # noqa: F811
                                                                 group):
    config = EngineConfig(model=str(tiny_moe_models[name]), dtype="float32", device="cpu", quantization=scheme,
                          quant_group_size=group, cache_dir=str(tmp_path), block_size=4)
    runner = ModelRunner(config)
    experts = [m for m in runner.model.modules() if isinstance(m, Experts)]
    assert experts and all(m.quantized is not None and m.w13.numel() == 0 for m in experts)
    cached = list((tmp_path / "derived").glob("*.safetensors"))
    assert len(cached) == 1
    from safetensors import safe_open

    with safe_open(str(cached[0]), "pt") as f:
        assert any(k.endswith("experts.w13.qweight") for k in f.keys())
    ref = _dequantized_float_runner(config)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (30, 17)]
    outs = []
    for r in (runner, ref):
        pool = KVPool.allocate(r.kv_layout(num_blocks=32))
        tables = [list(range(0, 16)), list(range(16, 32))]
        logits = [r.prefill(prompts, pool_writer(pool, [token_slots(t, len(p), 4) for t, p in zip(tables, prompts)]))]
        for step in range(4):
            pos = torch.tensor([len(p) + step for p in prompts])
            logits.append(r.decode(pool, torch.tensor([5 + step, 9 + step]), pos, torch.tensor(tables)))
        outs.append(logits)
    scale = max(t.abs().max().item() for t in outs[1])
    for a, b in zip(*outs):
        assert (a - b).abs().max().item() < 4 * BF16_EPS * scale, (a - b).abs().max().item()
    again = ModelRunner(config)  # a second start reads the cache and gets the same bits
    a = next(m for m in again.model.modules() if isinstance(m, Experts)).quantized.w13
    assert torch.equal(a.qweight, experts[0].quantized.w13.qweight)


def test_w8a8_and_gguf_refuse_expert_weights(tiny_moe_models, tmp_path):  # noqa: F811
    for scheme in ("w8a8", "gguf"):
        with pytest.raises(ValueError, match="mixture-of-experts"):
            ModelRunner(EngineConfig(model=str(tiny_moe_models["mixtral"]), dtype="float32", device="cpu",
                                     quantization=scheme, cache_dir=str(tmp_path)))
