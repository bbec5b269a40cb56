"""The hybrid worker (decode_worker/hybrid.py) in one process, beside a real PrefillWorker (tiny fp32 model,
shared memory and gRPC): prompts that arrive as transferred KV (reserve, prefill, admit) and prompts
chunk-prefilled in its own steps (submit) run in the same batch, and each gives the tokens it gives alone
on a plain colocated worker; transferred ones stream as they decode; no block is left."""

from __future__ import annotations

import random
import time

import pytest

from decode_worker.colocated import ColocatedWorker
from decode_worker.hybrid import HybridWorker
from engine.config import EngineConfig, SamplingParams
from prefill_worker.worker import PrefillWorker
from proto.messages import Admission, ColocatedTask, PrefillTask, Reservation, WorkerConfig

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _engine(folder) -> EngineConfig:
    return EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=4, num_threads=1,
                        kv_cache_gib=0.004, prefill_cache_gib=0.001, attention_backend="torch", max_num_seqs=8)


def _config(folder, worker_id: str, transport: str) -> WorkerConfig:
    return WorkerConfig(engine=_engine(folder), worker_id=worker_id, auth_token="t", transport=transport,
                        max_num_batched_tokens=16)


def _prompts(seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"r{i}": [rng.randrange(1, 256) for _ in range(rng.randrange(5, 60))] for i in range(8)}


def _collect(worker, want: set[str], streamed: dict[str, list[int]] | None = None) -> dict[str, tuple[int, ...]]:
    outputs: dict[str, tuple[int, ...]] = {}
    deadline = time.time() + 120
    while not want <= set(outputs):
        assert time.time() < deadline, "the worker did not finish"
        poll = worker.poll(0.2, stream=streamed is not None)
        for p in poll.progress if streamed is not None else ():
            streamed.setdefault(p.request_id, [])[p.start:] = list(p.token_ids)
        for res in poll.results:
            assert res.error is None, res.error
            outputs[res.request_id] = res.token_ids
    return outputs


def _alone(folder, prompts: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    worker = ColocatedWorker(_config(folder, "c0", "shm"))
    try:
        out = {}
        for rid, p in prompts.items():  # one at a time: no batch neighbour
            assert worker.submit([ColocatedTask(rid, tuple(p), PARAMS)]) == []
            out |= _collect(worker, {rid})
        return out
    finally:
        worker.shutdown()


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_transferred_and_chunked_prompts_share_a_batch_and_equal_their_solo_runs(tiny_with_tokenizer, transport):
    prompts = _prompts()
    reference = _alone(tiny_with_tokenizer, prompts)
    prefill = PrefillWorker(_config(tiny_with_tokenizer, "p0", transport))
    hybrid = HybridWorker(_config(tiny_with_tokenizer, "h0", transport))
    try:
        long = {rid: p for rid, p in prompts.items() if len(p) > 30}
        short = {rid: p for rid, p in prompts.items() if rid not in long}
        assert long and short
        assert hybrid.submit([ColocatedTask(rid, tuple(p), PARAMS) for rid, p in short.items()]) == []
        grants = hybrid.reserve([Reservation(rid, len(p), PARAMS.max_tokens, tuple(p)) for rid, p in long.items()])
        assert set(grants) == set(long)
        results = prefill.prefill([PrefillTask(rid, tuple(p), PARAMS, hybrid.endpoint(), grants[rid].block_table,
                                               grants[rid].cached_blocks) for rid, p in long.items()])
        assert all(r.error is None for r in results), [r.error for r in results]
        assert hybrid.admit([Admission(r.request_id, len(long[r.request_id]), r.first_token, r.prefill_end, PARAMS,
                                       r.transport) for r in results]) == []
        streamed: dict[str, list[int]] = {r.request_id: [r.first_token] for r in results}
        outputs = _collect(hybrid, set(prompts), streamed)
        assert outputs == reference
        for rid in long:  # a transferred request streams while it decodes (its last tokens come with its result)
            got = tuple(streamed[rid])
            assert len(got) > 1 and got == outputs[rid][:len(got)], rid
        assert hybrid.stats().pool.used_blocks == 0 and not hybrid.requests
    finally:
        prefill.shutdown()
        hybrid.shutdown()


def test_a_reservation_released_before_admission_frees_its_blocks(tiny_with_tokenizer):
    hybrid = HybridWorker(_config(tiny_with_tokenizer, "h0", "shm"))
    try:
        assert set(hybrid.reserve([Reservation("a", 20, 8, tuple(range(1, 21)))])) == {"a"}
        assert hybrid.stats().pool.used_blocks > 0
        hybrid.release(["a"])
        deadline = time.time() + 10
        while hybrid.requests and time.time() < deadline:
            time.sleep(0.05)
        assert not hybrid.requests and hybrid.stats().pool.used_blocks == 0
        assert hybrid.admit([Admission("a", 20, 1, time.time(), PARAMS, "shm")]) == ["a"]  # nothing to admit
    finally:
        hybrid.shutdown()
