"""Mixture-of-experts through the native forward: routing and the grouped experts against their definition,
and tiny Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE models against transformers in fp32 (packed prefill,
paged decode, extend over a cached prefix, greedy generate)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import PrefillAttention
from engine.config import EngineConfig
from engine.families import read_arch
from engine.kv_cache import KVPool
from engine.loader import load_hf_config
from engine.model.mlp import GatedMLP, build_mlp
from engine.model.moe import SparseMoE, grouped_experts, route
from engine.runner import ModelRunner, pool_writer, token_slots
from tests.conftest import WINDOW
from tests.model_paths import (  # noqa: F401 (fixtures)
    MOE_NAMES,
    greedy_through_engine,
    hf_greedy,
    tiny_moe_models,
    tiny_moe_window_models,
)

TOL = 1e-4


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


def _runner(folder, **kw) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu", **kw))


def _reference_experts(x, weights, ids, w13, w2):
    """The definition, token by token: sum over the token's k experts of weight * SwiGLU_e(x)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = F.linear(x[t], w13[e]).chunk(2)
            out[t] += weights[t, j] * F.linear(F.silu(gate) * up, w2[e])
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_route_takes_the_top_k_of_the_softmax_and_renormalizes_when_asked(normalize):
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.5, -2.0, 0.5]])
    weights, ids = route(logits, 2, normalize)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2], [1, 0]]
    expect = probs.gather(1, ids)
    if normalize:
        expect = expect / expect.sum(-1, keepdim=True)
        assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert weights.dtype == torch.float32 and torch.allclose(weights, expect)


@pytest.mark.parametrize("tokens,top_k", [(1, 2), (9, 3), (40, 1)])
def test_grouped_experts_equal_the_definition_and_run_each_active_expert_once(tokens, top_k):
    gen = torch.Generator().manual_seed(tokens)
    e, h, i = 6, 16, 24
    x = torch.randn(tokens, h, generator=gen)
    w13, w2 = torch.randn(e, 2 * i, h, generator=gen) * 0.2, torch.randn(e, h, i, generator=gen) * 0.2
    weights, ids = route(torch.randn(tokens, e, generator=gen) * 3, top_k, True)
    calls: list[tuple[int, int]] = []

    def up(expert, rows):
        calls.append((expert, rows.shape[0]))
        return F.linear(rows, w13[expert])

    out = grouped_experts(x, weights, ids, e, up, lambda expert, rows: F.linear(rows, w2[expert]))
    assert torch.allclose(out, _reference_experts(x, weights, ids, w13, w2), atol=1e-5)
    chosen = torch.bincount(ids.reshape(-1), minlength=e)
    assert calls == [(k, int(n)) for k, n in enumerate(chosen.tolist()) if n], "one matmul per active expert"


def test_qwen3_moe_dense_layers_and_sparse_step(tiny_moe_models):  # noqa: F811
    """mlp_only_layers and decoder_sparse_step pick the dense layers, which keep intermediate_size."""
    from transformers import Qwen3MoeConfig

    from tests.conftest import TINY_COMMON

    cfg = Qwen3MoeConfig(**{**TINY_COMMON, "num_hidden_layers": 6}, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[3])
    arch = read_arch(cfg)
    assert arch.moe.sparse_layers == (1, 5) and arch.moe.expert_intermediate_size == 16
    assert [type(build_mlp(arch, i)) for i in range(6)] == [GatedMLP, SparseMoE, GatedMLP, GatedMLP, GatedMLP,
                                                           SparseMoE]
    runner = _runner(tiny_moe_models["qwen3_moe"])
    assert isinstance(runner.model.layers[0].mlp, SparseMoE) and isinstance(runner.model.layers[1].mlp, GatedMLP)
    assert runner.model.layers[1].mlp.gate_up_proj.out_features == 2 * 128


def test_arch_reads_each_configs_routing(tiny_moe_models):  # noqa: F811
    archs = {n: read_arch(load_hf_config(f)) for n, f in tiny_moe_models.items()}
    assert archs["mixtral"].moe.norm_topk_prob and archs["mixtral"].moe.fp32_route_weights
    assert archs["qwen3_moe"].moe.norm_topk_prob and not archs["olmoe"].moe.norm_topk_prob
    assert archs["qwen2_moe"].moe.shared_expert_intermediate_size == 48 and archs["qwen2_moe"].attention_bias
    assert archs["olmoe"].qk_norm_whole and archs["olmoe"].clip_qkv == 2.0 and not archs["olmoe"].qk_norm
    assert archs["qwen3_moe"].qk_norm and archs["qwen3_moe"].moe.top_k == 3
    assert archs["mixtral"].num_params(active=True) < archs["mixtral"].num_params()


@pytest.mark.parametrize("name", MOE_NAMES)
def test_packed_prefill_logits_match_transformers(tiny_moe_models, name):  # noqa: F811
    folder = tiny_moe_models[name]
    runner, hf = _runner(folder), _hf(folder)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 61, 23)]
    lens = [len(p) for p in prompts]
    ours = runner.model(torch.tensor(sum(prompts, [])), torch.cat([torch.arange(n) for n in lens]),
                        PrefillAttention(lens))
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        diff = (ours[start:start + len(p)] - ref).abs().max().item()
        assert diff < TOL, f"{name}: max |logit diff| {diff:.2e} for a {len(p)}-token sequence"
        start += len(p)


@pytest.mark.parametrize("name", MOE_NAMES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_paged_decode_and_extend_logits_match_transformers(tiny_moe_models, name, backend):  # noqa: F811
    folder = tiny_moe_models[name]
    runner, hf = _runner(folder, block_size=4, attention_backend=backend), _hf(folder)
    layout = runner.kv_layout(num_blocks=64)
    pool = KVPool.allocate(layout)
    gen = torch.Generator().manual_seed(2)
    full = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (22, 45)]
    prefix_lens, steps = [8, 29], 6  # prefill a prefix, extend by a chunk, then decode one token at a time
    perm = torch.randperm(layout.num_blocks, generator=gen).tolist()
    tables = [perm[:layout.blocks_for(22)], perm[layout.blocks_for(22):layout.blocks_for(22) + layout.blocks_for(45)]]
    prefixes = [s[:n] for s, n in zip(full, prefix_lens)]
    runner.prefill(prefixes, pool_writer(pool, [token_slots(t, len(p), 4) for t, p in zip(tables, prefixes)]))
    with torch.no_grad():
        refs = [hf(torch.tensor([s])).logits[0] for s in full]
    chunk_ends = [len(s) - steps for s in full]
    chunks = [s[n:e] for s, n, e in zip(full, prefix_lens, chunk_ends)]
    logits = runner.extend(pool, chunks, prefix_lens, tables, all_logits=True)
    row = 0
    for ref, n, e in zip(refs, prefix_lens, chunk_ends):
        diff = (logits[row:row + e - n] - ref[n:e]).abs().max().item()
        assert diff < TOL, f"{name}: extend max |logit diff| {diff:.2e}"
        row += e - n
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    for step in range(steps):
        pos = torch.tensor([e + step for e in chunk_ends])
        toks = torch.tensor([s[int(p)] for s, p in zip(full, pos)])
        out = runner.decode(pool, toks, pos, bt)
        for i, ref in enumerate(refs):
            diff = (out[i] - ref[int(pos[i])]).abs().max().item()
            assert diff < TOL, f"{name} decode step {step} seq {i}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("name", MOE_NAMES)
@pytest.mark.parametrize("cached", [0, 12])
def test_greedy_equals_transformers_generate(tiny_moe_models, name, cached):  # noqa: F811
    folder = tiny_moe_models[name]
    runner, hf = _runner(folder, block_size=8), _hf(folder)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (13, 30, 21)]
    n = 16
    ours = greedy_through_engine(runner, prompts, n, cached)
    for p, o in zip(prompts, ours):
        ref = hf_greedy(hf, p, n)
        assert o[:len(ref)] == ref, f"{name}: pdserve {o} != transformers {ref}"


def test_moe_windows_are_read_per_layer(tiny_moe_window_models):  # noqa: F811
    """Mixtral and Qwen3-MoE attend within the window on every layer, Qwen2-MoE where its rule says
    (odd-numbered layers below max_window_layers: layer 0); without use_sliding_window, nowhere."""
    windows = {n: [s.sliding_window for s in read_arch(load_hf_config(f)).layers]
               for n, f in tiny_moe_window_models.items()}
    assert windows == {"mixtral-sw": [WINDOW, WINDOW], "qwen3_moe-sw": [WINDOW, WINDOW], "qwen2_moe-sw": [WINDOW, None]}
    from transformers import Qwen3MoeConfig

    from tests.conftest import TINY_COMMON

    off = read_arch(Qwen3MoeConfig(**TINY_COMMON, num_experts=4, sliding_window=WINDOW))
    assert off.kv_window is None and all(s.sliding_window is None for s in off.layers)


@pytest.mark.parametrize("name", ["mixtral-sw", "qwen3_moe-sw", "qwen2_moe-sw"])
@pytest.mark.parametrize("cached", [0, 12])
def test_moe_with_a_sliding_window_equals_transformers_generate(tiny_moe_window_models, name, cached):  # noqa: F811
    """Prompts and outputs past the window, through prefill (or a cached prefix and an extend) and decode."""
    folder = tiny_moe_window_models[name]
    runner, hf = _runner(folder, block_size=8, attention_backend="cpu"), _hf(folder)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (13, 30, 21)]
    for p, o in zip(prompts, greedy_through_engine(runner, prompts, 16, cached)):
        ref = hf_greedy(hf, p, 16)
        assert o[:len(ref)] == ref, f"{name}: pdserve {o} != transformers {ref}"


def test_the_moe_window_changes_the_answer(tiny_moe_window_models):  # noqa: F811
    """The same Mixtral weights without the window answer differently past it: the test above can fail."""
    from transformers import AutoModelForCausalLM

    folder = tiny_moe_window_models["mixtral-sw"]
    windowed = _hf(folder)
    unwindowed = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                                      sliding_window=None).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (13, 30, 21)]
    assert any(hf_greedy(windowed, p, 16) != hf_greedy(unwindowed, p, 16) for p in prompts)
