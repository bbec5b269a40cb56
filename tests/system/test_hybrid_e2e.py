"""`--mode hybrid` end to end: one prefill worker and one hybrid worker, the real default model, fp32 greedy.
Half the prompts (the shorter) are chunk-prefilled on the hybrid worker, the others prefilled on the
prefill worker with their KV sent over; every output equals transformers' generate (and so PD's, which
tests/system/test_e2e.py holds to the same reference), and no KV block is left held."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.runtime.cluster import ClusterConfig
from router.hybrid_rule import HybridRule
from router.router import RouterConfig
from tests.system.test_e2e import QUESTIONS, read_output, reference_outputs, write_batch  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

# Prefix caching off: the chat template's shared header, once cached on the hybrid worker, would send
# later long prompts to the chunked path (as the rule should: tests/router/test_hybrid_rule.py), and the
# path each prompt takes would depend on timing.
ENGINE = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25, max_num_seqs=8, enable_prefix_caching=False)


def _prompt_lengths(tokenizer) -> list[int]:
    return [len(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_hybrid_greedy_outputs_equal_transformers_on_both_paths(ray_cluster, tmp_path, reference_outputs,  # noqa: F811
                                                                 tokenizer, transport):
    lengths = _prompt_lengths(tokenizer)
    threshold = sorted(lengths)[len(lengths) // 2 - 1]  # the shorter half is chunked
    rule = HybridRule(load_edges=(10.0, 20.0), chunk_max_tokens=(threshold, threshold, 0))  # load never decides
    out = tmp_path / "hybrid.jsonl"
    cluster = ClusterConfig(mode="hybrid", transport=transport, max_num_batched_tokens=24)  # chunks of <= 24
    summary = run_batch(write_batch(tmp_path / "in.jsonl"), out, ENGINE, cluster,
                        RouterConfig(max_prefill_tokens=256, hybrid_rule=rule), BatchOptions(progress=False))
    records = read_output(out)
    assert summary.succeeded == len(QUESTIONS) and summary.failed == 0, summary.render()
    assert summary.kv_blocks_leaked == 0
    paths = {}
    for i, (cid, ref) in enumerate(reference_outputs.items()):
        ext = records[cid]["pdserve"]
        assert ext["output_token_ids"] == ref, f"{cid} ({ext['path']}): {ext['output_token_ids']} != {ref}"
        paths[cid] = ext["path"]
        assert ext["decode_worker"] == "hybrid-0"
        if lengths[i] <= threshold:
            assert ext["path"] == "chunked" and ext["transport"] == "none" and ext["prefill_worker"] == "hybrid-0"
        else:
            assert ext["path"] == "pd" and ext["transport"] == transport and ext["prefill_worker"] == "prefill-0"
            assert ext["kv_bytes"] > 0
    assert set(paths.values()) == {"pd", "chunked"}
