"""Planner vs measurement: the rate `pdserve plan` predicts a configuration sustains at >= the target
attainment, beside the rate `pdserve bench serve` measured for the same configuration and requests.

The prediction serves the benchmark's own prompt and output lengths (not a uniform draw; resampled to
`STEADY_REQUESTS` when the benchmark sent fewer, so that it predicts a steady state) under the router
settings the benchmark ran with, at its SLOs, for its prefill/decode worker counts and max decode batch,
each worker with the torch threads it ran with. The benchmarked workers share this one node (its cores,
or its one GPU), so the prediction counts their interference (`Resources.shared`), as measured by a
profile with busy-neighbour fits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdserve.observability.metrics import SLO
from pdserve.plan.model import Config, LengthDist, Resources, Workload, max_rate, max_rate_colocated
from pdserve.plan.profile import StageProfile
from pdserve.plan.simulate import ROUTER_DEFAULTS, RouterPolicy

STEADY_REQUESTS = 2000


def predicted_sustained(profile: StageProfile, lengths: list[tuple[int, int]], slo: SLO, config: Config,
                        threads_per_worker: int, target: float = 0.9, kind: str = "cpu",
                        transfer_gbps: float = 2.0, policy: RouterPolicy = ROUTER_DEFAULTS, cv: float = 1.0,
                        cached_tokens: float = 0.0, front_end_cpu_s: float = 0.0) -> float:
    """Requests/s the planner says `config` serves at >= `target` attainment, over these (prompt, output)
    token counts, arrivals with gaps of this CV (1: Poisson), `cached_tokens` of each prompt in the prefix
    cache (on average, as the benchmark's server reported them), `front_end_cpu_s` of the benchmark
    process's CPU per request on the same cores (its router, server and client)."""
    workload, resources, steady = _setting(lengths, slo, config.prefill_workers + config.decode_workers,
                                           threads_per_worker, kind, transfer_gbps, cv, cached_tokens,
                                           front_end_cpu_s)
    return max_rate(profile, workload, resources, config, target, lengths=steady, policy=policy)


def predicted_sustained_colocated(profile: StageProfile, lengths: list[tuple[int, int]], slo: SLO, workers: int,
                                  max_batch: int, batched_tokens: int, threads_per_worker: int, target: float = 0.9,
                                  kind: str = "cpu", policy: RouterPolicy = ROUTER_DEFAULTS, cv: float = 1.0,
                                  cached_tokens: float = 0.0, front_end_cpu_s: float = 0.0) -> float:
    """The same for `workers` colocated workers (`batched_tokens` 0: the workers' default budget)."""
    workload, resources, steady = _setting(lengths, slo, workers, threads_per_worker, kind, 0.0, cv, cached_tokens,
                                           front_end_cpu_s)
    return max_rate_colocated(profile, workload, resources, workers, max_batch, batched_tokens, target, steady,
                              policy)


def _setting(lengths: list[tuple[int, int]], slo: SLO, workers: int, threads_per_worker: int, kind: str,
             transfer_gbps: float, cv: float,
             cached_tokens: float, front_end_cpu_s: float) -> tuple[Workload, Resources, tuple[np.ndarray, np.ndarray]]:
    if not lengths:
        raise ValueError("no request lengths to predict over")
    if len(lengths) < STEADY_REQUESTS:
        picks = np.random.default_rng(0).integers(0, len(lengths), STEADY_REQUESTS)
        lengths = [lengths[i] for i in picks]
    prompts = np.array([p for p, _ in lengths])
    outputs = np.array([o for _, o in lengths])
    workload = Workload(rate_rps=1.0, prompt=LengthDist(int(prompts.min()), int(prompts.max())),
                        output=LengthDist(int(outputs.min()), int(outputs.max())), slo=slo, samples=len(lengths),
                        cv=cv, cached_tokens=cached_tokens)
    share = float(threads_per_worker) if kind == "cpu" else 1.0
    resources = Resources(total=workers * share, per_worker=share, kind=kind, transfer_gbps=transfer_gbps, shared=True,
                          front_end_cpu_s_per_request=front_end_cpu_s)
    return workload, resources, (prompts, outputs)


def compare(predicted_rps: float, measured: dict[str, Any]) -> dict[str, Any]:
    """Side by side; the relative error (predicted - measured) / measured. When the measurement is
    only a bound (every rate met the target, or none did), the error is against that bound and says so."""
    rate = measured.get("rate_rps")
    error = (predicted_rps - rate) / rate if rate else None
    exact = measured.get("bound") == "interpolated"
    if measured.get("bound") == "at_least" and predicted_rps >= rate:
        verdict = "consistent with the lower bound measured (measure higher rates to pin it down)"
    elif measured.get("bound") == "below" and predicted_rps <= rate:
        verdict = "consistent with the upper bound measured (measure lower rates to pin it down)"
    elif error is None:
        verdict = "no measured rate"
    else:
        verdict = ("within" if abs(error) <= 0.2 else "outside") + " the issue's 20% goal" + \
            ("" if exact else " (against a bound, not an interpolated rate)")
    return {"predicted_rps": predicted_rps, "measured_rps": rate, "measured_bound": measured.get("bound"),
            "relative_error": error, "verdict": verdict}
