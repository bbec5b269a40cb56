"""Tensor-parallel workers end to end (issue 25): real Ray, `run_batch`, the tiny Llama (4 query heads, 2 KV
heads, fp32). Each rank is its own Ray actor; rank 0 talks to the router, the others follow its steps. Prefill
and decode degrees differ, so the KV is resharded on the way (shared memory: the sender splits heads over the
decode ranks' pools; gRPC: rank 0's inbox does). Greedy tokens equal transformers' generate; no block leaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
PROMPT_LENS = (9, 33, 70)
RUNS = [(2, 1, "shm"), (1, 2, "shm"), (2, 2, "grpc"), (0, 2, "colocated")]  # (prefill TP, decode TP, transport)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(25)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _reference(folder: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    out = []
    for p in _prompts():
        ids = torch.tensor([p])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                          eos_token_id=-1)
        out.append(gen[0, len(p):].tolist())
    return out


def _follower_ranks() -> int:
    """Follower-rank actors this cluster has created (alive or stopped)."""
    import ray._private.state as state  # the GCS's actor table (the state API needs the dashboard)

    return sum(a.get("ActorClassName") == "RankActor" for a in state.actors().values())


def _run(tmp_path: Path, folder: Path, prefill_tp: int, decode_tp: int, transport: str) -> tuple[object, list]:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        for i, p in enumerate(_prompts()):
            body = {"model": folder.name, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    engine = EngineConfig(model=str(folder), dtype="float32", device="cpu", kv_cache_gib=0.01, max_num_seqs=8)
    if transport == "colocated":
        cluster = ClusterConfig(mode="colocated", num_colocated=1, max_num_batched_tokens=24, decode_tp=decode_tp)
    else:
        cluster = ClusterConfig(transport=transport, prefill_tp=prefill_tp, decode_tp=decode_tp)
    summary = run_batch(inp, out, engine, cluster, RouterConfig(max_prefill_tokens=256), BatchOptions(progress=False))
    by_id = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return summary, [by_id[f"p{i}"] for i in range(len(PROMPT_LENS))]


@pytest.mark.parametrize("prefill_tp,decode_tp,transport", RUNS)
def test_tp_mix_greedy_equals_transformers(ray_cluster, tiny_served, tmp_path, prefill_tp, decode_tp, transport):
    folder = tiny_served("llama")
    before = _follower_ranks()
    summary, records = _run(tmp_path, folder, prefill_tp, decode_tp, transport)
    expected = max(prefill_tp - 1, 0) + decode_tp - 1
    assert _follower_ranks() - before == expected, "each worker's ranks > 0 ran as their own actors"
    assert summary.failed == 0 and summary.kv_blocks_leaked == 0, summary.render()
    for rec, ref, n in zip(records, _reference(folder), PROMPT_LENS):
        assert rec["error"] is None
        got = rec["pdserve"]["output_token_ids"]
        assert got == ref, f"TP {prefill_tp}->{decode_tp} over {transport}, {n}-token prompt: {got} != {ref}"


@pytest.fixture(scope="module")
def default_references(default_model_dir, tokenizer) -> dict[str, list[int]]:
    """transformers' fp32 greedy generate of test_e2e's chat batch, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    from tests.system.test_e2e import MAX_TOKENS as N
    from tests.system.test_e2e import QUESTIONS

    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    refs = {}
    for i, q in enumerate(QUESTIONS):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        refs[f"q{i}"] = hf.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False)[0, len(ids):].tolist()
    return refs


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_default_model_across_degrees(ray_cluster, tmp_path, default_references, tokenizer, prefill_tp, decode_tp):
    """SmolLM2-135M (9 query, 3 KV heads: split 3 + 6 and 1 + 2 at TP 2) gives transformers' fp32 greedy text."""
    from tests.system.test_e2e import read_output, write_batch

    inp, out = write_batch(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    summary = run_batch(inp, out, EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25),
                        ClusterConfig(transport="shm", prefill_tp=prefill_tp, decode_tp=decode_tp),
                        RouterConfig(max_prefill_tokens=256), BatchOptions(progress=False))
    assert summary.failed == 0 and summary.kv_blocks_leaked == 0, summary.render()
    records = read_output(out)
    for cid, ref in default_references.items():
        ext = records[cid]["pdserve"]
        assert ext["output_token_ids"] == ref, f"TP {prefill_tp}->{decode_tp} {cid}: {ext['output_token_ids']} != {ref}"
        text = records[cid]["response"]["body"]["choices"][0]["message"]["content"]
        assert text == tokenizer.decode(ref, skip_special_tokens=True)
