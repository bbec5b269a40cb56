"""A prefix-cache miss costs what caching off costs (issue 22): the prefill worker runs the plain
packed prefill, not `ModelRunner.extend`, and its pool ends up holding exactly the bytes the extend
path would have stored for every full block (the only rows a later prompt reuses)."""

from __future__ import annotations

import random

import torch

from engine.config import EngineConfig
from engine.runner import ModelRunner
from prefill_worker.prefix_cache import PrefillCache

BS = 4


def _runner(folder) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=BS, num_threads=1,
                                    attention_backend="torch"))


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in (9, 16, 23, 3)]  # mid-block, aligned, shorter than a block


def _full_block_rows(cache: PrefillCache, prompts: list[list[int]], tables: list[list[int]]) -> list[torch.Tensor]:
    """Per layer, K and V of every prompt's full blocks, read back from the pool."""
    out = []
    for layer in range(cache.layout.num_layers):
        for p, t in zip(prompts, tables):
            full = len(p) // BS * BS
            if full:
                k, v, _, _ = cache.cached_rows(layer, t, 0, full)
                out += [k.clone(), v.clone()]
    return out


def test_full_block_writer_stores_the_bytes_extend_stores(tiny_models):
    runner = _runner(tiny_models["llama"])
    prompts, ids = _prompts(0), ["a", "b", "c", "d"]
    stored = {}
    for path in ("extend", "plain"):
        cache = PrefillCache(runner, 0.001, salt="s")
        assert cache.allocate(ids, prompts) == [0, 0, 0, 0]
        tables = cache.tables(ids)
        if path == "extend":
            logits = runner.extend(cache.pool, prompts, [0] * 4, tables)
        else:
            logits = runner.prefill(prompts, cache.full_block_writer(prompts, tables))
        stored[path] = (logits, _full_block_rows(cache, prompts, tables))
        cache.commit(ids, prompts)
        cache.blocks.assert_empty()
    assert torch.equal(stored["extend"][0], stored["plain"][0])
    assert len(stored["plain"][1]) == 2 * runner.arch.num_layers * 3  # three prompts hold a full block
    assert all(torch.equal(x, y) for x, y in zip(stored["extend"][1], stored["plain"][1]))


def test_a_later_prompt_hits_the_blocks_a_plain_prefill_stored(tiny_models):
    """What the miss path stored is what a hit reads: the extend over it gives caching-off logits."""
    runner = _runner(tiny_models["llama"])
    cache = PrefillCache(runner, 0.001, salt="s")
    header = _prompts(1)[2]  # 23 tokens: 5 full blocks
    first, second = header + [1, 2], header + [7, 8, 9]
    assert cache.allocate(["a"], [first]) == [0]
    runner.prefill([first], cache.full_block_writer([first], cache.tables(["a"])))
    cache.commit(["a"], [first])
    assert cache.allocate(["b"], [second]) == [20]
    hit = runner.extend(cache.pool, [second[20:]], [20], cache.tables(["b"]))
    cache.release(["b"])
    assert torch.allclose(hit, runner.prefill([second], None), atol=1e-5, rtol=0)
    cache.blocks.assert_empty()
