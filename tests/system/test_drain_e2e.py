"""Draining workers in the middle of a batch (router/drain.py, the autoscaler's scale-down): a prefill and a
decode worker of two each are drained while requests run on them; every request completes with the same
tokens as the run without, the drained workers stop holding no KV block, and none is leaked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.calls import Role
from router.request import State
from router.router import RouterConfig

pytestmark = pytest.mark.slow

N = 48


def _batch(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(N):
            body = {"prompt": [(i * 13 + k) % 250 + 1 for k in range(8 + i % 40)], "max_tokens": 24 + i % 32,
                    "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return path


def _run(tmp_path: Path, model: Path, name: str, on_tick=None):
    engine = EngineConfig(model=str(model), dtype="float32", device="cpu", kv_cache_gib=0.05, max_num_seqs=16)
    out = tmp_path / f"{name}.jsonl"
    summary = run_batch(_batch(tmp_path / "in.jsonl"), out, engine, ClusterConfig(num_prefill=2, num_decode=2),
                        RouterConfig(max_prefill_tokens=128, max_prefill_batch=4), BatchOptions(progress=False),
                        on_tick=on_tick)
    return summary, {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}


class DrainOnce:
    """on_tick: drain prefill-1 and decode-1 once decode-1 decodes a few requests and prefill-1 has served."""

    def __init__(self) -> None:
        self.router = None

    def __call__(self, router) -> None:
        if self.router is not None:
            return
        on_d1 = sum(r.decode_worker == "decode-1" and r.state == State.DECODE for r in router.active.values())
        if on_d1 >= 3 and any(r.prefill_worker == "prefill-1" for r in router.active.values()):
            self.router = router
            router.drain_worker(Role.PREFILL, "prefill-1")
            router.drain_worker(Role.DECODE, "decode-1")


def test_draining_a_prefill_and_a_decode_worker_mid_batch_loses_nothing(ray_cluster, tmp_path, tiny_with_tokenizer):
    ref_summary, reference = _run(tmp_path, tiny_with_tokenizer, "ref")
    assert ref_summary.succeeded == N and ref_summary.kv_blocks_leaked == 0
    drain = DrainOnce()
    summary, records = _run(tmp_path, tiny_with_tokenizer, "drained", on_tick=drain)
    assert drain.router is not None, "the batch ended before the drain began"
    assert summary.succeeded == N and summary.failed == 0, summary.render()
    assert summary.kv_blocks_leaked == 0
    assert drain.router.drains.stopped == {"prefill-1": 0, "decode-1": 0}  # both stopped, holding nothing
    assert set(drain.router.workers.decode) == {"decode-0"} and set(drain.router.workers.prefill) == {"prefill-0"}
    for cid, rec in reference.items():
        got = records[cid]["pdserve"]
        assert got["output_token_ids"] == rec["pdserve"]["output_token_ids"], cid
        assert got["attempts"] == 1, f"{cid} was retried: draining moves nothing"
