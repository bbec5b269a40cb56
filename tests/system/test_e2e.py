"""End to end through a real local Ray cluster, real gRPC / shared memory and the real default model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Explain why the sky is blue in one sentence.",
    "Write a haiku about autumn.",
    "What is 7 times 8?",
    "Name three fruits that are red.",
    "How do I boil an egg?",
    "Translate 'thank you' into French.",
    "What is the largest ocean on Earth?",
    "Give one tip for sleeping better.",
    "Who wrote Romeo and Juliet?",
]
MAX_TOKENS = 32


def write_batch(path: Path, extra_lines: list[str] = ()) -> Path:
    with open(path, "w") as f:
        for i, q in enumerate(QUESTIONS):
            body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": q}],
                    "max_tokens": MAX_TOKENS, "temperature": 0}
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


@pytest.fixture(scope="module")
def reference_outputs(default_model_dir, tokenizer) -> dict[str, list[int]]:
    """transformers' greedy generate, one prompt at a time, fp32."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    refs = {}
    for i, q in enumerate(QUESTIONS):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        refs[f"q{i}"] = out[0, len(ids):].tolist()
    return refs


def read_output(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["custom_id"]: r for r in records if r["custom_id"] is not None}
    return by_id | {f"line{r['pdserve']['line']}": r for r in records if r["custom_id"] is None}


def run(tmp_path, transport, decode_workers=1, extra_lines=()):
    inp = write_batch(tmp_path / "in.jsonl", list(extra_lines))
    out = tmp_path / f"out-{transport}-{decode_workers}.jsonl"
    summary = run_batch(inp, out, EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25),
                        ClusterConfig(num_decode=decode_workers, transport=transport),
                        RouterConfig(max_prefill_tokens=256), BatchOptions(progress=False))
    return summary, read_output(out)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_greedy_outputs_equal_transformers(ray_cluster, tmp_path, reference_outputs, tokenizer, transport):
    summary, records = run(tmp_path, transport)
    assert summary.succeeded == len(QUESTIONS) and summary.failed == 0
    for cid, ref in reference_outputs.items():
        rec = records[cid]
        assert rec["error"] is None
        ext = rec["pdserve"]
        assert ext["transport"] == transport
        assert ext["output_token_ids"] == ref, f"{cid}: pdserve {ext['output_token_ids']} != transformers {ref}"
        choice = rec["response"]["body"]["choices"][0]
        assert choice["message"]["content"] == tokenizer.decode(ref, skip_special_tokens=True)
        assert choice["finish_reason"] == ("stop" if ref[-1] == tokenizer.eos_token_id else "length")
        usage = rec["response"]["body"]["usage"]
        assert usage["completion_tokens"] == len(ref)
        t = ext["timeline"]
        assert t["queued"] <= t["prefill_start"] <= t["prefill_end"] <= t["decode_admit"] <= t["finish"]
        assert t["transfer_start"] <= t["transfer_end"] and t["first_token"] == t["prefill_end"]
        assert ext["kv_bytes"] == usage["prompt_tokens"] * 2 * 30 * 3 * 64 * 4  # fp32 K and V, every layer


def test_two_decode_workers_share_the_batch(ray_cluster, tmp_path, reference_outputs):
    bad = ['{"custom_id": "broken", "method": "POST"', '{"custom_id": "nourl", "body": {"prompt": "x"}}']
    summary, records = run(tmp_path, "auto", decode_workers=2, extra_lines=bad)
    assert summary.succeeded == len(QUESTIONS) and summary.failed == 2
    used = {records[cid]["pdserve"]["decode_worker"] for cid in reference_outputs}
    assert used == {"decode-0", "decode-1"}
    for cid, ref in reference_outputs.items():
        assert records[cid]["pdserve"]["output_token_ids"] == ref
        assert records[cid]["pdserve"]["transport"] == "shm"  # auto on one node
    assert records[f"line{len(QUESTIONS) + 1}"]["error"]["code"] == "invalid_json"
    assert records["nourl"]["error"]["code"] == "unsupported_url"


def test_cli_runs_the_sample_batch(tmp_path):
    """The README's demo path: the `pdserve` command starts its own cluster and writes every line."""
    sample = Path(__file__).resolve().parents[2] / "examples" / "sample_batch.jsonl"
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "pdserve.cli", "run-batch", "-i", str(sample), "-o", str(out),
                           "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sample.read_text().splitlines()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == sorted(json.loads(line)["custom_id"] for line in lines)
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in records)
    assert f"{len(lines)} requests: {len(lines)} succeeded, 0 failed" in proc.stdout
