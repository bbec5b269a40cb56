"""Prefix caching end to end: real Ray, the default model (fp32), both transports, 1 and 2 workers of each
role. A few short questions behind one shared header: greedy outputs must equal those with caching off,
later requests must find the header cached (computed and sent less), and no KV block may leak."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig

pytestmark = pytest.mark.slow

HEADER = ("You answer questions about the following notice. Notice: the library on Elm Street opens at nine "
          "in the morning and closes at six in the evening on weekdays. On Saturdays it opens at ten and "
          "closes at four. It is closed on Sundays and public holidays. Members may borrow up to eight books "
          "for three weeks; late returns cost ten cents a day. The reading room on the second floor is quiet "
          "and has forty seats. Printing costs five cents a page.")
QUESTIONS = ["When does it open on Saturday?", "How many books can I borrow?", "Is it open on Sunday?",
             "What does printing cost?", "Where is the reading room?", "What is the late fee?"]


def _run(tmp_path: Path, name: str, caching: bool, transport: str, workers: int) -> tuple[object, dict]:
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i, q in enumerate(QUESTIONS):
            body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "system", "content": HEADER}, {"role": "user", "content": q}]}
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
    out = tmp_path / f"{name}.jsonl"
    engine = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25, prefill_cache_gib=0.1)
    summary = run_batch(inp, out, replace(engine, enable_prefix_caching=caching),
                        ClusterConfig(num_prefill=workers, num_decode=workers, transport=transport),
                        RouterConfig(max_prefill_tokens=192), BatchOptions(progress=False))
    return summary, {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_caching_on_equals_off_over_both_transports_and_worker_counts(ray_cluster, tmp_path):
    _, off = _run(tmp_path, "off", False, "shm", 1)
    assert all(r["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for r in off.values())
    for transport, workers in (("shm", 1), ("grpc", 2)):
        summary, on = _run(tmp_path, f"on-{transport}-{workers}", True, transport, workers)
        assert summary.failed == 0 and summary.kv_blocks_leaked == 0
        for cid, rec in on.items():
            assert rec["pdserve"]["output_token_ids"] == off[cid]["pdserve"]["output_token_ids"], (transport, cid)
            cached = rec["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == rec["pdserve"]["cached_tokens"] and cached % 16 == 0
        hits = [r for r in on.values() if r["pdserve"]["cached_tokens"] > 0]
        assert len(hits) >= 2, f"{transport}/{workers}: the header was never found cached"
        assert summary.cached_tokens == sum(r["pdserve"]["cached_tokens"] for r in on.values())
        sent_on = sum(r["pdserve"]["kv_bytes"] for r in on.values())
        sent_off = sum(r["pdserve"]["kv_bytes"] for r in off.values())
        assert sent_on < sent_off, f"{transport}/{workers}: cached blocks were sent again"
