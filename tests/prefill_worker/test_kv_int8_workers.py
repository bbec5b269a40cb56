"""int8 KV through real workers in one process (tiny fp32 model): the prefill worker's own pool (its prefix
cache) stores int8 too, and the blocks it sends from it arrive in the decode pool exactly as it holds them,
scales included; a request's KV costs (D + 4) / (4 D) of fp32's bytes on the wire; nothing leaks."""

from __future__ import annotations

import pytest
import torch

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from prefill_worker.worker import PrefillWorker
from proto.messages import WorkerConfig
from tests.prefill_worker.test_prefix_workers import _run as run_batches
from tests.prefill_worker.test_prefix_workers import _shared_prefix_batches as shared_prefix_batches


def _config(folder, kv: str, transport: str, worker_id: str) -> WorkerConfig:
    engine = EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=4, num_threads=1,
                          kv_cache_gib=0.002, prefill_cache_gib=0.001, attention_backend="cpu", kv_cache_dtype=kv)
    return WorkerConfig(engine=engine, worker_id=worker_id, auth_token="t", transport=transport)


def _workers(folder, kv: str, transport: str):
    return (PrefillWorker(_config(folder, kv, transport, "p0")), DecodeWorker(_config(folder, kv, transport, "d0")))


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_cached_int8_blocks_travel_as_the_prefill_pool_holds_them(tiny_with_tokenizer, transport):
    batches = shared_prefix_batches(seed=1)
    prefill, decode = _workers(tiny_with_tokenizer, "int8", transport)
    ref_prefill, ref_decode = _workers(tiny_with_tokenizer, "auto", transport)
    try:
        assert prefill.cache.pool.tensor.dtype == torch.int8 and decode.pool.tensor.dtype == torch.int8
        run_batches(prefill, decode, batches[:1])
        decode.shutdown()  # a fresh decode worker lacks everything the prefill cache holds
        decode = DecodeWorker(WorkerConfig(engine=decode.config.engine, worker_id="d1", auth_token="t",
                                           transport=transport))
        on = run_batches(prefill, decode, batches[1:2])
        off = run_batches(ref_prefill, ref_decode, batches[1:2])
        arch = prefill.runner.arch
        for rid, prompt in batches[1]:
            r = on.prefill[rid]
            assert r.cached_tokens > 0  # read back from the prefill pool and sent
            assert r.kv_bytes * 4 * arch.head_dim == off.prefill[rid].kv_bytes * (arch.head_dim + 4)
            assert len(on.outputs[rid]) == len(off.outputs[rid])
            # Every full block of the prompt: the decode pool holds the prefill pool's bytes and scales.
            src = prefill.cache.blocks.match_prefix(prompt)
            dst = decode.blocks.match_prefix(prompt)
            assert len(src) >= r.cached_tokens // 4 and len(dst) == len(prompt) // 4
            n = min(len(src), len(dst))
            src_ids, dst_ids = torch.tensor(src[:n]), torch.tensor(dst[:n])
            assert torch.equal(prefill.cache.pool.tensor[:, :, src_ids], decode.pool.tensor[:, :, dst_ids])
            assert torch.equal(prefill.cache.pool.scales[:, :, src_ids], decode.pool.scales[:, :, dst_ids])
        with decode._lock:
            decode.blocks.assert_empty()
        prefill.cache.blocks.assert_empty()
    finally:
        for w in (prefill, decode, ref_prefill, ref_decode):
            w.shutdown()


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_workers_with_different_kv_dtypes_refuse_each_other_at_the_first_transfer(tiny_with_tokenizer, transport):
    """A prefill worker started with --kv-cache-dtype auto meets a decode worker with int8: the request fails
    with an error naming the field, nothing is written, and releasing it returns every block."""
    from engine.config import SamplingParams
    from proto.messages import PrefillTask, Reservation

    prefill = PrefillWorker(_config(tiny_with_tokenizer, "auto", transport, "p0"))
    decode = DecodeWorker(_config(tiny_with_tokenizer, "int8", transport, "d0"))
    try:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        prompt = tuple(range(1, 12))
        grant = decode.reserve([Reservation("r", len(prompt), params.max_tokens, prompt)])["r"]
        [result] = prefill.prefill([PrefillTask("r", prompt, params, decode.endpoint(), grant.block_table,
                                                grant.cached_blocks)])
        assert "IncompatiblePeer" in result.error and "kv_cache_dtype: int8 != auto" in result.error
        assert decode.pool.tensor.count_nonzero() == 0 and decode.pool.scales.count_nonzero() == 0
        decode.release(["r"])
        with decode._lock:
            decode.blocks.assert_empty()
    finally:
        prefill.shutdown()
        decode.shutdown()
