"""Chunked prefill mixed into decode steps (`--mode colocated`), on the CPU without Ray.

The scheduler alone (fake sampled ids): the token budget holds every step, decode rows are never
left out, a prompt longer than the budget is split over steps, nothing is left behind. Then the
real engine on a tiny model: mixed steps at any budget give exactly the tokens of an unchunked run
and of the PD path (packed prefill + the continuous batcher), greedy and seeded sampling alike, and
fp32 greedy equals transformers' generate. Last, the ColocatedWorker itself: prefix blocks shared,
aborts free their blocks, the pool ends empty.
"""

from __future__ import annotations

import time

import pytest
import torch

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.chunk_scheduler import ChunkScheduler, ColocatedSequence
from decode_worker.stopping import StopChecker
from engine.config import EngineConfig, SamplingParams
from engine.kv_cache import BlockManager, KVPool
from engine.runner import ModelRunner, pool_writer, token_slots
from engine.sampler import sample

STOP = StopChecker((), None)
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def seq(rid: str, prompt_len: int, params: SamplingParams = GREEDY) -> ColocatedSequence:
    return ColocatedSequence(rid, tuple(range(1, prompt_len + 1)), params, block_table=list(range(64)))


def drive(sched: ChunkScheduler, max_steps: int = 200):
    """Run the scheduler with fake ids; yield each plan (checked before postprocess)."""
    for _ in range(max_steps):
        plan = sched.schedule()
        if plan is None:
            return
        yield plan
        sched.postprocess(plan, [7] * len(plan.sampling_rows))
    raise AssertionError("the scheduler did not finish")


def test_budget_holds_decode_rows_are_never_left_out_and_long_prompts_are_split():
    sched = ChunkScheduler(STOP, max_num_seqs=4, max_num_batched_tokens=16)
    lens = {"a": 40, "b": 3, "c": 17, "d": 16, "e": 1, "f": 9}
    for rid, n in lens.items():
        sched.add(seq(rid, n))
    chunks: dict[str, list[int]] = {rid: [] for rid in lens}
    for plan in drive(sched):
        assert plan.num_tokens <= 16
        assert len(plan.rows) <= 4
        decoding = {id(s) for s in sched.running if s.prefilled}
        assert {id(r.seq) for r in plan.rows[:plan.num_decode]} == decoding, "a decoding sequence was left out"
        assert all(len(r.tokens) == 1 for r in plan.rows[:plan.num_decode])
        for r in plan.rows[plan.num_decode:]:
            assert r.tokens == r.seq.prompt[r.start:r.start + len(r.tokens)]
            assert r.samples == (r.start + len(r.tokens) == len(r.seq.prompt))
            chunks[r.seq.request_id].append(len(r.tokens))
    for rid, n in lens.items():
        assert sum(chunks[rid]) == n, rid  # every prompt token computed exactly once
    assert len(chunks["a"]) >= 3  # 40 tokens under a 16-token budget: at least three steps
    assert not sched.has_work()


def test_prefill_moves_on_while_the_batch_decodes():
    """Two sequences decoding, a long prompt arrives: it gets the budget left every step."""
    sched = ChunkScheduler(STOP, max_num_seqs=4, max_num_batched_tokens=8)
    long_params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for rid in ("x", "y"):
        sched.add(seq(rid, 2, long_params))
    plan = sched.schedule()
    sched.postprocess(plan, [5, 5])
    sched.add(seq("long", 25))
    plan = sched.schedule()
    assert plan.num_decode == 2 and [len(r.tokens) for r in plan.rows] == [1, 1, 6]
    sched.postprocess(plan, [5, 5])
    plan = sched.schedule()
    assert [len(r.tokens) for r in plan.rows] == [1, 1, 6] and plan.rows[2].start == 6


def test_first_token_ends_a_one_token_request_and_remove_takes_any_sequence():
    sched = ChunkScheduler(STOP, max_num_seqs=2, max_num_batched_tokens=8)
    one = seq("one", 3, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    sched.add(one)
    sched.add(seq("two", 5))
    sched.add(seq("three", 5))
    plan = sched.schedule()
    prefilled, finished = sched.postprocess(plan, [9] * len(plan.sampling_rows))
    assert one in prefilled and one in finished and one.finish_reason == "length"
    assert one.prefill_start is not None and one.prefill_end >= one.prefill_start
    assert sched.remove("three") is not None and sched.remove("two") is not None
    assert sched.remove("missing") is None and not sched.has_work()


def test_budget_below_max_num_seqs_is_refused_clearly():
    with pytest.raises(ValueError, match="max-num-batched-tokens"):
        ChunkScheduler(STOP, max_num_seqs=8, max_num_batched_tokens=4)


# ---- the real engine on a tiny model ---------------------------------------------------------

@pytest.fixture(scope="module")
def runner(tiny_models):
    return ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=4))


PROMPT_LENS = (5, 23, 3, 40, 9, 4, 11)
PARAMS = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3, 14, 1, 6)] + [
    SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=4, ignore_eos=True),
    SamplingParams(max_tokens=5, temperature=0.7, top_k=20, seed=5, ignore_eos=True)]


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def run_colocated(runner, budget: int, max_num_seqs: int = 4) -> dict[str, list[int]]:
    """What ColocatedWorker's loop does, in one thread: schedule, one mixed forward, sample, postprocess."""
    layout = runner.kv_layout(num_blocks=96)
    pool = KVPool.allocate(layout, "cpu")
    blocks = BlockManager(layout.num_blocks, layout.block_size)
    sched = ChunkScheduler(STOP, max_num_seqs, budget)
    for i, (p, prm) in enumerate(zip(prompts(), PARAMS)):
        sched.add(ColocatedSequence(str(i), tuple(p), prm, blocks.allocate(str(i), len(p) + prm.max_tokens)))
    out, chunked = {}, False
    while (plan := sched.schedule()) is not None:
        picks = plan.sampling_rows
        chunked |= any(not r.samples for r in plan.rows)
        logits = runner.mixed(pool, [list(r.tokens) for r in plan.rows], [r.start for r in plan.rows],
                              [r.seq.block_table for r in plan.rows], plan.num_decode, picks)
        chosen = [plan.rows[i].seq for i in picks]
        ids = sample(logits, [s.params for s in chosen], [len(s.output) for s in chosen]).tolist() if picks else []
        for s in sched.postprocess(plan, ids)[1]:
            blocks.free(s.request_id)
            out[s.request_id] = s.output
    assert chunked == (budget < max(PROMPT_LENS) + max_num_seqs)
    blocks.assert_empty()
    return out


def run_pd(runner) -> dict[str, list[int]]:
    """The PD path in one process: packed prefill samples the first tokens, the continuous batcher the rest."""
    layout = runner.kv_layout(num_blocks=96)
    pool = KVPool.allocate(layout, "cpu")
    blocks = BlockManager(layout.num_blocks, layout.block_size)
    ps = prompts()
    tables = [blocks.allocate(str(i), len(p) + prm.max_tokens) for i, (p, prm) in enumerate(zip(ps, PARAMS))]
    logits = runner.prefill(ps, pool_writer(pool, [token_slots(t, len(p), 4) for t, p in zip(tables, ps)]))
    first = sample(logits, PARAMS, [0] * len(PARAMS)).tolist()
    batcher = ContinuousBatcher(runner, pool, STOP, 8)
    out = {}
    for i, (p, prm, t, f) in enumerate(zip(ps, PARAMS, tables, first)):
        done = batcher.add(DecodeSequence(str(i), len(p), prm, t, [f], [0.0]))
        if done is not None:
            out[done.request_id] = done.output
    while batcher.has_work():
        for s in batcher.step():
            out[s.request_id] = s.output
    return out


@pytest.mark.parametrize("budget", [4, 7, 16, 512])
def test_mixed_steps_give_the_tokens_of_an_unchunked_run_and_of_pd(runner, budget):
    unchunked = run_colocated(runner, budget=512)
    assert run_colocated(runner, budget=budget) == unchunked
    assert unchunked == run_pd(runner)
    assert [len(unchunked[str(i)]) for i in range(len(PARAMS))] == [p.max_tokens for p in PARAMS]


def test_mixed_greedy_equals_transformers(runner, tiny_models):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ours = run_colocated(runner, budget=6)
    for i, (p, prm) in enumerate(zip(prompts(), PARAMS)):
        if prm.temperature:
            continue
        ref = hf.generate(torch.tensor([p]), max_new_tokens=prm.max_tokens, do_sample=False, min_new_tokens=1)
        assert ours[str(i)] == ref[0, len(p):].tolist(), i


# ---- the worker, in one process --------------------------------------------------------------

def test_colocated_worker_shares_prefix_blocks_frees_aborts_and_leaks_nothing(tiny_with_tokenizer):
    from decode_worker.colocated import ColocatedWorker
    from proto.messages import ColocatedTask, WorkerConfig

    engine = EngineConfig(model=str(tiny_with_tokenizer), dtype="float32", device="cpu", block_size=4,
                          kv_cache_gib=0.002, max_num_seqs=4)
    worker = ColocatedWorker(WorkerConfig(engine=engine, worker_id="colocated-0", auth_token="t",
                                          max_num_batched_tokens=8))
    try:
        prompt = tuple(range(3, 30))
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        assert worker.submit([ColocatedTask("a", prompt, params), ColocatedTask("doomed", prompt[:5], long)]) == []
        results, first = collect(worker, {"a"})
        assert first["a"].prefill_start <= first["a"].prefill_end and first["a"].cached_tokens == 0
        assert results["a"].token_ids[0] == first["a"].first_token
        worker.release(["doomed"])
        # The same prompt again: its 6 full blocks (24 tokens) are cached, the last 3 tokens computed.
        assert worker.submit([ColocatedTask("b", prompt, params)]) == []
        again, prefilled = collect(worker, {"b"})
        assert prefilled["b"].cached_tokens == 24
        assert again["b"].token_ids == results["a"].token_ids and len(results["a"].token_ids) == 6
        deadline = time.time() + 10
        while worker.stats().pool.free_blocks != worker.stats().pool.num_blocks:
            assert time.time() < deadline, worker.stats()
            time.sleep(0.05)
        assert worker.stats().running == 0 and not worker.requests
        too_big = ColocatedTask("huge", prompt, SamplingParams(max_tokens=10_000, temperature=0))
        assert worker.submit([too_big]) == ["huge"]
    finally:
        worker.shutdown()


def collect(worker, ids: set[str], timeout_s: float = 60.0):
    results, prefilled = {}, {}
    deadline = time.time() + timeout_s
    while set(results) != ids:
        assert time.time() < deadline
        poll = worker.poll(0.2)
        results |= {r.request_id: r for r in poll.results if r.request_id in ids}
        prefilled |= {p.request_id: p for p in poll.prefilled}
    assert all(r.error is None for r in results.values())
    return results, prefilled


# ---- configuration ---------------------------------------------------------------------------

def test_mode_and_budget_are_validated_with_clear_errors():
    from pdserve.cli import build_parser, cluster_config
    from pdserve.runtime.cluster import ClusterConfig, check_mode

    with pytest.raises(ValueError, match="--mode must be one of pd, colocated"):
        ClusterConfig(mode="together")
    with pytest.raises(ValueError, match="--colocated-workers"):
        ClusterConfig(mode="colocated", num_colocated=0)
    with pytest.raises(ValueError, match="at least --max-num-seqs"):
        check_mode(EngineConfig(max_num_seqs=128), ClusterConfig(mode="colocated", max_num_batched_tokens=64))
    with pytest.raises(ValueError, match="--speculative"):
        check_mode(EngineConfig(speculative="ngram"), ClusterConfig(mode="colocated"))
    check_mode(EngineConfig(speculative="ngram"), ClusterConfig(mode="pd", max_num_batched_tokens=1))
    args = build_parser().parse_args(["run-batch", "-i", "a", "-o", "b", "--mode", "colocated",
                                      "--colocated-workers", "2", "--max-num-batched-tokens", "256"])
    cfg = cluster_config(args)
    assert (cfg.mode, cfg.num_colocated, cfg.max_num_batched_tokens) == ("colocated", 2, 256)
    for cmd in (["serve"], ["bench", "throughput"]):
        assert build_parser().parse_args([*cmd, "--mode", "colocated"]).mode == "colocated"
    assert cluster_config(build_parser().parse_args(["serve"])).mode == "pd"


def test_mixed_steps_run_over_an_int8_kv_pool(tiny_models):
    """--kv-cache-dtype int8 with --mode colocated: chunks and decode rows store and read int8 + scales;
    every request gets its tokens and every block comes back (run_colocated asserts it). The tokens
    themselves may differ from the float pool's (quantized K/V), so they are not compared."""
    int8 = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=4,
                                    kv_cache_dtype="int8"))
    assert int8.kv_layout(num_blocks=1).kv_cache_dtype == "int8"
    for budget in (4, 512):
        out = run_colocated(int8, budget=budget)
        assert [len(out[str(i)]) for i in range(len(PARAMS))] == [p.max_tokens for p in PARAMS]
