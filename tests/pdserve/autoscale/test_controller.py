"""The autoscaler's controller (pdserve/autoscale/controller.py) on scripted signals, one every 10 s."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.autoscale.controller import Bounds, Capacity, Controller, ControllerConfig, Observation, ScaleRole

CAP = Capacity(prefill_rps=10.0, decode_rps=5.0)  # one prefill worker serves 10 req/s, one decode worker 5
CONFIG = ControllerConfig(prefill=Bounds(1, 6), decode=Bounds(1, 12))


def run(controller: Controller, rates, start_s: float = 0.0, step_s: float = 10.0, **obs):
    decisions = []
    for i, rate in enumerate(rates):
        decisions += controller.observe(Observation(start_s + i * step_s, float(rate), **obs))
    return decisions


def direction_changes(decisions, role: ScaleRole) -> int:
    signs = [np.sign(d.delta) for d in decisions if d.role == role]
    return sum(a != b for a, b in zip(signs, signs[1:]))


def test_noise_around_a_steady_load_changes_nothing():
    controller = Controller(CONFIG, CAP, prefill=2, decode=4)  # 14 req/s: prefill at 0.70, decode at 0.70
    rng = np.random.default_rng(0)
    assert run(controller, 14 * (1 + 0.15 * rng.standard_normal(360))) == []  # an hour of +-15% noise


def settled(controller: Controller, rate: float) -> bool:
    """Every role's utilisation inside the hysteresis band: nothing more to do at this rate."""
    c = controller.config
    for role in ScaleRole:
        n, per = controller.workers(role), CAP.of(role)
        if rate / (n * per) > c.up_util:
            return False
        if n > c.bounds(role).min_workers and rate / ((n - 1) * per) < c.down_util:
            return False
    return True


def test_a_step_up_scales_each_role_in_a_few_decisions_then_holds():
    controller = Controller(CONFIG, CAP, prefill=1, decode=2)
    decisions = run(controller, [7] * 30 + [35] * 60)
    assert all(d.delta > 0 and d.at_s >= 300 for d in decisions)
    assert settled(controller, 35)
    assert controller.workers(ScaleRole.PREFILL) >= 5 and controller.workers(ScaleRole.DECODE) >= 9
    assert len(decisions) <= 4  # sized from the model: not one worker per cooldown
    assert max(d.at_s for d in decisions) <= 300 + 60  # within a minute of the step


def test_scale_down_after_the_step_waits_its_cooldown_and_never_reverses():
    controller = Controller(CONFIG, CAP, prefill=1, decode=2)
    decisions = run(controller, [7] * 30 + [35] * 60 + [7] * 90)
    downs = [d for d in decisions if d.delta < 0]
    assert downs and all(d.at_s >= 900 for d in downs)
    ups = [d for d in decisions if d.delta > 0]
    assert downs[0].at_s - max(d.at_s for d in ups if d.role == downs[0].role) >= CONFIG.down_cooldown_s
    assert settled(controller, 7) and controller.workers(ScaleRole.DECODE) < max(d.after for d in ups)
    for role in ScaleRole:  # one load change up, one down: one change of direction each, at most
        assert direction_changes(decisions, role) <= 1


def test_min_and_max_are_respected():
    controller = Controller(ControllerConfig(prefill=Bounds(2, 3), decode=Bounds(2, 4)), CAP, prefill=2, decode=2)
    decisions = run(controller, [500] * 50 + [0.01] * 100)
    assert max(d.after for d in decisions if d.role == ScaleRole.PREFILL) == 3
    assert max(d.after for d in decisions if d.role == ScaleRole.DECODE) == 4
    assert controller.workers(ScaleRole.PREFILL) == 2 and controller.workers(ScaleRole.DECODE) == 2
    assert all(2 <= d.after for d in decisions)


def test_the_limiting_stage_gets_a_worker_when_attainment_falls():
    controller = Controller(CONFIG, CAP, prefill=2, decode=4)
    decisions = run(controller, [14] * 3, attainment=0.6, limiting=ScaleRole.DECODE)
    assert [(d.role, d.before, d.after) for d in decisions] == [(ScaleRole.DECODE, 4, 5)]
    assert "limited by decode" in decisions[0].reason


def test_no_scale_down_while_slos_are_missed():
    controller = Controller(CONFIG, CAP, prefill=4, decode=8)
    assert run(controller, [1] * 30, attainment=0.5) == []


def test_an_oscillating_load_is_bounded_in_direction_changes():
    controller = Controller(CONFIG, CAP, prefill=1, decode=1)
    square = ([40] * 15 + [2] * 15) * 10  # every 5 minutes, for 50 minutes
    decisions = run(controller, square)
    for role in ScaleRole:
        changes = direction_changes(decisions, role)
        assert changes <= 50 * 60 / CONFIG.reversal_window_s * CONFIG.max_reversals + 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="down_util"):
        ControllerConfig(down_util=0.8, target_util=0.7)
    with pytest.raises(ValueError, match="min <= max"):
        Bounds(3, 2)
