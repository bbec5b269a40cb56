"""The makespan breakdown (pdserve/bench/breakdown.py): the step-time fit, the decode replay and the split."""

from __future__ import annotations

import pytest

from pdserve.bench.breakdown import StepCurve, compute, render, replay_decode
from proto.stats import DecodeStats, LoopStats, PoolStats, PrefillStats


def test_the_step_curve_fits_a_line_through_the_measured_steps():
    steps = {b: (c, c * (0.02 + 0.001 * b)) for b, c in ((1, 3), (8, 5), (32, 10), (64, 2))}
    curve = StepCurve.fit(steps)
    assert curve.fixed == pytest.approx(0.02) and curve.per_row == pytest.approx(0.001)
    assert StepCurve.fit({}) is None
    assert StepCurve.fit({16: (4, 0.4)}) == StepCurve(0.1, 0.0)  # one batch size: its mean, flat
    noisy = StepCurve.fit({1: (1, 0.001), 2: (1, 0.001), 20: (1, 2.0)})  # a line would cross zero
    assert noisy.fixed == 0.0 and noisy.per_row == pytest.approx(2.002 / 23)


def test_the_replay_runs_each_request_for_its_decode_steps_at_most_max_num_seqs_at_once():
    unit = StepCurve(1.0, 0.0)  # one second per step: the replay counts steps
    assert replay_decode([5, 3, 1], 8, unit) == 4  # first tokens come from prefill; 4 more for the longest
    assert replay_decode([3, 3, 3], 2, unit) == 4  # two run 2 steps, then the third its 2
    rows = StepCurve(0.0, 1.0)  # one second per row: the replay sums the batch sizes
    assert replay_decode([3, 2], 8, rows) == 2 + 1


def test_compute_splits_the_makespan_and_sets_the_ideal_beside_it():
    loop = LoopStats(steps=4, step_seconds=2.0, steps_by_rows={2: (2, 1.0), 1: (2, 1.0)}, lease_wait_seconds=0.5)
    decode = DecodeStats("d0", PoolStats(10, 10, 0, 0), running=0, waiting=0, loop=loop)
    prefill = PrefillStats("p0", batches=2, prompt_tokens=1000, computed_tokens=800, forward_seconds=2.0,
                           call_seconds=2.5, lease_wait_seconds=0.25)
    b = compute(6.0, [prefill], [decode], prompt_tokens=1000, output_lengths=[3, 2], max_num_seqs=8)
    assert b.prefill_s == 2.0 and b.decode_s == 2.0 and b.rest_s == pytest.approx(2.0)
    assert b.lease_wait_s == pytest.approx(0.75) and b.prefill_tok_s == pytest.approx(400.0)
    assert b.ideal_prefill_s == pytest.approx(2.0)  # the 800 computed tokens at 400 tok/s
    assert b.ideal_decode_s == pytest.approx(1.0)  # 0.5 s per step (flat fit), two steps
    assert "ideal makespan 3.00 s" in render(b)
    colocated = compute(6.0, [], [decode], 1000, [3, 2], 8)
    assert colocated.prefill_s is None and colocated.ideal_s is None and colocated.rest_s == pytest.approx(4.0)
