"""The decode loop's per-phase counters: a lap counts only inside a stretch of work, a batcher step laps
every phase it runs, nested inside the step's own time, and a real DecodeWorker (in one process, tiny
fp32 model, shared memory) reports them in stats() next to step_cpu_seconds."""

from __future__ import annotations

import time

import pytest

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.phases import PhaseClock, RunQueueClock
from decode_worker.stopping import StopChecker
from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig, SamplingParams
from engine.kv_cache import KVPool
from engine.runner import ModelRunner, pool_writer, token_slots
from prefill_worker.worker import PrefillWorker
from proto.messages import Admission, PrefillTask, Reservation, WorkerConfig

STEP_PHASES = {"admit", "forward", "sample", "collect", "retire"}


def test_a_lap_counts_only_between_start_and_stop():
    clock = PhaseClock()
    clock.lap("outside")
    assert clock.wall == {} and clock.cpu == {}
    clock.start()
    sum(range(20_000))
    clock.lap("a")
    clock.lap("b")
    clock.lap("a")
    clock.stop()
    clock.lap("after")
    assert set(clock.wall) == set(clock.cpu) == {"a", "b"}
    assert clock.wall["a"] > 0 and all(v >= 0 for v in [*clock.wall.values(), *clock.cpu.values()])
    snap = clock.snapshot()
    assert snap == {"phase_seconds": clock.wall, "phase_cpu_seconds": clock.cpu}
    snap["phase_seconds"]["a"] = -1.0  # a copy: stats() readers cannot disturb the loop's sums
    assert clock.wall["a"] > 0


def test_run_queue_clock_reads_a_growing_figure_or_none():
    clock = RunQueueClock()
    first = clock.read()
    if first is None:
        pytest.skip("no per-thread schedstat on this OS (Linux /proc/thread-self/schedstat)")
    assert first >= 0 and clock.read() >= first
    clock.close()
    assert clock.read() is None


@pytest.fixture(scope="module")
def runner(tiny_models):
    return ModelRunner(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=4))


def test_batcher_steps_lap_every_phase_inside_the_step(runner):
    layout = runner.kv_layout(num_blocks=64)
    pool = KVPool.allocate(layout)
    batcher = ContinuousBatcher(runner, pool, StopChecker((), None), 4, cuda_graphs=False, overlap=False)
    for i, n in enumerate((3, 6)):
        prompt, table = [1 + i, 2, 3, 4, 5], list(range(8 * i, 8 * i + 8))
        runner.prefill([prompt], pool_writer(pool, [token_slots(table, len(prompt), layout.block_size)]))
        batcher.add(DecodeSequence(str(i), len(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                                   table, [7], [0.0]))
    wall = 0.0
    finished = []
    while batcher.has_work():
        started = time.perf_counter()
        finished += batcher.step()
        wall += time.perf_counter() - started
    assert sorted(s.request_id for s in finished) == ["0", "1"]
    assert set(batcher.phases.wall) == STEP_PHASES
    assert batcher.phases.wall["forward"] > 0
    assert sum(batcher.phases.wall.values()) <= wall  # every lap lies inside a step
    batcher.remove("none")  # between steps: settles nothing, laps nothing
    assert set(batcher.phases.wall) == STEP_PHASES


def _decode_in_process(folder, prompts: dict[str, list[int]], max_tokens: int):
    """A PrefillWorker and a DecodeWorker in this process (shared memory); the requests streamed to the
    end. Returns (results by id, the TokenProgress of each poll that had some, the decode worker's stats)."""
    engine = EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=4, num_threads=1,
                          kv_cache_gib=0.002, attention_backend="torch")
    prefill = PrefillWorker(WorkerConfig(engine=engine, worker_id="p0", auth_token="t", transport="shm"))
    decode = DecodeWorker(WorkerConfig(engine=engine, worker_id="d0", auth_token="t", transport="shm"))
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        grants = decode.reserve([Reservation(rid, len(p), params.max_tokens, tuple(p)) for rid, p in prompts.items()])
        results = prefill.prefill([PrefillTask(rid, tuple(p), params, decode.endpoint(), grants[rid].block_table,
                                               grants[rid].cached_blocks) for rid, p in prompts.items()])
        assert decode.admit([Admission(r.request_id, len(prompts[r.request_id]), r.first_token, r.prefill_end,
                                       params, r.transport) for r in results]) == []
        done, progress, deadline = {}, [], time.time() + 60
        while len(done) < len(prompts):
            assert time.time() < deadline, "decode did not finish"
            poll = decode.poll(0.2, stream=True)
            done.update({r.request_id: r for r in poll.results})
            if poll.progress:
                progress.append(poll.progress)
        return done, progress, decode.stats()
    finally:
        decode.shutdown()
        prefill.shutdown()


def test_worker_stats_carry_the_phases(tiny_with_tokenizer):
    prompts = {"a": [5, 6, 7, 8, 9], "b": list(range(10, 23))}
    done, _, stats = _decode_in_process(tiny_with_tokenizer, prompts, 8)
    assert all(r.error is None for r in done.values())
    loop = stats.loop
    assert loop.steps > 0 and stats.pool.free_blocks == stats.pool.num_blocks
    # Row positions: prompt length - 1 at the first step, one more each step after (8 tokens each, the
    # first from prefill: 7 steps per request, both in every step).
    assert loop.step_rows == 14 and stats.step_context_tokens == sum(
        len(p) - 1 + k for p in prompts.values() for k in range(1, 8))
    assert set(loop.phase_cpu_seconds) == STEP_PHASES | {"ingest", "finish"}
    step_phases = sum(loop.phase_cpu_seconds[p] for p in STEP_PHASES)
    assert 0 < step_phases <= loop.step_cpu_seconds  # the batcher's laps nest inside the counted steps
    assert loop.poll_cpu_seconds > 0
    if RunQueueClock().read() is not None:
        assert loop.step_run_queue_seconds >= 0

def test_streamed_tokens_are_the_results_tokens_in_order_none_missed(tiny_with_tokenizer):
    """Streaming polls skip the walk over the batch while no step has completed: each request's progress
    must still run from token 1 with no gap or repeat, and agree with its result."""
    prompts = {"a": [5, 6, 7, 8, 9], "b": list(range(10, 23)), "c": [3] * 30}
    done, polls, _ = _decode_in_process(tiny_with_tokenizer, prompts, 150)
    assert len(polls) >= 2, "150 steps, each poll ends at the first new token: progress comes step after step"
    for rid, result in done.items():
        assert result.error is None and len(result.token_ids) == 150
        sent = 1
        for p in (p for poll in polls for p in poll if p.request_id == rid):
            assert p.start == sent and len(p.token_ids) == len(p.token_times) > 0
            assert p.token_ids == result.token_ids[sent:sent + len(p.token_ids)]
            assert p.token_times == result.token_times[sent:sent + len(p.token_ids)]
            sent += len(p.token_ids)
