"""Everything the dashboard and the report draw, computed from output records.

The live page, the report and the test all call `dashboard_state`, so a figure
on the page is the figure computed from the output file. Time series are
reconstructed from per-request timelines on a fixed grid of points.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pdserve.observability.limiting import attainment_series, limiting_stage
from pdserve.observability.metrics import (
    SLO,
    RequestMetrics,
    by_finish,
    goodput_series,
    offered_served,
    speculative_summary,
    summarize,
)
from router.queue import DEFAULT_BUCKET_EDGES, LengthBucketQueue

GRID_POINTS = 120
GANTT_ROWS = 40
HIST_BINS = 24
LIMIT_WINDOW_S = 60.0  # the limiting stage is judged on the requests that finished in the last minute


# The router states a live chart counts (router/request.py State), in pipeline order.
LIVE_STATES = ("queued", "prefill", "admitting", "decode")


@dataclass(frozen=True)
class LiveSample:
    """The router's live state at one refresh (MetricsCollector.refresh): what /metrics reported then."""

    at: float  # time.time()
    states: dict[str, int]  # router state -> requests in it
    queue_depth: dict[str, int]  # prompt-length bucket -> queued requests


def live_series(history: Sequence[LiveSample], t0: float) -> dict[str, Any]:
    """Requests in each state and queued per bucket at each refresh up to now, seconds from `t0`: in-flight
    requests counted as they were, so an overload shows while it happens, not once its requests finish."""
    buckets = sorted({b for s in history for b in s.queue_depth}, key=lambda b: int(b.split("-")[0].rstrip("+")))
    return {"t": [round(s.at - t0, 3) for s in history],
            "in_stage": {state: [s.states.get(state, 0) for s in history] for state in LIVE_STATES},
            "queue_depth": {b: [s.queue_depth.get(b, 0) for s in history] for b in buckets}}


def backlog(now: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline: requests in each state now, and the state holding most of them (where the backlog is)."""
    if not now or "states" not in now:
        return None
    counts = {state: int(now["states"].get(state, 0)) for state in LIVE_STATES}
    total = sum(counts.values())
    return {"counts": counts, "in_flight": total, "at": max(counts, key=counts.get) if total else None}


def _grid(t0: float, t1: float, points: int = GRID_POINTS) -> list[float]:
    span = max(t1 - t0, 1e-6)
    return [t0 + span * i / (points - 1) for i in range(points)]


def _count_between(grid: list[float], spans: list[tuple[float, float, float]]) -> list[float]:
    """For each grid time t: the sum of weights w of spans with start <= t < end."""
    out = []
    for t in grid:
        out.append(sum(w for a, b, w in spans if a <= t < b))
    return out


def histogram(values: Sequence[float], bins: int = HIST_BINS) -> dict[str, Any]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"edges": [], "counts": []}
    lo, hi = min(xs), max(xs)
    if hi <= lo:
        hi = lo + 1e-9
    width = (hi - lo) / bins
    counts = [0] * bins
    for x in xs:
        counts[min(bins - 1, int((x - lo) / width))] += 1
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": counts}


def _spec_series(ok: Sequence[RequestMetrics], bucket_s: float, t0: float) -> list[dict[str, Any]]:
    """Speculative decoding's figures per bucket of finish time; empty when it was off."""
    buckets = by_finish([r for r in ok if r.spec_drafted is not None], bucket_s, t0)
    keys = ("acceptance_rate", "tokens_per_forward", "gamma_mean")
    return [{"t": round(i * bucket_s, 3), **({k: s[k] for k in keys} if (s := speculative_summary(rs))
                                             else dict.fromkeys(keys))}
            for i, rs in enumerate(buckets)]


def dashboard_state(requests: Sequence[RequestMetrics], slo: SLO, *, total_lines: int | None = None,
                    live: dict[str, Any] | None = None, title: str = "pdserve batch",
                    bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
                    in_flight_queued: Sequence[float] = (), history: Sequence[LiveSample] = ()) -> dict[str, Any]:
    """`in_flight_queued`: queued times of requests not finished yet (live), for the offered rate; `history`:
    the router's state at each live refresh, which the stage and queue charts are drawn from when given."""
    done = [r for r in requests]
    summary = summarize(done, slo) if done else None
    state: dict[str, Any] = {"title": title, "generated_at": time.time(), "live": live is not None,
                             "total_lines": total_lines, "summary": summary, "slo": {"ttft_s": slo.ttft_s,
                                                                                     "tpot_s": slo.tpot_s}}
    if live is not None:
        state["now"] = live
    state["rates"] = offered_served(done, in_flight_queued, LIMIT_WINDOW_S)
    state["backlog"] = backlog(live)
    if history:  # before any request finished too: an overload's first minute has no finishes
        start = min([h.at for h in history] + [r.queued for r in done] + list(in_flight_queued))
        state["live_series"] = live_series(history, start)
    if not done:
        return state
    t0 = min([r.queued for r in done] + list(in_flight_queued) + [h.at for h in history[:1]])
    t1 = max(r.finish for r in done)
    grid = _grid(t0, t1)
    rel = [round(t - t0, 4) for t in grid]
    ok = [r for r in done if r.ok]
    queue = LengthBucketQueue(bucket_edges)

    series: dict[str, Any] = {"t": rel}
    bucket_s = max((t1 - t0) / 30, 0.5)
    series["goodput"] = goodput_series(done, slo, bucket_s=bucket_s, start=t0, in_flight_queued=in_flight_queued)
    series["attainment"] = attainment_series(done, slo, bucket_s=bucket_s, start=t0)
    series["speculative"] = _spec_series(ok, bucket_s, t0)
    limit = limiting_stage(done, slo, window_s=LIMIT_WINDOW_S)
    state["limiting"] = asdict(limit) if limit else None
    # Requests in each stage over time.
    stages = {
        "queued": [(r.queued, r.prefill_start or r.finish, 1) for r in done],
        "prefill": [(r.prefill_start, r.prefill_end, 1) for r in done if r.prefill_start and r.prefill_end],
        "transfer": [(r.prefill_end, r.transfer_end, 1) for r in done
                     if r.prefill_end and r.transfer_end and r.transfer_end > r.prefill_end],
        "decode": [(r.decode_admit, r.finish, 1) for r in ok if r.decode_admit],
    }
    series["in_stage"] = {k: _count_between(grid, v) for k, v in stages.items()}
    by_bucket: dict[str, list] = defaultdict(list)
    for r in done:
        by_bucket[queue.bucket_label(queue.bucket_of(r.prompt_tokens))].append(
            (r.queued, r.prefill_start or r.finish, 1))
    series["queue_depth"] = {label: _count_between(grid, spans) for label, spans in sorted(
        by_bucket.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))}
    kv: dict[str, list] = defaultdict(list)
    batch: dict[str, list] = defaultdict(list)
    for r in ok:
        if r.decode_worker and r.prefill_start:
            kv[r.decode_worker].append((r.prefill_start, r.finish, r.kv_blocks))
        if r.decode_worker and r.decode_admit:
            batch[r.decode_worker].append((r.decode_admit, r.finish, 1))
    series["kv_blocks"] = {w: _count_between(grid, spans) for w, spans in sorted(kv.items())}
    series["decode_batch"] = {w: _count_between(grid, spans) for w, spans in sorted(batch.items())}
    state["series"] = series
    state["distributions"] = {
        "ttft_s": histogram([r.ttft_s for r in ok]),
        "tpot_s": histogram([r.tpot_s for r in ok]),
        "e2e_s": histogram([r.e2e_s for r in ok]),
        "queue_wait_s": histogram([r.queue_wait_s for r in done]),
        "transfer_gbps": histogram([r.transfer_gbps for r in done]),
    }
    ordered = sorted(done, key=lambda r: r.queued)
    step = max(1, math.ceil(len(ordered) / GANTT_ROWS))
    state["timeline"] = [{
        "id": r.custom_id, "ok": r.ok,
        **{k: (round(v - t0, 4) if v is not None else None) for k, v in (
            ("queued", r.queued), ("prefill_start", r.prefill_start), ("prefill_end", r.prefill_end),
            ("transfer_end", r.transfer_end), ("decode_admit", r.decode_admit), ("finish", r.finish))},
    } for r in ordered[::step][:GANTT_ROWS]]
    return state
