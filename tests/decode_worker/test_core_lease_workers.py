"""PD workers sharing a node's cores (WorkerConfig.share_node_cores): the prefill forward and the decode
steps take turns through the node's lease, and greedy outputs equal those of workers without one."""

from __future__ import annotations

import time
from dataclasses import replace

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig, SamplingParams
from engine.core_lease import LeaseRole, NodeCoreLease, NoLease
from prefill_worker.worker import PrefillWorker
from proto.messages import Admission, PrefillTask, Reservation, WorkerConfig

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = {"a": list(range(3, 40)), "b": list(range(50, 61)), "c": [7] * 21}


def _generate(folder, share: bool) -> tuple[dict[str, tuple[int, ...]], PrefillWorker, DecodeWorker]:
    engine = EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=4, num_threads=1,
                          kv_cache_gib=0.002, attention_backend="torch")
    base = WorkerConfig(engine=engine, worker_id="p0", auth_token=f"t-{time.time_ns()}", transport="shm",
                        share_node_cores=share)
    prefill, decode = PrefillWorker(base), DecodeWorker(replace(base, worker_id="d0"))
    outputs: dict[str, tuple[int, ...]] = {}
    for rid, prompt in PROMPTS.items():  # one at a time: the next prefill runs while earlier ones decode
        [grant] = decode.reserve([Reservation(rid, len(prompt), PARAMS.max_tokens, tuple(prompt))]).values()
        [res] = prefill.prefill([PrefillTask(rid, tuple(prompt), PARAMS, decode.endpoint(), grant.block_table,
                                             grant.cached_blocks)])
        assert res.error is None
        assert decode.admit([Admission(rid, len(prompt), res.first_token, res.prefill_end, PARAMS,
                                       res.transport)]) == []
    deadline = time.time() + 60
    while len(outputs) < len(PROMPTS):
        assert time.time() < deadline, "decode did not finish"
        outputs.update({r.request_id: r.token_ids for r in decode.poll(0.2).results})
    return outputs, prefill, decode


def test_workers_sharing_a_node_take_turns_and_decode_the_same_tokens(tiny_with_tokenizer):
    results = {}
    for share in (False, True):
        outputs, prefill, decode = _generate(tiny_with_tokenizer, share)
        try:
            results[share] = outputs
            if share:
                assert isinstance(prefill.lease, NodeCoreLease) and isinstance(decode.core_lease, NodeCoreLease)
                assert prefill.lease.turns == len(PROMPTS)
                assert decode.core_lease.turns == decode.steps > 0
                assert prefill.lease.paths == decode.core_lease.paths  # one lease: same run, same node
            else:
                assert isinstance(prefill.lease, NoLease) and isinstance(decode.core_lease, NoLease)
            with decode._lock:
                decode.blocks.assert_empty()
        finally:
            prefill.shutdown()
            decode.shutdown()
    assert results[True] == results[False]


def test_a_decode_loop_waiting_for_the_cores_is_not_reported_stalled(tiny_with_tokenizer):
    """While another worker holds the node's cores, the decode loop waits without being taken for wedged
    (the router's watchdog reads the poll's stall age); once the cores are free it decodes."""
    engine = EngineConfig(model=str(tiny_with_tokenizer), dtype="float32", device="cpu", block_size=4, num_threads=1,
                          kv_cache_gib=0.002, attention_backend="torch")
    base = WorkerConfig(engine=engine, worker_id="p0", auth_token=f"t-{time.time_ns()}", transport="shm",
                        share_node_cores=True)
    prefill, decode = PrefillWorker(base), DecodeWorker(replace(base, worker_id="d0"))
    try:
        prompt = PROMPTS["a"]
        [grant] = decode.reserve([Reservation("a", len(prompt), PARAMS.max_tokens, tuple(prompt))]).values()
        [res] = prefill.prefill([PrefillTask("a", tuple(prompt), PARAMS, decode.endpoint(), grant.block_table,
                                             grant.cached_blocks)])
        other = NodeCoreLease(prefill.lease.key, LeaseRole.PREFILL, prefill.lease.directory)  # a prefill's turn
        with other.hold():
            assert decode.admit([Admission("a", len(prompt), res.first_token, res.prefill_end, PARAMS,
                                           res.transport)]) == []
            time.sleep(0.3)
            poll = decode.poll(0.2)
            assert poll.results == () and poll.loop_stalled_s == 0.0 and decode.steps == 0
        deadline, results = time.time() + 60, []
        while not results:
            assert time.time() < deadline, "decode did not finish"
            results = decode.poll(0.2).results
        assert len(results[0].token_ids) == PARAMS.max_tokens and decode.core_lease.waited_s >= 0.3
    finally:
        prefill.shutdown()
        decode.shutdown()
