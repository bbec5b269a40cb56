"""Rank 0 drives, the others follow (engine/parallel/follow.py), and KV crosses degrees (kvtransfer/reshard.py).

A prefill group of degree P gathers each layer's KV heads on rank 0, which writes them through a
HeadShardedPool into the shared-memory pools of a decode group of degree M (each rank its own heads); that
group then decodes greedily. Every mix equals transformers' fp32 greedy."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.families import read_arch
from engine.kv_cache import BlockManager, KVLayout, block_runs
from engine.loader import load_hf_config
from engine.parallel import ShardPlan, TensorParallel
from engine.parallel.follow import DriverRunner, follow
from engine.parallel.spawn import run_ranks
from engine.runner import ModelRunner, kv_layout_for
from kvtransfer.reshard import HeadShardedPool, check_tiling, heads_of, shard_of
from kvtransfer.shm import SharedKVPool
from proto.messages import KVShard
from tests.engine.test_tensor_parallel import STEPS, _prompts, _reference

BLOCK = 4


def _config(folder: str, kv_cache_dtype: str = "auto") -> EngineConfig:
    return EngineConfig(model=folder, dtype="float32", device="cpu", block_size=BLOCK, kv_cache_dtype=kv_cache_dtype)


def _prefill_rank(tp: TensorParallel, folder: str, shards: list[tuple[KVLayout, KVShard]], tables: list[list[int]],
                  kv_cache_dtype: str) -> list[int] | None:
    """Prefill on every rank; rank 0 writes all heads into the decode ranks' pools; returns first tokens."""
    runner = ModelRunner(_config(folder, kv_cache_dtype), tp=tp)
    prompts = _prompts(runner.arch.vocab_size)
    if not tp.is_driver:
        follow(runner, tp)
        return None
    parts = [SharedKVPool(layout, s.shm_name) for layout, s in shards]
    pool = HeadShardedPool([(p.pool, heads_of(s)) for p, (_, s) in zip(parts, shards)])
    runs = [block_runs(t, BLOCK, len(p)) for t, p in zip(tables, prompts)]
    bounds = torch.tensor([0] + [len(p) for p in prompts]).cumsum(0).tolist()

    def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        from engine.kv_cache import as_stored

        stored = as_stored(pool.layout, k, v)
        for r, s, e in zip(runs, bounds, bounds[1:]):
            pool.write_runs(layer, r, *[None if x is None else x[s:e] for x in stored])

    driver = DriverRunner(runner, tp)
    first = driver.prefill(prompts, sink).argmax(-1).tolist()
    driver.stop()
    return first


def _decode_rank(tp: TensorParallel, folder: str, names: list[str], tables: list[list[int]], first: list[int],
                 kv_cache_dtype: str) -> list[list[int]] | None:
    runner = ModelRunner(_config(folder, kv_cache_dtype), tp=tp)
    shared = SharedKVPool(runner.kv_layout(num_blocks=64), names[tp.rank])
    if not tp.is_driver:
        follow(runner, tp, {"kv": shared.pool})
        return None
    prompts = _prompts(runner.arch.vocab_size)
    driver = DriverRunner(runner, tp, {"kv": shared.pool})
    out = [[t] for t in first]
    bt = torch.tensor([t + [0] * (max(map(len, tables)) - len(t)) for t in tables])
    for _ in range(STEPS - 1):
        toks = torch.tensor([o[-1] for o in out])
        pos = torch.tensor([len(p) + len(o) - 1 for p, o in zip(prompts, out)])
        for o, t in zip(out, driver.decode(shared.pool, toks, pos, bt).argmax(-1).tolist()):
            o.append(t)
    driver.stop()
    return out


def _decode_shards(folder: str, degree: int, kv_cache_dtype: str) -> list[tuple[SharedKVPool, KVShard]]:
    arch = read_arch(load_hf_config(folder))
    out = []
    for r in range(degree):
        plan = ShardPlan.of(arch, r, degree)
        pool = SharedKVPool(kv_layout_for(plan.rank_arch, _config(folder, kv_cache_dtype), num_blocks=64))
        out.append((pool, shard_of(plan.kv_heads, pool.name)))
    return out


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "model", "kv_cache_dtype"), [
    (1, 2, "gqa", "auto"), (2, 1, "gqa", "auto"), (2, 2, "gqa", "auto"),
    (4, 1, "mha", "auto"), (1, 4, "mha", "auto"), (2, 4, "gqa", "auto"),  # 4 ranks over 2 KV heads: replicated
    (2, 2, "mha", "int8"),
    (2, 1, "gqa3", "auto"), (1, 2, "gqa3", "auto"),  # 3 KV heads: rank pools of 1 and 2 heads
])
def test_prefill_and_decode_degrees_mix(tp_models, prefill_tp, decode_tp, model, kv_cache_dtype):
    folder = str(tp_models[model])
    arch = read_arch(load_hf_config(folder))
    shards = _decode_shards(folder, decode_tp, kv_cache_dtype)
    assert check_tiling([s for _, s in shards], arch.num_kv_heads) is None
    try:
        prompts = _prompts(arch.vocab_size)
        blocks = BlockManager(64, BLOCK)
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(9)).tolist()  # scattered tables
        tables = [[perm[b] for b in blocks.allocate(str(i), len(p) + STEPS)] for i, p in enumerate(prompts)]
        keyed = [(p.layout, s) for p, s in shards]
        first = run_ranks(_prefill_rank, prefill_tp, folder, keyed, tables, kv_cache_dtype)[0]
        names = [s.shm_name for _, s in shards]
        tokens = run_ranks(_decode_rank, decode_tp, folder, names, tables, first, kv_cache_dtype)[0]
    finally:
        for pool, _ in shards:
            pool.close()
    ref = _reference(folder) if kv_cache_dtype == "auto" else _tp1(folder, kv_cache_dtype)
    assert tokens == ref, f"prefill TP {prefill_tp} -> decode TP {decode_tp}: {tokens} != {ref}"


def _tp1(folder: str, kv_cache_dtype: str) -> list[list[int]]:
    """The same greedy run at TP 1 (int8 KV: the reference is our own TP-1 result, not transformers')."""
    from tests.engine.test_tensor_parallel import greedy

    runner = ModelRunner(_config(folder, kv_cache_dtype))
    return greedy(runner, _prompts(runner.arch.vocab_size), STEPS)


def test_untiled_shards_are_named():
    from engine.parallel import HeadRange

    assert "held by no rank" in check_tiling([shard_of(HeadRange(0, 1, 2)), KVShard(0, 1, 2)], 2)
    assert "the model has 4" in check_tiling([KVShard(0, 1, 2)], 4)
