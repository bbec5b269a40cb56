"""`--mode colocated` end to end: the same parity, leak and fault checks as PD, through a real Ray cluster
and the real default model (fp32 greedy equal to transformers' generate token for token)."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.request import State
from router.router import RouterConfig
from tests.system.test_e2e import QUESTIONS, read_output, reference_outputs, write_batch  # noqa: F401 (a fixture)
from tests.system.test_faults import KillOnce

pytestmark = pytest.mark.slow

# A 24-token budget cuts every prompt (~35 tokens with the chat template) into chunks, mixed into the
# decode steps of the requests already running.
ENGINE = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25, max_num_seqs=8)
CLUSTER = ClusterConfig(mode="colocated", num_colocated=2, max_num_batched_tokens=24)


def run(tmp_path, name: str, on_tick=None):
    out = tmp_path / f"{name}.jsonl"
    summary = run_batch(write_batch(tmp_path / "in.jsonl"), out, ENGINE, CLUSTER, RouterConfig(),
                        BatchOptions(progress=False), on_tick=on_tick)
    return summary, read_output(out)


def check(summary, records, reference) -> None:
    assert summary.succeeded == len(QUESTIONS) and summary.failed == 0, summary.render()
    assert summary.kv_blocks_leaked == 0
    for cid, ref in reference.items():
        ext = records[cid]["pdserve"]
        assert ext["output_token_ids"] == ref, f"{cid}: colocated {ext['output_token_ids']} != transformers {ref}"


def test_colocated_greedy_outputs_equal_transformers(ray_cluster, tmp_path, reference_outputs):  # noqa: F811
    summary, records = run(tmp_path, "colocated")
    check(summary, records, reference_outputs)
    used = set()
    for cid in reference_outputs:
        ext = records[cid]["pdserve"]
        t = ext["timeline"]
        assert t["queued"] <= t["prefill_start"] <= t["prefill_end"] <= t["decode_admit"] <= t["finish"]
        assert t["first_token"] == t["prefill_end"] == t["transfer_start"] == t["transfer_end"]
        assert ext["kv_bytes"] == 0 and ext["transport"] == "none"
        assert ext["prefill_worker"] == ext["decode_worker"]
        assert len(ext["token_times_ms"]) == len(ext["output_token_ids"])
        used.add(ext["decode_worker"])
    assert used == {"colocated-0", "colocated-1"}


def test_killed_colocated_worker_loses_no_request(ray_cluster, tmp_path, reference_outputs):  # noqa: F811
    def decoding(router) -> bool:
        return sum(r.state == State.DECODE for r in router.active.values()) >= 3

    kill = KillOnce("decode", decoding)  # router.workers.decode holds the colocated workers
    summary, records = run(tmp_path, "killed", on_tick=kill)
    assert kill.done
    check(summary, records, reference_outputs)
    retried = [r for r in records.values() if r["pdserve"]["attempts"] > 1]
    assert retried and all("colocated worker" in r["pdserve"]["retried_after"][0] for r in retried)


def test_colocated_server_streams_the_transformers_answer(ray_cluster, reference_outputs, tokenizer):  # noqa: F811
    """`pdserve serve --mode colocated` with the real `openai` client: the streamed deltas add up to the
    greedy answer, arrive in pieces as the worker makes them, and no block stays held."""
    import openai

    from pdserve.serve.server import ServeOptions, start_server
    from tests.pdserve.serve.test_serve import _wait_idle

    running = start_server(ENGINE, CLUSTER, RouterConfig(), ServeOptions(port=0))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=120)
        for i in (0, 2):
            chunks = list(client.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": QUESTIONS[i]}],
                max_tokens=32, temperature=0, stream=True))
            pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert "".join(pieces) == tokenizer.decode(reference_outputs[f"q{i}"], skip_special_tokens=True)
            assert len(pieces) > 1
        assert _wait_idle(running) == 0
    finally:
        running.stop()
