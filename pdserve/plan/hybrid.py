"""Fit `--mode hybrid`'s rule (router/hybrid_rule.py) from the stage profile: the longest prompt worth
chunking into the decode steps at each decode load level.

A chunked prompt of L uncached tokens adds about `b_s_per_token * L` seconds of compute to the decode
steps it rides in (the linear layers see its rows beside the decode rows; the step's fixed cost is paid
anyway). Every request decoding beside it pays that time once, spread over its own output, so its mean
TPOT grows by `b * L / D` (D: mean output tokens). At a load level whose busiest batch b steps in
`step(b)`, the TPOT headroom is `tpot_slo - step(b)`, and

    L_max(level) = headroom * D / b_s_per_token       (0 when the steps alone miss the TPOT SLO)

capped by the chunked prompt's own TTFT: at `budget` prompt tokens per step it takes ceil(L / budget)
steps of `step(b) + b * budget` seconds, which must fit the TTFT SLO. The top level (saturated) chunks
nothing. The PD path's prefill rate for the queue test is 1 / b_s_per_token.
"""

from __future__ import annotations

import math

from pdserve.plan.profile import StageProfile
from router.hybrid_rule import HybridRule

LOAD_EDGES = (0.5, 0.9)  # decode load levels: requests held over max_num_seqs


def fit_hybrid_rule(profile: StageProfile, ttft_slo_s: float, tpot_slo_s: float, mean_output_tokens: float,
                    max_num_seqs: int, context_tokens: float, chunk_budget: int = 512,
                    load_edges: tuple[float, ...] = LOAD_EDGES) -> HybridRule:
    """The rule for this hardware and workload: one threshold per load level below saturation."""
    per_token = max(profile.prefill.b_s_per_token, 1e-9)
    thresholds = []
    for edge in load_edges:  # each level below saturation, at its busiest batch (its upper edge)
        step = profile.decode.time(max(1.0, edge * max_num_seqs), context_tokens)
        by_tpot = max(0.0, tpot_slo_s - step) * mean_output_tokens / per_token
        thresholds.append(math.floor(min(by_tpot, _by_ttft(step, per_token, chunk_budget, ttft_slo_s)) + 1e-6))
    return HybridRule(load_edges=load_edges, chunk_max_tokens=(*thresholds, 0),  # saturated: all to PD
                      prefill_tokens_per_s=1.0 / per_token, ttft_slo_s=ttft_slo_s)


def _by_ttft(step_s: float, per_token: float, budget: int, ttft_slo_s: float) -> float:
    """The longest prompt whose chunks, `budget` tokens per step, finish within the TTFT SLO."""
    per_step = step_s + per_token * budget
    steps = math.floor(ttft_slo_s / per_step) if per_step > 0 else 0
    return float(steps * budget)
