"""The decode loop's device-resident state, graph runner padding, overlap and the compiled CPU step.

Every mode (eager; padded static buffers as the CUDA graphs use them; overlap of step n+1 with the
read-back of step n; both; the compiled step of engine/compiled_step.py) must produce exactly the tokens
of the eager loop, which itself equals
transformers' greedy generate in fp32, with sequences admitted mid-batch and finishing at different
steps. No row, in-flight step or block may be left behind."""

from __future__ import annotations

import pytest
import torch

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.stopping import StopChecker
from engine.config import EngineConfig, SamplingParams
from engine.cuda_graphs import bucket_for, graph_buckets
from engine.kv_cache import BlockManager, KVPool
from engine.runner import ModelRunner, pool_writer, token_slots
from engine.sampler import sample


def test_graph_buckets_and_choice():
    assert graph_buckets(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_buckets(1) == [1]
    b = graph_buckets(64)
    assert [bucket_for(n, b) for n in (1, 3, 8, 9, 17, 63, 64)] == [1, 4, 8, 16, 32, 64, 64]
    assert bucket_for(65, b) is None  # eager above the largest bucket


@pytest.fixture(scope="module")
def runner(tiny_models):
    return ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=4))


PARAMS = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3, 14, 1, 6)] + [
    SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=4, ignore_eos=True),
    SamplingParams(max_tokens=5, temperature=0.7, top_k=20, seed=5, ignore_eos=True)]


def run_batch(runner, cuda_graphs: bool, overlap: bool, max_num_seqs: int = 4, compiled: bool = False):
    layout = runner.kv_layout(num_blocks=96)
    pool = KVPool.allocate(layout, str(runner.device))
    blocks = BlockManager(layout.num_blocks, layout.block_size)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 12, 3, 7, 9, 4, 11)]
    tables = [blocks.allocate(str(i), len(p) + prm.max_tokens) for i, (p, prm) in enumerate(zip(prompts, PARAMS))]
    logits = runner.prefill(prompts, pool_writer(pool, [token_slots(t, len(p), layout.block_size)
                                                         for t, p in zip(tables, prompts)]))
    first = sample(logits, PARAMS, [0] * len(PARAMS)).tolist()
    batcher = ContinuousBatcher(runner, pool, StopChecker((), None), max_num_seqs, cuda_graphs=cuda_graphs,
                                overlap=overlap, compiled=compiled)
    seqs = [DecodeSequence(str(i), len(p), prm, t, [f], [0.0])
            for i, (p, prm, t, f) in enumerate(zip(prompts, PARAMS, tables, first))]
    for s in seqs[:3]:  # the rest join mid-batch
        assert batcher.add(s) is None or s.params.max_tokens == 1
    finished, steps = [], 0
    while batcher.has_work() or len(finished) + 3 < len(seqs):
        if steps == 2:
            for s in seqs[3:]:
                done = batcher.add(s)
                if done is not None:
                    finished.append(done)
        for s in batcher.step():
            blocks.free(s.request_id)  # what the worker does: the blocks go back at once
            finished.append(s)
        steps += 1
        assert steps < 100
    assert batcher.state.n == 0 and not batcher.running and batcher._in_flight is None
    for s in seqs:
        if blocks.holds(s.request_id):
            blocks.free(s.request_id)
    blocks.assert_empty()
    return prompts, {s.request_id: s.output for s in finished}


@pytest.mark.parametrize("compiled", [False, True])
def test_eager_and_compiled_loops_equal_transformers_greedy(runner, tiny_models, compiled):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    prompts, outputs = run_batch(runner, cuda_graphs=False, overlap=False, compiled=compiled)
    assert len(outputs) == len(PARAMS)
    for i, (p, prm) in enumerate(zip(prompts, PARAMS)):
        assert len(outputs[str(i)]) == prm.max_tokens
        if prm.greedy:
            ids = torch.tensor([p])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=prm.max_tokens,
                              min_new_tokens=prm.max_tokens, do_sample=False, pad_token_id=0)[0, len(p):]
            assert outputs[str(i)] == ref.tolist()


@pytest.mark.parametrize("cuda_graphs,overlap,max_num_seqs,compiled", [
    (True, False, 4, False), (False, True, 4, False), (True, True, 3, False), (True, False, 40, False),
    (False, False, 4, True), (False, True, 3, True)])
def test_graph_padding_overlap_and_compiled_step_change_nothing(runner, cuda_graphs, overlap, max_num_seqs, compiled):
    _, reference = run_batch(runner, cuda_graphs=False, overlap=False, max_num_seqs=max_num_seqs)
    _, outputs = run_batch(runner, cuda_graphs=cuda_graphs, overlap=overlap, max_num_seqs=max_num_seqs,
                           compiled=compiled)
    assert outputs == reference


def test_abort_under_overlap_settles_the_step_in_flight(runner):
    layout = runner.kv_layout(num_blocks=32)
    pool = KVPool.allocate(layout)
    batcher = ContinuousBatcher(runner, pool, StopChecker((), None), 4, cuda_graphs=False, overlap=True)
    prm = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompt = [1, 2, 3, 4, 5]
    table = list(range(7))
    runner.prefill([prompt], pool_writer(pool, [token_slots(table, len(prompt), layout.block_size)]))
    seq = DecodeSequence("a", len(prompt), prm, table, [7], [0.0])
    batcher.add(seq)
    batcher.step()
    batcher.step()
    assert batcher._in_flight is not None
    assert batcher.remove("a")
    assert batcher._in_flight is None and batcher.state.n == 0 and not batcher.has_work()
    assert len(seq.output) == 3  # the step that was in flight was read back before the row left


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; none on this machine")
def test_cuda_graph_replay_equals_eager(tiny_models):
    cuda_runner = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cuda",
                                           block_size=4))
    _, eager = run_batch(cuda_runner, cuda_graphs=False, overlap=False)
    _, graphs = run_batch(cuda_runner, cuda_graphs=True, overlap=True)
    assert graphs == eager
