"""`pdserve bench autoscale --simulate`: the autoscaler's controller against the planner's simulator.

Time is cut into intervals (`interval_s`). In each, the trace gives the offered rate; the planner's
discrete-event simulation of the router (pdserve/plan/model.py `predict`) gives the attainment the
current prefill/decode counts reach at that rate, and which stage limits; the controller sees the rate as
a deployment would measure it (a Poisson count over the interval) with that attainment, and its
decisions take effect from the next interval (a worker needs time to start). Reported per trace:
request-weighted attainment, worker-seconds, direction changes, against the cheapest static P:D that
reaches the same attainment over the whole trace (searched along the model's P:D ratio).

The simulator's cost grows with the workers it simulates, so predictions are cached per (P, D, rate
rounded to `rate_step`), and each simulates `samples` requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import lru_cache

import numpy as np

from pdserve.autoscale.controller import Capacity, Controller, ControllerConfig, Decision, Observation, ScaleRole
from pdserve.plan.model import Config, Resources, Workload, predict
from pdserve.plan.profile import StageProfile


class TraceKind(str, Enum):
    STEP = "step"
    DIURNAL = "diurnal"
    BURSTY = "bursty"


def trace(kind: TraceKind, peak_rps: float, duration_s: float, interval_s: float, seed: int) -> np.ndarray:
    """Offered rate per interval, reproducible from `seed`: a step (low, peak for the middle third, low),
    a day compressed into `duration_s` (a sine from 15% to 100% of the peak, plus 5% noise), or a low
    base with random bursts to the peak (a few intervals each)."""
    rng = np.random.default_rng(seed)
    n = max(1, int(duration_s // interval_s))
    t = np.arange(n) / n
    if kind == TraceKind.STEP:
        return np.where((t >= 1 / 3) & (t < 2 / 3), peak_rps, 0.2 * peak_rps)
    if kind == TraceKind.DIURNAL:
        base = 0.575 - 0.425 * np.cos(2 * math.pi * t)
        return peak_rps * np.clip(base * (1 + 0.05 * rng.standard_normal(n)), 0.05, 1.0)
    rates = np.full(n, 0.25 * peak_rps)
    for start in rng.choice(n, size=max(1, n // 20), replace=False):
        rates[start:start + int(rng.integers(2, 6))] = peak_rps
    return rates


@dataclass
class FleetModel:
    """Attainment and limiting stage of P prefill + D decode workers at a rate, from the planner."""

    profile: StageProfile
    workload: Workload
    resources: Resources
    max_batch: int
    rate_step: float = 0.05  # rates are rounded to this share of themselves (geometric buckets)
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._cached = lru_cache(maxsize=None)(self._predict)

    def bucket(self, rate: float) -> float:
        if rate <= 0:
            return 0.0
        step = math.log1p(self.rate_step)
        return float(math.exp(round(math.log(rate) / step) * step))

    def at(self, prefill: int, decode: int, rate: float) -> tuple[float, ScaleRole | None]:
        return self._cached(prefill, decode, self.bucket(rate))

    def _predict(self, prefill: int, decode: int, rate: float) -> tuple[float, ScaleRole | None]:
        if rate <= 0:
            return 1.0, None
        self.calls += 1
        p = predict(self.profile, replace(self.workload, rate_rps=rate), self.resources,
                    Config(prefill, decode, self.max_batch))
        limiting = None if p.attainment >= 1.0 else ScaleRole(p.limiting_stage)
        return p.attainment, limiting


@dataclass(frozen=True)
class RunResult:
    attainment: float  # request-weighted over the trace
    worker_s: float
    direction_changes: int
    decisions: tuple[Decision, ...] = ()
    prefill: int = 0  # static runs: the counts
    decode: int = 0


def run_autoscaled(model: FleetModel, rates: np.ndarray, interval_s: float, config: ControllerConfig,
                   capacity: Capacity, seed: int) -> RunResult:
    rng = np.random.default_rng([seed, 2])
    controller = Controller(config, capacity, config.prefill.min_workers, config.decode.min_workers)
    counts = {role: controller.workers(role) for role in ScaleRole}
    served = met = worker_s = 0.0
    decisions: list[Decision] = []
    for i, rate in enumerate(rates):
        attainment, limiting = model.at(counts[ScaleRole.PREFILL], counts[ScaleRole.DECODE], rate)
        served, met = served + rate, met + rate * attainment
        worker_s += sum(counts.values()) * interval_s
        measured = rng.poisson(rate * interval_s) / interval_s
        decisions += controller.observe(Observation((i + 1) * interval_s, measured, attainment, limiting))
        counts = {role: controller.workers(role) for role in ScaleRole}  # from the next interval on
    return RunResult(met / served if served else 1.0, worker_s, _direction_changes(decisions), tuple(decisions))


def _direction_changes(decisions: list[Decision]) -> int:
    changes = 0
    for role in ScaleRole:
        signs = [d.delta > 0 for d in decisions if d.role == role]
        changes += sum(a != b for a, b in zip(signs, signs[1:]))
    return changes


def run_static(model: FleetModel, rates: np.ndarray, interval_s: float, prefill: int, decode: int) -> RunResult:
    att = [model.at(prefill, decode, r)[0] for r in rates]
    served = float(rates.sum())
    attainment = float(np.dot(att, rates) / served) if served else 1.0
    return RunResult(attainment, (prefill + decode) * interval_s * len(rates), 0, prefill=prefill, decode=decode)


def best_static(model: FleetModel, rates: np.ndarray, interval_s: float, capacity: Capacity, target: float,
                most_workers: int) -> RunResult | None:
    """The fewest workers, split in the model's P:D ratio (and one decode worker either side), whose
    static run reaches `target` attainment; None if `most_workers` cannot."""
    share = capacity.decode_rps / (capacity.prefill_rps + capacity.decode_rps)  # of the fleet for prefill

    def cheapest(total: int) -> RunResult | None:
        p = max(1, round(total * share))
        splits = {(p, total - p), (p + 1, total - p - 1), (p - 1, total - p + 1)}
        runs = [run_static(model, rates, interval_s, a, b) for a, b in splits if a >= 1 and b >= 1]
        ok = [r for r in runs if r.attainment >= target]
        return max(ok, key=lambda r: r.attainment) if ok else None

    low, high = 2, most_workers
    if cheapest(high) is None:
        return None
    while low < high:  # attainment rises with the fleet: bisect on its size
        mid = (low + high) // 2
        if cheapest(mid) is None:
            low = mid + 1
        else:
            high = mid
    return cheapest(low)
