"""The stage that limits goodput, offered vs served rate, and per-stage attainment over time, on
hand-made timelines with known answers. SLO throughout: TTFT <= 1 s, TPOT <= 0.1 s."""

from __future__ import annotations

import pytest

from pdserve.observability.limiting import attainment_series, blame, limiting_stage
from pdserve.observability.metrics import SLO, from_record, goodput_series
from tests.pdserve.observability.test_metrics import record

SLO_ = SLO(ttft_s=1.0, tpot_s=0.1)


def rec(cid, queued=0.0, ttft=0.3, exposed=0.05, gaps_ms=(90, 90, 90), ok=True):
    """Queued at `queued`, first token `ttft` later, KV transfer done `exposed` after it, then tokens
    every gaps_ms (ms) after the first."""
    first = queued + ttft
    times = [0.0]
    for g in gaps_ms:
        times.append(times[-1] + g)
    return from_record(record(cid, queued, queued + 0.1, first, first + exposed, first + exposed, times, ok=ok))


def test_blame_by_where_the_time_went():
    assert blame(rec("ok"), SLO_)[0] == set()
    assert blame(rec("slow-prefill", ttft=1.5), SLO_)[0] == {"prefill"}
    # TPOT 0.25 s; the transfer's 0.6 s after the first token is 0.2 s per gap: without it 0.05 s.
    blamed, ratios = blame(rec("slow-transfer", exposed=0.6, gaps_ms=(650, 50, 50)), SLO_)
    assert blamed == {"transfer"}
    assert ratios["transfer"] == pytest.approx(2.0) and ratios["decode"] == pytest.approx(0.5)
    # TPOT 0.2 s; without the 0.05 s transfer still 0.175 s: the decode side's.
    assert blame(rec("slow-decode", gaps_ms=(200, 200)), SLO_)[0] == {"decode"}
    assert blame(rec("both", ttft=2.0, gaps_ms=(200, 200)), SLO_)[0] == {"prefill", "decode"}
    assert blame(rec("one-token", gaps_ms=()), SLO_)[0] == set()  # no TPOT: it meets it


def test_decode_limits_when_its_attainment_is_lowest():
    reqs = [rec("a"), rec("b", gaps_ms=(200, 200)), rec("c", gaps_ms=(150, 150)), rec("d", ttft=1.5)]
    limit = limiting_stage(reqs, SLO_)
    loads = {s.stage: s for s in limit.stages}
    assert (loads["prefill"].attainment, loads["transfer"].attainment, loads["decode"].attainment) == (0.75, 1, 0.5)
    assert (loads["prefill"].misses, loads["transfer"].misses, loads["decode"].misses) == (1, 0, 2)
    assert limit.stage == "decode" and limit.below_target and limit.requests == 4
    assert "decode worker" in limit.advice


def test_prefill_and_transfer_limit():
    reqs = [rec("a", ttft=1.2), rec("b", ttft=1.1), rec("c", gaps_ms=(200, 200)), rec("d")]
    assert limiting_stage(reqs, SLO_).stage == "prefill"
    reqs = [rec("a", exposed=0.6, gaps_ms=(650, 50, 50)), rec("b"), rec("c")]
    limit = limiting_stage(reqs, SLO_)
    assert limit.stage == "transfer" and "not a worker" in limit.advice


def test_ties_go_to_the_stage_with_least_headroom_then_pipeline_order():
    # One miss each for transfer and decode: equal attainment. Transfer ratios [2.0, 0.25], decode
    # [0.5, 2.75] (p90 of two = the larger): decode is further over its budget.
    reqs = [rec("t", exposed=0.6, gaps_ms=(650, 50, 50)), rec("d", exposed=0.075, gaps_ms=(300, 300, 300))]
    assert [s.headroom_p90 for s in limiting_stage(reqs, SLO_).stages][1:] == [pytest.approx(2.0),
                                                                                 pytest.approx(2.75)]
    assert limiting_stage(reqs, SLO_).stage == "decode"
    # No miss at all: the stage nearest its SLO, and not below target.
    near_ttft = [rec("a", ttft=0.9, gaps_ms=(50, 50)), rec("b", ttft=0.8, gaps_ms=(50, 50))]
    limit = limiting_stage(near_ttft, SLO_)
    assert (limit.stage, limit.below_target) == ("prefill", False)
    near_tpot = [rec("a", ttft=0.2, exposed=0.0, gaps_ms=(95, 95))]
    assert limiting_stage(near_tpot, SLO_).stage == "decode"
    # Everything equal (single-token answers with no transfer... prefill still has a TTFT): prefill first.
    assert limiting_stage([rec("x", ttft=0.0, exposed=0.0, gaps_ms=())], SLO_).stage == "prefill"


def test_window_takes_only_the_latest_finishes():
    early_misses = [rec(f"e{i}", queued=0.0, gaps_ms=(500, 500)) for i in range(5)]  # decode misses, finish ~1.3 s
    late = [rec("l1", queued=100.0, ttft=1.5), rec("l2", queued=100.0)]  # a prefill miss, finish ~100.8 s
    assert limiting_stage(early_misses + late, SLO_, window_s=60).stage == "prefill"
    assert limiting_stage(early_misses + late, SLO_, window_s=200).stage == "decode"
    assert limiting_stage(early_misses + late, SLO_, window_s=60, end=30.0).stage == "decode"
    assert limiting_stage([rec("f", ok=False)], SLO_) is None and limiting_stage([], SLO_) is None


def test_offered_vs_served_rate_and_attainment_series():
    # Arrivals: 3 at t=0, 1 at t=2 (failed); completions: a at 0.6, b at 1.2, c at 2.7.
    reqs = [rec("a"), rec("b", ttft=0.9), rec("c", queued=0.0, ttft=2.4), rec("x", queued=2.0, ok=False)]
    series = goodput_series(reqs, SLO_, bucket_s=1.0, start=0.0)
    assert [p["offered_rps"] for p in series] == [3, 0, 1]
    assert [p["throughput_rps"] for p in series] == [1, 1, 1]
    assert [p["goodput_rps"] for p in series] == [1, 1, 0]
    att = attainment_series(reqs, SLO_, bucket_s=1.0, start=0.0)
    assert [p["prefill"] for p in att] == [1.0, 1.0, 0.0] and [p["decode"] for p in att] == [1.0, 1.0, 1.0]
    gap = attainment_series([rec("a"), rec("z", queued=3.0)], SLO_, bucket_s=1.0, start=0.0)
    assert gap[1] == {"t": 1.0, "prefill": None, "transfer": None, "decode": None}


def test_offered_counts_requests_still_in_flight():
    from pdserve.observability.metrics import offered_served

    # Finished: a (queued 0, finish 0.57), b (queued 1, finish 1.57). In flight: queued 1.5, 2.0, 2.0.
    done = [rec("a"), rec("b", queued=1.0)]
    rates = offered_served(done, in_flight_queued=[1.5, 2.0, 2.0], window_s=60)
    assert rates["window_s"] == pytest.approx(2.0)  # the run so far: first arrival .. latest event
    assert rates["offered_rps"] == pytest.approx(5 / 2.0) and rates["served_rps"] == pytest.approx(2 / 2.0)
    rates = offered_served(done, in_flight_queued=[1.5, 2.0, 2.0], window_s=1.0)  # (1.0, 2.0]: b, 3 in flight
    assert rates["offered_rps"] == pytest.approx(4.0) and rates["served_rps"] == pytest.approx(1.0)
    series = goodput_series(done, SLO_, bucket_s=1.0, start=0.0, in_flight_queued=[1.5, 2.0, 2.0])
    # Two buckets, [0, 1) and [1, 2]: the latest event closes the last one.
    assert [p["offered_rps"] for p in series] == [1, 4] and [p["throughput_rps"] for p in series] == [1, 1]
    assert offered_served([], [])["offered_rps"] is None
