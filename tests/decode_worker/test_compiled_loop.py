"""The decode loop with the compiled CPU step (engine/compiled_step.py) writes the eager loop's tokens exactly:
float32 and bf16, float and int8 KV, prompts sharing cached prefix blocks, greedy and seeded sampling,
speculative decoding (whose plain steps run compiled). Every KV block comes back."""

from __future__ import annotations

import pytest
import torch

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.speculative import build_stepper
from decode_worker.stopping import StopChecker
from engine.config import EngineConfig, SamplingParams
from engine.kv_cache import BlockManager, KVPool
from engine.runner import ModelRunner, pool_writer, token_slots
from engine.sampler import sample


def _prompts() -> list[list[int]]:
    """Five prompts; the last three share two full blocks (block size 4) with the first, and one repeats a span
    (prompt lookup finds drafts)."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 256, (8,), generator=gen).tolist()
    tail = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 3, 9, 6, 2)]
    return [shared + tail[0], tail[1] + tail[1] + tail[1], shared + tail[2], shared + tail[3], shared + tail[4]]


PARAMS = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 20, 7)] + [
    SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=9, temperature=1.0, top_k=30, seed=4, ignore_eos=True)]


def decode_all(runner: ModelRunner, compiled: bool, speculative: str = "off") -> list[list[int]]:
    """Every prompt prefilled, then decoded by the decode worker's batcher; asserts that a speculative run
    verified drafts and that every block came back."""
    bs = runner.config.block_size
    prompts = _prompts()
    layout = runner.kv_layout(num_blocks=64)
    pool = KVPool.allocate(layout)
    blocks = BlockManager(layout.num_blocks, bs, enable_prefix_caching=True)
    tables = []
    for i, (p, prm) in enumerate(zip(prompts, PARAMS)):
        tables.append(blocks.allocate(str(i), len(p) + prm.max_tokens, p, (len(p) - 1) // bs))
        blocks.register(str(i), p)  # later prompts share its full blocks
    assert blocks.shared_blocks("2") == 2 and blocks.shared_blocks("3") == 2
    logits = runner.prefill(prompts, pool_writer(pool, [token_slots(t, len(p), bs) for t, p in zip(tables, prompts)]))
    first = sample(logits, PARAMS, [0] * len(PARAMS)).tolist()
    stopper = StopChecker((), None)
    batcher = ContinuousBatcher(runner, pool, stopper, 4, compiled=compiled)
    assert (batcher.compiled is not None) == compiled
    batcher.enable_speculation(build_stepper(runner, pool, stopper, speculative, 3))
    seqs = [DecodeSequence(str(i), len(p), prm, t, [f], [0.0], prompt_token_ids=tuple(p))
            for i, (p, prm, t, f) in enumerate(zip(prompts, PARAMS, tables, first))]
    for s in seqs:
        batcher.add(s)
    steps = 0
    while batcher.has_work():
        for s in batcher.step():
            blocks.free(s.request_id)
        steps += 1
        assert steps < 200
    blocks.assert_empty()
    assert [len(s.output) for s in seqs] == [p.max_tokens for p in PARAMS]
    assert speculative == "off" or batcher.speculative.spec_steps > 0
    return [s.output for s in seqs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_compiled_loop_writes_the_eager_loops_tokens(tiny_models, dtype, kv_cache_dtype):
    runner = ModelRunner(EngineConfig(model=str(tiny_models["qwen3"]), dtype=dtype, device="cpu", block_size=4,
                                      kv_cache_dtype=kv_cache_dtype, num_threads=1))
    assert decode_all(runner, compiled=True) == decode_all(runner, compiled=False)


@pytest.mark.parametrize("arch", ["mistral-sw", "qwen2-sw"])
def test_compiled_loop_with_sliding_windows(tiny_models, arch):
    """Window 16 (Mistral: every layer; Qwen2: layer 1 only) with outputs past it: the compiled loop writes the
    eager loop's tokens (the eager forward equals transformers': tests/engine/test_model_families.py)."""
    runner = ModelRunner(EngineConfig(model=str(tiny_models[arch]), dtype="float32", device="cpu", block_size=4,
                                      num_threads=1))
    assert decode_all(runner, compiled=True) == decode_all(runner, compiled=False)


@pytest.mark.parametrize("speculative", ["ngram", "layers:1"])
def test_compiled_plain_steps_under_speculative_decoding(tiny_models, speculative):
    runner = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=4,
                                      num_threads=1))
    fast = decode_all(runner, compiled=True, speculative=speculative)
    assert fast == decode_all(runner, compiled=False, speculative=speculative)
    greedy = [i for i, p in enumerate(PARAMS) if p.greedy]  # sampled rows keep plain decoding's distribution only
    plain = decode_all(runner, compiled=False)
    assert [fast[i] for i in greedy] == [plain[i] for i in greedy]


def test_colocated_decode_only_step_equals_the_mixed_forward(tiny_models):
    """A colocated worker runs a step without prompt chunks through the compiled step (decode_worker/colocated.py):
    the same logits and KV writes as its mixed forward over the same decode rows."""
    from engine.compiled_step import compile_decode_step

    runner = ModelRunner(EngineConfig(model=str(tiny_models["qwen2"]), dtype="float32", device="cpu", block_size=4,
                                      num_threads=1))
    mixed_pool = KVPool.allocate(runner.kv_layout(num_blocks=40))
    mixed_pool.tensor.copy_(torch.randn(mixed_pool.tensor.shape, generator=torch.Generator().manual_seed(5)))
    compiled_pool = KVPool(mixed_pool.layout, mixed_pool.buffer.clone())
    tables = [[3, 9, 1], [4, 20, 21, 22, 30], [5]]  # ragged, as the worker's sequences hold them
    tokens, starts = [11, 42, 250], [9, 17, 2]
    mixed = runner.mixed(mixed_pool, [[t] for t in tokens], starts, tables, num_decode=3, logits_rows=[0, 1, 2])
    compiled = compile_decode_step(runner).run_rows(compiled_pool, tokens, starts, tables)
    assert torch.equal(compiled, mixed) and torch.equal(compiled_pool.buffer, mixed_pool.buffer)
