"""Mixture-of-experts and generic-path models through real workers in one process: a PrefillWorker and a
DecodeWorker over shared memory and gRPC, and a ColocatedWorker, driven as the router drives them. fp32
greedy outputs equal transformers' generate; every block comes back."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

import pytest
import torch

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig, SamplingParams
from prefill_worker.worker import PrefillWorker
from proto.messages import ColocatedTask, WorkerConfig
from tests.model_paths import (  # noqa: F401 (fixtures)
    MOE_NAMES,
    hf_greedy,
    tiny_generic_models,
    tiny_moe_models,
    tiny_moe_window_models,
    with_tokenizer,
)
from tests.prefill_worker.test_prefix_workers import _run

PARAMS = SamplingParams(max_tokens=10, temperature=0)
MODELS = [*MOE_NAMES, "mixtral-sw", "gpt2", "gpt_neox"]  # mixtral-sw: prompts and outputs past its window


@pytest.fixture(scope="module")
def served(tiny_moe_models, tiny_moe_window_models, tiny_generic_models, default_model_dir,  # noqa: F811
           tmp_path_factory):
    """Each model's folder with the default tokenizer beside it (workers load one for their stop checks)."""
    root = tmp_path_factory.mktemp("served")
    out = {}
    for name, folder in {**tiny_moe_models, **tiny_moe_window_models, **tiny_generic_models}.items():
        out[name] = with_tokenizer(shutil.copytree(folder, root / name), default_model_dir)
    return out


def _prompts() -> list[tuple[str, list[int]]]:
    gen = torch.Generator().manual_seed(11)
    return [(f"r{i}", torch.randint(3, 256, (n,), generator=gen).tolist()) for i, n in enumerate((9, 26, 17))]


@pytest.fixture(scope="module")
def references(served) -> dict[str, dict[str, list[int]]]:
    from transformers import AutoModelForCausalLM

    refs = {}
    for name in MODELS:
        hf = AutoModelForCausalLM.from_pretrained(served[name], dtype=torch.float32, attn_implementation="sdpa")
        refs[name] = {rid: hf_greedy(hf.eval(), p, PARAMS.max_tokens) for rid, p in _prompts()}
    return refs


def _engine(folder) -> EngineConfig:
    return EngineConfig(model=str(folder), dtype="float32", device="cpu", block_size=4, num_threads=1,
                        kv_cache_gib=0.002, prefill_cache_gib=0.001)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_pd_workers_equal_transformers(served, references, name, transport):
    engine = _engine(served[name])
    prefill = PrefillWorker(WorkerConfig(engine=engine, worker_id="p0", auth_token="t", transport=transport))
    decode = DecodeWorker(WorkerConfig(engine=engine, worker_id="d0", auth_token="t", transport=transport))
    try:
        prompts = _prompts()
        # Two batches, the second repeating the first's prompts: its prefixes come from both prefix caches.
        out = _run(prefill, decode, [prompts, [(f"again-{rid}", p) for rid, p in prompts]], PARAMS)
        for rid, _ in prompts:
            assert list(out.outputs[rid]) == references[name][rid], f"{name} {rid} over {transport}"
            assert out.outputs[f"again-{rid}"] == out.outputs[rid]
        assert any(r.cached_tokens for r in out.prefill.values())
        assert decode.stats().running == 0
        with decode._lock:
            decode.blocks.assert_empty()
        prefill.cache.blocks.assert_empty()
    finally:
        prefill.shutdown()
        decode.shutdown()


@pytest.mark.parametrize("name", MODELS)
def test_colocated_worker_equals_transformers(served, references, name):
    from decode_worker.colocated import ColocatedWorker

    engine = replace(_engine(served[name]), max_num_seqs=4)
    worker = ColocatedWorker(WorkerConfig(engine=engine, worker_id="colocated-0", auth_token="t",
                                          max_num_batched_tokens=8))  # prompts cut into chunks of decode steps
    try:
        prompts = _prompts()
        assert worker.submit([ColocatedTask(rid, tuple(p), PARAMS) for rid, p in prompts]) == []
        results = {}
        deadline = time.time() + 120
        while len(results) < len(prompts):
            assert time.time() < deadline, "colocated worker did not finish"
            results |= {r.request_id: r for r in worker.poll(0.2).results}
        for rid, _ in prompts:
            assert results[rid].error is None
            assert list(results[rid].token_ids) == references[name][rid], f"{name} {rid} colocated"
        deadline = time.time() + 10
        while worker.stats().pool.free_blocks != worker.stats().pool.num_blocks:
            assert time.time() < deadline, worker.stats()
            time.sleep(0.05)
    finally:
        worker.shutdown()
