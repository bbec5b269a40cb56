"""int8 KV on the default model (SmolLM2-135M): greedy agreement with the float KV cache, and a whole batch
through Ray with int4 weights and int8 KV."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from pdserve.bench.quant import agreement, greedy

pytestmark = pytest.mark.slow


def test_greedy_agreement_with_the_float_kv_cache(default_model_dir, tokenizer):
    """fp32 activations, 8 prompts x 32 tokens. The figure is printed (README: measured figures); only a
    sane floor is asserted, since where two near-tied logits swap depends on the prompt."""
    from engine.runner import ModelRunner
    from pdserve.bench.workload import WorkloadSpec, make_workload

    prompts = [list(r.prompt_ids) for r in make_workload(
        WorkloadSpec(num_requests=8, min_prompt=16, max_prompt=128, seed=1), tokenizer)]
    outs = {}
    for kv in ("auto", "int8"):
        runner = ModelRunner(EngineConfig(dtype="float32", device="cpu", kv_cache_dtype=kv))
        outs[kv] = greedy(runner, prompts, 32)
    share = agreement(outs["int8"], outs["auto"])
    same = sum(a == b for a, b in zip(outs["int8"], outs["auto"]))
    print(f"int8 KV vs float32 KV, greedy: agreement {share:.2f}, {same}/8 outputs identical")
    assert share >= 0.5


def test_a_batch_through_ray_with_int4_weights_and_int8_kv(ray_cluster, tmp_path):
    from pdserve.batch.run import BatchOptions, run_batch
    from pdserve.runtime.cluster import ClusterConfig
    from router.router import RouterConfig
    from tests.system.test_faults import outputs, write_batch

    engine = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25, quantization="int4",
                          kv_cache_dtype="int8")
    out = tmp_path / "out.jsonl"
    summary = run_batch(write_batch(tmp_path / "in.jsonl", n=16, max_tokens=8, spread=16), out, engine,
                        ClusterConfig(), RouterConfig(max_prefill_tokens=512), BatchOptions(progress=False))
    recs = outputs(out)
    assert summary.succeeded == 16 and summary.failed == 0, summary.render()
    assert all(r["error"] is None and r["pdserve"]["output_token_ids"] for r in recs.values())
    assert summary.kv_blocks_leaked == 0, "the decode side must end with every KV block free"
    # The KV travelled as int8 + scales, (64 + 4) bytes per token-head instead of fp32's 256, for the tokens
    # the decode worker did not hold already (prefix caching: the shared chat template).
    per_token = 30 * 2 * 3 * (64 + 4)
    for r in recs.values():
        sent = r["pdserve"]["kv_bytes"]
        assert sent % per_token == 0 and sent <= r["response"]["body"]["usage"]["prompt_tokens"] * per_token
    assert any(r["pdserve"]["kv_bytes"] for r in recs.values())
