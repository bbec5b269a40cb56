"""Prefix caching through real workers in one process: a PrefillWorker and a DecodeWorker (tiny fp32
model, shared memory and gRPC), driven as the router drives them. Greedy outputs must equal those
with caching off, the cached prefixes must be neither computed nor sent again, and no block or
reference may be left behind."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig, SamplingParams
from prefill_worker.worker import PrefillWorker
from proto.messages import Admission, PrefillResult, PrefillTask, Reservation, WorkerConfig

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)



@dataclass
class Outcome:
    outputs: dict[str, tuple[int, ...]]
    prefill: dict[str, PrefillResult]


def _workers(folder, caching: bool, transport: str, decode_blocks_gib: float = 0.002):
    engine = EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=4, num_threads=1,
                          kv_cache_gib=decode_blocks_gib, enable_prefix_caching=caching, prefill_cache_gib=0.001,
                          attention_backend="torch")
    prefill = PrefillWorker(WorkerConfig(engine=engine, worker_id="p0", auth_token="t", transport=transport))
    decode = DecodeWorker(WorkerConfig(engine=engine, worker_id="d0", auth_token="t", transport=transport))
    return prefill, decode


def _run(prefill: PrefillWorker, decode: DecodeWorker, batches: list[list[tuple[str, list[int]]]],
         params: SamplingParams = PARAMS) -> Outcome:
    """Each batch: reserve, prefill, admit, then wait for it to finish (so later batches find it cached)."""
    out = Outcome({}, {})
    for batch in batches:
        grants = decode.reserve([Reservation(rid, len(p), params.max_tokens, tuple(p)) for rid, p in batch])
        assert set(grants) == {rid for rid, _ in batch}
        tasks = [PrefillTask(rid, tuple(p), params, decode.endpoint(), grants[rid].block_table,
                             grants[rid].first_block) for rid, p in batch]
        results = prefill.prefill(tasks)
        for r in results:
            assert r.error is None, r.error
            out.prefill[r.request_id] = r
        assert decode.admit([Admission(r.request_id, len(p), r.first_token, r.prefill_end, params, r.transport)
                             for r, (_, p) in zip(results, batch)]) == []
        deadline = time.time() + 60
        while any(rid not in out.outputs for rid, _ in batch):
            assert time.time() < deadline, "decode did not finish"
            for res in decode.poll(0.2).results:
                assert res.error is None
                out.outputs[res.request_id] = res.token_ids
    return out


def _shared_prefix_batches(seed: int = 0) -> list[list[tuple[str, list[int]]]]:
    rng = random.Random(seed)
    headers = [[rng.randrange(256) for _ in range(n)] for n in (37, 40)]  # mid-block and block-aligned ends
    batches, n = [], 0
    for _ in range(3):
        batch = []
        for h in headers:
            for _ in range(2):
                batch.append((f"r{n}", h + [rng.randrange(256) for _ in range(rng.randrange(1, 9))]))
                n += 1
        batches.append(batch)
    batches.append([(f"r{n}", [rng.randrange(256) for _ in range(23)])])  # no shared prefix at all
    return batches


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_greedy_outputs_equal_with_caching_on_and_off_and_cached_blocks_are_not_sent(tiny_with_tokenizer,
                                                                                     transport):
    batches = _shared_prefix_batches()
    results = {}
    for caching in (False, True):
        prefill, decode = _workers(tiny_with_tokenizer, caching, transport)
        try:
            results[caching] = _run(prefill, decode, batches)
            assert decode.stats().running == 0
            with decode._lock:
                decode.blocks.assert_empty()
            if prefill.cache is not None:
                prefill.cache.blocks.assert_empty()
        finally:
            prefill.shutdown()
            decode.shutdown()
    off, on = results[False], results[True]
    assert on.outputs == off.outputs
    assert all(r.cached_tokens == 0 for r in off.prefill.values())
    first, later = [rid for rid, _ in batches[0]], [rid for b in batches[1:3] for rid, _ in b]
    assert all(on.prefill[rid].cached_tokens == 0 for rid in first)
    # Headers of 37 and 40 tokens: 9 and 10 full blocks of 4 are cached on the prefill side...
    assert sorted({on.prefill[rid].cached_tokens for rid in later}) == [36, 40]
    # ...and on the decode side, so only the suffix travels.
    for rid in later:
        assert on.prefill[rid].kv_bytes < off.prefill[rid].kv_bytes / 3
    assert on.prefill[f"r{len(later) + len(first)}"].cached_tokens == 0


def test_decode_worker_lacks_what_the_prefill_cache_holds(tiny_with_tokenizer):
    """A fresh decode worker behind a warm prefill cache: the cached prefix is read back from the
    prefill pool and sent, so the decode worker still gets the whole prompt, bit for bit."""
    batches = _shared_prefix_batches(seed=1)
    prefill, decode = _workers(tiny_with_tokenizer, True, "shm")
    ref_prefill, ref_decode = _workers(tiny_with_tokenizer, False, "shm")
    try:
        _run(prefill, decode, batches[:1])
        decode.shutdown()
        decode = DecodeWorker(WorkerConfig(engine=decode.config.engine, worker_id="d1", auth_token="t",
                                           transport="shm"))
        on = _run(prefill, decode, batches[1:2])
        off = _run(ref_prefill, ref_decode, batches[1:2])
        assert on.outputs == off.outputs
        for rid, r in on.prefill.items():
            assert r.cached_tokens > 0 and r.kv_bytes == off.prefill[rid].kv_bytes
    finally:
        for w in (prefill, decode, ref_prefill, ref_decode):
            w.shutdown()


def test_inbox_refuses_writes_into_blocks_the_receiver_already_caches():
    import torch

    from engine.kv_cache import KVLayout, KVPool
    from kvtransfer.base import IntegrityError
    from kvtransfer.inbox import KVInbox

    layout = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2, dtype="float32")
    inbox = KVInbox(KVPool.allocate(layout))
    inbox.expect("r", [5, 6, 7], 10, first_block=2)  # blocks 0 and 1 are shared, cached ones
    kv = torch.ones(4, 1, 2)
    with pytest.raises(IntegrityError, match="outside"):
        inbox.accept("r", 0, 1, 1, kv, kv)
    for layer in range(2):
        assert not inbox.is_complete("r")
        inbox.accept("r", layer, 2, 1, kv[:2], kv[:2])
    assert inbox.is_complete("r")  # one block per layer was all that had to arrive


def test_held_admissions_make_blocks_shareable_at_the_next_reservation(tiny_with_tokenizer):
    """The router may hold admissions (batch_admissions); their KV is complete once prefill returned, so
    the next reserve call carries them and later requests share their blocks before they decode."""
    header = list(range(1, 33))  # 8 full blocks
    prefill, decode = _workers(tiny_with_tokenizer, True, "grpc")
    try:
        [ga] = decode.reserve([Reservation("a", 35, PARAMS.max_tokens, tuple(header + [7, 8, 9]))]).values()
        [ra] = prefill.prefill([PrefillTask("a", tuple(header + [7, 8, 9]), PARAMS, decode.endpoint(),
                                            ga.block_table, ga.cached_blocks)])
        held = Admission("a", 35, ra.first_token, ra.prefill_end, PARAMS, ra.transport)
        early = decode.reserve([Reservation("early", 34, PARAMS.max_tokens, tuple(header + [5, 6]))])
        assert early["early"].cached_blocks == 0  # a's KV not yet known complete: nothing shared
        late = decode.reserve([Reservation("late", 34, PARAMS.max_tokens, tuple(header + [5, 6]))], [held])
        assert late["late"].cached_blocks == 8 and late["late"].block_table[:8] == ga.block_table[:8]
        assert decode.admit([held]) == []
        decode.release(["early", "late"])
        deadline = time.time() + 30
        while decode.stats().pool.reserved_requests and time.time() < deadline:
            decode.poll(0.2)
        with decode._lock:
            decode.blocks.assert_empty()
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_a_finished_requests_generated_blocks_serve_the_next_chat_turn(tiny_with_tokenizer):
    """The decode worker keys a finished request's generated blocks too: a follow-up prompt that resends
    the conversation finds prompt and answer cached, and decodes as it would without the cache."""
    rng = random.Random(5)
    first = [rng.randrange(256) for _ in range(14)]
    question = [rng.randrange(256) for _ in range(3)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = {}
    for caching in (True, False):
        prefill, decode = _workers(tiny_with_tokenizer, caching, "shm")
        try:
            turn1 = _run(prefill, decode, [[("t1", first)]], params)
            follow = first + list(turn1.outputs["t1"]) + question
            grants = decode.reserve([Reservation("probe", len(follow), 1, tuple(follow))])
            decode.release(["probe"])
            outs[caching] = (grants["probe"].cached_blocks, _run(prefill, decode, [[("t2", follow)]], params).outputs)
            time.sleep(0.3)
            with decode._lock:
                decode.blocks.assert_empty()
        finally:
            prefill.shutdown()
            decode.shutdown()
    # 14 prompt + 11 generated tokens with KV: 6 full blocks of 4 (the prompt alone fills only 3)
    assert outs[True][0] == 6 and outs[False][0] == 0
    assert outs[True][1] == outs[False][1]


def test_a_batch_without_a_hit_takes_the_plain_prefill_path(tiny_with_tokenizer, monkeypatch):
    """Zero cached tokens in a batch: `ModelRunner.extend` is not called; a later batch that hits uses it,
    and greedy outputs equal those with caching off."""
    batches = _shared_prefix_batches(seed=2)
    prefill, decode = _workers(tiny_with_tokenizer, True, "shm")
    ref_prefill, ref_decode = _workers(tiny_with_tokenizer, False, "shm")
    calls = []
    real_extend = prefill.runner.extend
    monkeypatch.setattr(prefill.runner, "extend", lambda *a, **k: calls.append(1) or real_extend(*a, **k))
    try:
        on = _run(prefill, decode, batches[:1])
        assert calls == [] and all(r.cached_tokens == 0 for r in on.prefill.values())
        on2 = _run(prefill, decode, batches[1:2])
        assert calls == [1] and all(r.cached_tokens > 0 for r in on2.prefill.values())
        off = _run(ref_prefill, ref_decode, batches[:2])
        assert {**on.outputs, **on2.outputs} == off.outputs
        time.sleep(0.3)
        prefill.cache.blocks.assert_empty()
        with decode._lock:
            decode.blocks.assert_empty()
    finally:
        for w in (prefill, decode, ref_prefill, ref_decode):
            w.shutdown()
