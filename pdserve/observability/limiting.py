"""Which stage limits goodput: the one to give another worker.

Every SLO miss of a succeeded request is blamed on one stage, by where its time went:

    prefill   TTFT over its SLO (queue wait + prefill compute: the prefill side is short of capacity)
    transfer  TPOT over its SLO, but within it once the KV transfer's exposed time (transfer_end -
              prefill_end, the part after the first token) is taken out of the decode span
    decode    TPOT over its SLO even without that transfer time (admit wait + decode steps)

A request may be blamed on prefill and on one of transfer/decode. A stage's attainment is the share
of requests not blamed on it; prefill's equals the TTFT attainment, decode's is the TPOT attainment
plus the TPOT misses the transfer caused.

The limiting stage, over the requests that succeeded and finished in the window (end - window_s, end]
(end: the latest finish, so a finished batch keeps its last figures), is the stage with the lowest
attainment — as load rises, the first to drop, which is what DistServe's attainment-vs-rate curves
read off. Ties (including no miss at all) go to the stage with the least headroom: the highest p90
of its time over its SLO budget (prefill: TTFT / TTFT SLO; transfer: exposed transfer per output gap
/ TPOT SLO; decode: the rest of TPOT / TPOT SLO), then to pipeline order prefill, transfer, decode.
`below_target` says whether that attainment is under the target (0.9): only then does the stage
actually cost goodput; otherwise it is the one that will, first, as load grows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.observability.metrics import SLO, RequestMetrics, by_finish, percentile

STAGES = ("prefill", "transfer", "decode")
ADVICE = {
    "prefill": "add a prefill worker (or raise the TTFT SLO)",
    "transfer": "speed up the KV transfer (a faster transport, prefix caching), not a worker",
    "decode": "add a decode worker (or lower --max-num-seqs per worker)",
}


@dataclass(frozen=True)
class StageLoad:
    stage: str
    attainment: float  # share of the window's requests with no SLO miss blamed on this stage
    misses: int
    headroom_p90: float | None  # p90 of (stage time / its SLO budget); 1.0 = at the SLO


@dataclass(frozen=True)
class LimitingStage:
    stage: str
    below_target: bool
    target: float
    window_s: float
    requests: int  # succeeded requests that finished in the window
    stages: tuple[StageLoad, ...]  # in pipeline order
    advice: str


def blame(r: RequestMetrics, slo: SLO) -> tuple[set[str], dict[str, float]]:
    """(stages blamed for r's SLO misses, each stage's time / its SLO budget) of a succeeded request."""
    ttft_ok, tpot_ok = r.meets(slo)
    tpot_slo = r.slo_tpot_s or slo.tpot_s
    ratios = {"prefill": (r.ttft_s if r.ttft_s is not None else math.inf) / (r.slo_ttft_s or slo.ttft_s),
              "transfer": 0.0, "decode": 0.0}
    if r.tpot_s is not None and r.output_tokens > 1:
        span = r.tpot_s * (r.output_tokens - 1)
        exposed = min(max(r.transfer_exposed_s or 0.0, 0.0), span)
        ratios["transfer"] = exposed / (r.output_tokens - 1) / tpot_slo
        ratios["decode"] = (span - exposed) / (r.output_tokens - 1) / tpot_slo
    blamed = set() if ttft_ok else {"prefill"}
    if not tpot_ok:
        without_transfer = (r.tpot_s or 0.0) - ratios["transfer"] * tpot_slo
        blamed.add("transfer" if without_transfer <= tpot_slo else "decode")
    return blamed, ratios


def stage_loads(requests: Sequence[RequestMetrics], slo: SLO) -> tuple[StageLoad, ...]:
    """Attainment, misses and headroom of each stage over succeeded `requests` (at least one)."""
    judged = [blame(r, slo) for r in requests if r.ok]
    n = len(judged)
    return tuple(StageLoad(stage=s, attainment=sum(s not in b for b, _ in judged) / n,
                           misses=sum(s in b for b, _ in judged),
                           headroom_p90=percentile([ratio[s] for _, ratio in judged], 90))
                 for s in STAGES)


def limiting_stage(requests: Sequence[RequestMetrics], slo: SLO, *, window_s: float = 60.0,
                   end: float | None = None, target: float = 0.9) -> LimitingStage | None:
    """The stage that limits goodput over the window (module docstring); None when no request
    succeeded in it."""
    if end is None:
        end = max((r.finish for r in requests if r.ok), default=0.0)
    window = [r for r in requests if r.ok and end - window_s < r.finish <= end]
    if not window:
        return None
    loads = stage_loads(window, slo)
    worst = min(loads, key=lambda x: (x.attainment, -(x.headroom_p90 or 0.0), STAGES.index(x.stage)))
    return LimitingStage(stage=worst.stage, below_target=worst.attainment < target, target=target,
                         window_s=window_s, requests=len(window), stages=loads, advice=ADVICE[worst.stage])


def attainment_series(requests: Sequence[RequestMetrics], slo: SLO, bucket_s: float,
                      start: float) -> list[dict[str, float | None]]:
    """Each stage's attainment per bucket of finish time (None where no request finished), for the
    chart that shows which stage drops first."""
    out: list[dict[str, float | None]] = []
    for i, rs in enumerate(by_finish([r for r in requests if r.ok], bucket_s, start)):
        loads = {x.stage: x.attainment for x in stage_loads(rs, slo)} if rs else dict.fromkeys(STAGES)
        out.append({"t": round(i * bucket_s, 3), **loads})
    return out
