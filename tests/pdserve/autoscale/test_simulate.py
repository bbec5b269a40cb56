"""`pdserve bench autoscale --simulate` (pdserve/autoscale/simulate.py): seeded traces, the controller
against the planner's simulator, and the static baseline, on a hand-made profile."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.autoscale.controller import Bounds, Capacity, ControllerConfig
from pdserve.autoscale.simulate import FleetModel, TraceKind, best_static, run_autoscaled, run_static, trace
from pdserve.cli import main
from pdserve.observability.metrics import SLO
from pdserve.plan.model import LengthDist, Resources, Workload, stage_capacity_rps
from pdserve.plan.profile import DecodeFit, PrefillFit, StageProfile

PROFILE = StageProfile(PrefillFit(0.01, 0.0005), DecodeFit(0.02, 0.0005, 0.0), kv_bytes_per_token=1000,
                       num_layers=10, threads=1, description="hand-made")
WORKLOAD = Workload(1.0, LengthDist.parse("64:256"), LengthDist.parse("16:64"), SLO(ttft_s=2.0, tpot_s=0.1),
                    samples=100)
RESOURCES = Resources(total=40, shared=False, transfer_gbps=0)


@pytest.mark.parametrize("kind", list(TraceKind))
def test_traces_are_reproducible_from_their_seed_and_reach_the_peak(kind):
    a, b = trace(kind, 10.0, 3600, 30, seed=3), trace(kind, 10.0, 3600, 30, seed=3)
    assert np.array_equal(a, b) and len(a) == 120
    assert a.max() == pytest.approx(10.0, rel=0.06) and a.min() > 0
    assert not np.array_equal(a, trace(kind, 10.0, 3600, 30, seed=4)) or kind == TraceKind.STEP


def test_capacity_per_worker_comes_from_the_planner_loads():
    prefill, decode = stage_capacity_rps(PROFILE, WORKLOAD, RESOURCES, max_batch=32)
    assert prefill > 0 and decode > 0
    # a prefill worker packs ~2048 tokens per call of 0.01 + 0.0005 x tokens s: ~ 2048/160 prompts/1.03 s
    assert 10 < prefill < 14


def test_the_autoscaler_tracks_a_step_with_fewer_worker_seconds_than_the_static_peak_fleet():
    capacity = Capacity(*stage_capacity_rps(PROFILE, WORKLOAD, RESOURCES, max_batch=32))
    model = FleetModel(PROFILE, WORKLOAD, RESOURCES, max_batch=32)
    rates = trace(TraceKind.STEP, 40.0, 3600, 60, seed=0)  # 8 -> 40 -> 8 req/s: ~1 -> ~4 workers per role
    config = ControllerConfig(prefill=Bounds(1, 10), decode=Bounds(1, 20))
    auto = run_autoscaled(model, rates, 60, config, capacity, seed=0)
    assert auto.attainment > 0.8
    assert auto.direction_changes <= 2  # one up and one down per role at most: one change each
    ups = [d for d in auto.decisions if d.delta > 0]
    downs = [d for d in auto.decisions if d.delta < 0]
    assert ups and downs and max(d.at_s for d in ups) < min(d.at_s for d in downs)
    static = best_static(model, rates, 60, capacity, auto.attainment, most_workers=30)
    assert static is not None and static.attainment >= auto.attainment
    assert auto.worker_s < static.worker_s
    smaller = run_static(model, rates, 60, max(1, static.prefill - 1), max(1, static.decode - 1))
    assert smaller.attainment < auto.attainment or smaller.worker_s >= static.worker_s


def test_the_bench_command_prints_one_line_per_trace(tmp_path, capsys):
    PROFILE.save(tmp_path / "p.json")
    assert main(["bench", "autoscale", "--simulate", "--profile", str(tmp_path / "p.json"), "--peak-rps", "30",
                 "--duration", "1800", "--interval", "60", "--samples", "80", "--prompt-len", "64:256",
                 "--output-len", "16:64", "--max-batch", "32", "--max-prefill", "8", "--max-decode", "16"]) == 0
    out = capsys.readouterr().out
    for kind in TraceKind:
        assert out.count(f"\n{kind.value} ") == 1
    assert "ratio" in out


def test_without_simulate_the_command_says_what_is_missing(tmp_path):
    PROFILE.save(tmp_path / "p.json")
    assert main(["bench", "autoscale", "--profile", str(tmp_path / "p.json")]) == 2
