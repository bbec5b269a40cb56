"""The planner's fit of `--mode hybrid`'s rule (pdserve/plan/hybrid.py), and `pdserve plan` printing it."""

from __future__ import annotations

import json

from pdserve.cli import main
from pdserve.plan.hybrid import fit_hybrid_rule
from pdserve.plan.profile import DecodeFit, PrefillFit, StageProfile
from proto.kinds import PrefillPath
from router.hybrid_rule import HybridSignals

# Prefill 1 ms per token; a decode step 20 ms + 1 ms per sequence (context-free).
PROFILE = StageProfile(PrefillFit(0.01, 0.001), DecodeFit(0.02, 0.001, 0.0), kv_bytes_per_token=1000,
                       num_layers=10, threads=1, description="hand-made")


def test_thresholds_follow_the_tpot_headroom_at_each_load_level():
    rule = fit_hybrid_rule(PROFILE, ttft_slo_s=100.0, tpot_slo_s=0.1, mean_output_tokens=100, max_num_seqs=40,
                           context_tokens=0)
    # level 0 (batch <= 20): step 40 ms, headroom 60 ms x 100 tokens / 1 ms = 6000 tokens
    # level 1 (batch <= 36): step 56 ms, headroom 44 ms -> 4400; saturated: 0
    assert rule.chunk_max_tokens == (6000, 4400, 0)
    assert rule.prefill_tokens_per_s == 1000.0 and rule.ttft_slo_s == 100.0


def test_the_ttft_slo_caps_a_chunked_prompt():
    rule = fit_hybrid_rule(PROFILE, ttft_slo_s=2.0, tpot_slo_s=0.1, mean_output_tokens=100, max_num_seqs=40,
                           context_tokens=0, chunk_budget=512)
    # a step with a 512-token chunk: 40 ms + 512 ms; 3 of them fit 2 s -> 1536 tokens
    assert rule.chunk_max_tokens[0] == 1536


def test_no_headroom_chunks_nothing():
    rule = fit_hybrid_rule(PROFILE, ttft_slo_s=2.0, tpot_slo_s=0.03, mean_output_tokens=100, max_num_seqs=40,
                           context_tokens=0)
    assert rule.chunk_max_tokens == (0, 0, 0)
    assert rule.choose(HybridSignals(8, 0, 0, 0.0, 2.0)) == PrefillPath.PD


def test_plan_prints_the_rule(tmp_path, capsys):
    PROFILE.save(tmp_path / "p.json")
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--rate", "1", "--prompt-len", "100",
                 "--output-len", "50", "--cpus", "2", "--samples", "200", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "--mode hybrid" in out and "decode load 0%-50%: chunk prompts up to" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["hybrid_rule"]["chunk_max_tokens"][-1] == 0
