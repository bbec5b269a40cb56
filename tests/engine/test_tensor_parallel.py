"""Tensor parallelism in the engine (engine/parallel/): each rank a spawned process over gloo, one thread.

fp32 greedy (packed prefill + paged decode) on TP 1, 2 and 4 equals transformers' generate for tiny
models with 1 (MQA, tied, a vocabulary that TP 4 does not divide), 2 (GQA) and 4 (MHA) KV heads, and a
Qwen2 with q/k/v biases; the shard plan's head ranges; refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.config import EngineConfig
from engine.families import read_arch
from engine.kv_cache import BlockManager, KVPool
from engine.loader import load_hf_config
from engine.parallel import HeadRange, ShardPlan, TensorParallel, TensorParallelUnsupported
from engine.parallel.spawn import run_ranks
from engine.runner import ModelRunner, pool_writer, token_slots
from tests.conftest import TINY_COMMON

STEPS = 10
PROMPT_LENS = (7, 29, 18)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Packed prefill into the rank's own pool, then paged decode steps; argmax each time."""
    layout = runner.kv_layout(num_blocks=64)
    pool = KVPool.allocate(layout)
    blocks = BlockManager(layout.num_blocks, layout.block_size)
    tables = [blocks.allocate(str(i), len(p) + steps) for i, p in enumerate(prompts)]
    logits = runner.prefill(prompts, pool_writer(pool, [token_slots(t, len(p), layout.block_size)
                                                        for t, p in zip(tables, prompts)]))
    out = [[int(t)] for t in logits.argmax(-1)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    for _ in range(steps - 1):
        toks = torch.tensor([o[-1] for o in out])
        pos = torch.tensor([len(p) + len(o) - 1 for p, o in zip(prompts, out)])
        for o, t in zip(out, runner.decode(pool, toks, pos, bt).argmax(-1).tolist()):
            o.append(t)
    return out


def _rank_greedy(tp: TensorParallel, folders: dict[str, str]) -> dict[str, tuple]:
    """On one rank: each model's greedy tokens, and the KV heads its pool holds."""
    out = {}
    for name, folder in folders.items():
        runner = ModelRunner(EngineConfig(model=folder, dtype="float32", device="cpu", block_size=4), tp=tp)
        out[name] = (greedy(runner, _prompts(runner.arch.vocab_size), STEPS), runner.shard.kv_heads,
                     runner.kv_layout(num_blocks=1).num_kv_heads)
    return out


def _splits(folder, size: int) -> bool:
    try:
        ShardPlan.of(read_arch(load_hf_config(folder)), 0, size)
    except TensorParallelUnsupported:
        return False
    return True


def _reference(folder) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    refs = []
    for p in _prompts(hf.config.vocab_size):
        ids = torch.tensor([p])
        refs.append(hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                                min_new_tokens=STEPS)[0, len(p):].tolist())
    return refs


@pytest.mark.parametrize("size", [1, 2, 4])
def test_greedy_equals_transformers(tp_models, size):
    folders = {name: str(f) for name, f in tp_models.items() if _splits(f, size)}
    assert len(folders) >= 4
    ranks = run_ranks(_rank_greedy, size, folders)
    for name, folder in folders.items():
        ref = _reference(folder)
        for rank, result in enumerate(ranks):
            tokens, heads, pool_heads = result[name]
            assert tokens == ref, f"{name} TP {size} rank {rank}: {tokens} != transformers {ref}"
            assert pool_heads == heads.count, f"{name} rank {rank}: pool holds {pool_heads} heads, plan {heads}"
        held = {h for r in ranks for h in range(r[name][1].start, r[name][1].stop)}
        assert held == set(range(ranks[0][name][1].total)), f"{name} TP {size}: KV heads {held} not all held"


def _arch(kv_heads: int, heads: int = 4, width: int = 128):
    """A tiny Llama's shape with these head counts and MLP width (the plan reads the shape only)."""
    from transformers import LlamaConfig

    return replace(read_arch(LlamaConfig(**TINY_COMMON)), num_kv_heads=kv_heads, num_heads=heads,
                   intermediate_size=width)


@pytest.mark.parametrize(("kv", "size", "expected"), [
    (4, 2, [HeadRange(0, 2, 4), HeadRange(2, 2, 4)]),
    (3, 2, [HeadRange(0, 1, 3), HeadRange(1, 2, 3)]),  # uneven: SmolLM2's 3 KV heads over 2 ranks
    (2, 4, [HeadRange(0, 1, 2), HeadRange(0, 1, 2), HeadRange(1, 1, 2), HeadRange(1, 1, 2)]),
    (1, 2, [HeadRange(0, 1, 1), HeadRange(0, 1, 1)]),
])
def test_kv_heads_split_or_replicated(kv, size, expected):
    arch = _arch(kv, heads=12)
    plans = [ShardPlan.of(arch, r, size) for r in range(size)]
    assert [p.kv_heads for p in plans] == expected
    for p in plans:  # each rank's query heads read only the KV heads it holds
        first, n = p.heads
        group = arch.num_heads // arch.num_kv_heads
        assert {h // group for h in range(first, first + n)} <= set(range(p.kv_heads.start, p.kv_heads.stop))
        assert p.rank_arch.num_kv_heads == p.kv_heads.count
        assert p.rank_arch.num_heads // p.rank_arch.num_kv_heads == max(1, arch.num_heads // max(size, kv))
    assert sum(p.heads[1] for p in plans) == arch.num_heads  # every query head on exactly one rank


def test_shards_tile_each_parameter():
    """Column-parallel rows and row-parallel columns of all ranks put back together give the whole tensor."""
    arch = _arch(2)
    d, h, kvh, width = arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.intermediate_size
    qkv = torch.randn((h + 2 * kvh) * d, arch.hidden_size)
    parts = [ShardPlan.of(arch, r, 2).shard("layers.0.qkv_proj.weight", qkv) for r in range(2)]
    q = torch.cat([p[:h // 2 * d] for p in parts])
    k = torch.cat([p[h // 2 * d:h // 2 * d + d] for p in parts])
    v = torch.cat([p[h // 2 * d + d:] for p in parts])
    assert torch.equal(torch.cat([q, k, v]), qkv)
    down = torch.randn(arch.hidden_size, width)
    assert torch.equal(torch.cat([ShardPlan.of(arch, r, 2).shard("layers.1.mlp.down_proj.weight", down)
                                  for r in range(2)], dim=1), down)
    norm = torch.randn(arch.hidden_size)
    assert ShardPlan.of(arch, 1, 2).shard("layers.1.mlp_norm.weight", norm) is norm


@pytest.mark.parametrize(("kv", "heads", "width", "size", "what"), [
    (2, 4, 128, 3, "multiple of them"),  # 3 ranks over 2 KV heads
    (4, 4, 128, 8, "attention heads"),  # 8 ranks over 4 query heads
    (2, 4, 130, 4, "MLP width"),
])
def test_unsplittable_shapes_refused(kv, heads, width, size, what):
    with pytest.raises(TensorParallelUnsupported, match=what):
        ShardPlan.of(_arch(kv, heads, width), 0, size)


def _load_quantized(tp: TensorParallel, folder: str) -> None:
    ModelRunner(EngineConfig(model=folder, dtype="float32", device="cpu", quantization="int8"), tp=tp)


def test_quantized_weights_refused_under_tp(tp_models):
    with pytest.raises(RuntimeError, match="quantized weights are not sharded"):
        run_ranks(_load_quantized, 2, str(tp_models["gqa"]))


def test_a_mixture_of_experts_mlp_is_refused(tp_models):
    """parallelize() refuses any MLP that is not the dense gated one, naming the layer."""
    from torch import nn

    from engine.model.llama import CausalLM
    from engine.parallel.layers import parallelize

    arch = read_arch(load_hf_config(tp_models["gqa"]))
    plan = ShardPlan.of(arch, 0, 2)
    with torch.device("meta"):
        model = CausalLM(plan.rank_arch, None)
    model.layers[1].mlp = nn.Identity()  # stands for an expert MLP: anything but GatedMLP
    with pytest.raises(TensorParallelUnsupported, match="layer 1's MLP is Identity"):
        parallelize(model, plan, TensorParallel(0, 2))
    assert replace(plan, size=1).rank_arch == arch
