"""Issue 26's dense families end to end: real Ray, `run_batch`, tiny random-weight models (fp32), prompts
longer than the sliding window. 1 prefill + 1 decode worker over shared memory and gRPC, and colocated
workers (chunked prefill mixed into decode steps): greedy tokens equal transformers' `generate`, a
windowed model's transfers carry only the window's blocks, and no KV block leaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_window import blocks_before_window
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig
from tests.conftest import WINDOW

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
PROMPT_LENS = (9, 21, 45, 70)
BS = 16  # the engine's default block size
KV_WINDOW = {"mistral-sw": WINDOW, "phi3": 24}  # models whose every layer is windowed (conftest.py)
RUNS = [("mistral-sw", "shm"), ("mistral-sw", "grpc"), ("mistral-sw", "colocated"),
        ("qwen2-sw", "shm"), ("gemma2", "shm"), ("gemma2", "grpc"), ("gemma2", "colocated"),
        ("gemma3", "grpc"), ("phi3", "shm")]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(26)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _reference(folder: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for p in _prompts():
        ids = torch.tensor([p])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                          eos_token_id=-1)
        out.append(gen[0, len(p):].tolist())
    return out


def _run(tmp_path: Path, folder: Path, mode: str) -> tuple[object, list[dict]]:
    inp, out = tmp_path / "in.jsonl", tmp_path / f"out-{mode}.jsonl"
    with open(inp, "w") as f:
        for i, p in enumerate(_prompts()):
            body = {"model": folder.name, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    engine = EngineConfig(model=str(folder), dtype="float32", device="cpu", kv_cache_gib=0.01, max_num_seqs=8)
    cluster = (ClusterConfig(mode="colocated", num_colocated=1, max_num_batched_tokens=24) if mode == "colocated"
               else ClusterConfig(num_decode=1, transport=mode))
    summary = run_batch(inp, out, engine, cluster, RouterConfig(max_prefill_tokens=256), BatchOptions(progress=False))
    by_id = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return summary, [by_id[f"p{i}"] for i in range(len(PROMPT_LENS))]


@pytest.mark.parametrize("name,mode", RUNS)
def test_greedy_equals_transformers_and_windows_cut_the_transfer(ray_cluster, tiny_served, tmp_path, name, mode):
    folder = tiny_served(name)
    summary, records = _run(tmp_path, folder, mode)
    assert summary.failed == 0 and summary.kv_blocks_leaked == 0, summary.render()
    for rec, ref, n in zip(records, _reference(folder), PROMPT_LENS):
        ext = rec["pdserve"]
        assert rec["error"] is None
        assert ext["output_token_ids"] == ref, f"{name}/{mode}, {n}-token prompt: {ext['output_token_ids']} != {ref}"
        assert ext["kv_bytes"] == 0 if mode == "colocated" else ext["kv_bytes"] > 0
    if mode != "colocated":
        sent = [r["pdserve"]["kv_bytes"] for r in records]
        per_token = sent[0] // PROMPT_LENS[0]  # 9 tokens: no block skipped, whatever the model
        # Every layer windowed: blocks before the first decode step's window stay home; else all travels.
        window = KV_WINDOW.get(name)
        assert sent == [(n - blocks_before_window(n, window, BS) * BS) * per_token for n in PROMPT_LENS]
        if name == "mistral-sw":
            assert sent[3] == (70 - 3 * BS) * per_token  # a 70-token prompt sends 22 tokens' KV
