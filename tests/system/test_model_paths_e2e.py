"""Mixture-of-experts and generic-path models end to end: run-batch through a real local Ray cluster (1 prefill
+ 1 decode worker over shared memory or gRPC, or colocated workers with chunked prompts), fp32 greedy
equal to transformers' generate token for token, and no KV block left held."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig
from tests.model_paths import hf_greedy, tiny_generic_models, tiny_moe_models, with_tokenizer  # noqa: F401
from tests.system.test_e2e import read_output

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
RUNS = [("mixtral", "pd", "shm"), ("qwen3_moe", "pd", "grpc"), ("olmoe", "pd", "shm"), ("qwen2_moe", "pd", "grpc"),
        ("qwen3_moe", "colocated", "auto"), ("mixtral", "colocated", "auto"),
        ("gpt2", "pd", "shm"), ("gpt2", "pd", "grpc"), ("gpt_neox", "pd", "grpc"), ("gpt_neox", "colocated", "auto")]


def _prompts() -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(21)
    return {f"q{i}": torch.randint(3, 256, (n,), generator=gen).tolist() for i, n in enumerate((7, 33, 18, 52))}


@pytest.fixture(scope="module")
def served(tiny_moe_models, tiny_generic_models, default_model_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("e2e-served")
    return {name: with_tokenizer(shutil.copytree(folder, root / name), default_model_dir)
            for name, folder in {**tiny_moe_models, **tiny_generic_models}.items()}


@pytest.mark.parametrize("name,mode,transport", RUNS)
def test_run_batch_equals_transformers(ray_cluster, served, tmp_path, name, mode, transport):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(served[name], dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = _prompts()
    refs = {cid: hf_greedy(hf, p, MAX_TOKENS) for cid, p in prompts.items()}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        for cid, p in prompts.items():
            body = {"model": name, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
            f.write(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    engine = EngineConfig(model=str(served[name]), dtype="float32", device="cpu", kv_cache_gib=0.01, block_size=8,
                          max_num_seqs=8)
    cluster = (ClusterConfig(mode="colocated", num_colocated=1, max_num_batched_tokens=16) if mode == "colocated"
               else ClusterConfig(transport=transport))
    summary = run_batch(inp, out, engine, cluster, RouterConfig(max_prefill_tokens=64), BatchOptions(progress=False))
    assert summary.succeeded == len(prompts) and summary.failed == 0, summary.render()
    assert summary.kv_blocks_leaked == 0
    records = read_output(out)
    for cid, ref in refs.items():
        ext = records[cid]["pdserve"]
        assert ext["output_token_ids"] == ref, f"{name} {mode}/{transport} {cid}: {ext['output_token_ids']} != {ref}"
        if mode == "pd":
            assert ext["transport"] == transport and ext["kv_bytes"] > 0
