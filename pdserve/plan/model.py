"""The planner's model: predicted TTFT, TPOT and SLO attainment of a (prefill, decode, max batch) choice.

Each prediction serves the workload's requests -- Poisson arrivals at its rate, its prompt and output
lengths -- through a simulation of the router's policies (pdserve.plan.simulate): length-bucketed
prefill calls packed up to a token budget, each worker's two-call mailbox, decode batches joined at step
boundaries up to the max batch, and workers on one device slowing each other by how many are busy.
Attainment is the share of requests that meet both SLOs (DistServe's definition, as in
pdserve.observability.metrics); goodput = rate * attainment.

A configuration whose stages cannot keep up even with full prefill calls and full decode batches is
unstable: its queues grow without bound, so there is no steady state to simulate and its attainment
is 0. Those loads are closed forms:
    prefill: rate / P * t_prefill(n * L) / n, n prompts of the mean length L per call (as many as fit
             the token budget and batch cap: the most the router can pack);
    decode:  rate / D * k * t_step(B) / B at the max batch B, k = E[output - 1] steps per request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engine.config import default_batched_tokens
from pdserve.observability.metrics import SLO
from pdserve.plan.colocated import simulate_colocated
from pdserve.plan.profile import StageProfile
from pdserve.plan.simulate import ROUTER_DEFAULTS, RouterPolicy, StageTimes, computed_squares, simulate


@dataclass(frozen=True)
class LengthDist:
    """Token counts over [low, high] (low == high: fixed): uniform, or log-uniform as `bench serve` draws
    prompts by default (as many short prompts as long ones per doubling)."""

    low: int
    high: int
    shape: str = "uniform"

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"a length range needs 1 <= low <= high, got {self.low}:{self.high}")
        if self.shape not in LENGTH_SHAPES:
            raise ValueError(f"a length distribution is one of {', '.join(LENGTH_SHAPES)}, got {self.shape!r}")

    @classmethod
    def parse(cls, text: str, shape: str = "uniform") -> LengthDist:
        """'128' (fixed) or '16:512' (a range)."""
        try:
            low, _, high = text.partition(":")
            return cls(int(low), int(high or low), shape)
        except ValueError as e:
            raise ValueError(f"a length is N or MIN:MAX, got {text!r} ({e})") from None

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.shape == "loguniform":
            return np.rint(np.exp(rng.uniform(math.log(self.low), math.log(self.high), n))).astype(int)
        return rng.integers(self.low, self.high + 1, size=n)

    def __str__(self) -> str:
        text = str(self.low) if self.low == self.high else f"{self.low}:{self.high}"
        return text if self.shape == "uniform" or self.low == self.high else f"{text} {self.shape}"


LENGTH_SHAPES = ("uniform", "loguniform")


@dataclass(frozen=True)
class Workload:
    rate_rps: float  # Poisson arrivals, requests per second
    prompt: LengthDist
    output: LengthDist
    slo: SLO = SLO()
    samples: int = 2000  # requests drawn to average attainment over the length distributions
    seed: int = 0
    cv: float = 1.0  # of the gaps between arrivals: 1 Poisson, above 1 burstier (gamma), as bench serve's --cv
    cached_tokens: float = 0.0  # prompt tokens per request found in the prefix cache (a shared system prompt)

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return self.prompt.sample(rng, self.samples), self.output.sample(rng, self.samples)

    def cached(self, prompts: np.ndarray) -> np.ndarray:
        """Each prompt's cached tokens: `cached_tokens`, less the last token, which prefill always computes."""
        return np.minimum(prompts - 1, self.cached_tokens).astype(float)

    def arrivals(self, n: int) -> np.ndarray:
        """Arrival times of n requests: Poisson, or gamma gaps of this CV. The same unit gaps scaled by
        1/rate at every rate (common random numbers): attainment then falls smoothly with the rate, which
        max_rate bisects."""
        rng = np.random.default_rng([self.seed, 1])
        shape = 1 / self.cv ** 2
        unit = rng.exponential(1.0, n) if self.cv == 1 else rng.gamma(shape, 1 / shape, n)
        return np.cumsum(unit) / self.rate_rps


@dataclass(frozen=True)
class Resources:
    """`total` cores (kind cpu) or GPUs (kind gpu); each worker gets `per_worker` of them."""

    total: float
    per_worker: float = 1.0
    kind: str = "cpu"
    transfer_gbps: float = 2.0  # per-request KV transfer rate (run-batch reports ~2 GB/s over shm)
    shared: bool | None = None  # workers slow each other (one node's cores, one GPU); None: cpu yes, gpu no
    # CPU seconds the router and the front end (HTTP server, streaming; in `bench serve`, the client too)
    # spend per request on the workers' cores: cpu only, with shared
    front_end_cpu_s_per_request: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"resource kind is cpu or gpu, got {self.kind!r}")
        if not 0 < self.per_worker <= self.total:
            raise ValueError(f"need 0 < per-worker share <= total, got {self.per_worker} of {self.total}")

    def time_scale(self, profile: StageProfile, rate_rps: float = 0.0) -> float:
        """Multiplier on profiled times for one worker's share: linear in the share (an assumption;
        profile with --threads equal to the share to make it 1), stretched by the cores the front end
        takes at this rate: its u = rate * CPU per request / cores leaves the workers 1 - u of each
        (the kernel shares a busy node's cores evenly); inf when the front end alone fills them."""
        measured = max(profile.threads, 1) if self.kind == "cpu" else 1.0
        taken = (rate_rps * self.front_end_cpu_s_per_request / self.total
                 if self.kind == "cpu" and self.interfere else 0.0)
        return math.inf if taken >= 1 else measured / self.per_worker / (1 - taken)

    @property
    def interfere(self) -> bool:
        return self.kind == "cpu" if self.shared is None else self.shared


@dataclass(frozen=True)
class Config:
    prefill_workers: int
    decode_workers: int
    max_batch: int


@dataclass(frozen=True)
class Prediction:
    config: Config
    units: float  # cores or GPUs used
    prefill_load: float  # work offered per prefill worker-second with every call full; >= 1: unstable
    decode_util: float  # offered rate over the decode capacity at the max batch; >= 1: unstable
    prefill_util: float  # share of the time a prefill worker computes (simulated)
    prefill_batch: float  # prompts per prefill call (simulated)
    prefill_wait_s: float  # mean wait from arrival to the start of its prefill call; inf when unstable
    ttft_mean_s: float
    decode_batch: float  # sequences per decode step (simulated); inf when unstable
    tpot_mean_s: float
    ttft_attainment: float
    tpot_attainment: float
    attainment: float  # both SLOs met

    @property
    def stable(self) -> bool:
        return self.prefill_load < 1 and self.decode_util < 1

    def goodput_rps(self, rate_rps: float) -> float:
        return rate_rps * self.attainment

    @property
    def limiting_stage(self) -> str:
        """The stage whose attainment is lower (ties: the busier one): where a worker helps most."""
        if self.ttft_attainment != self.tpot_attainment:
            return "prefill" if self.ttft_attainment < self.tpot_attainment else "decode"
        return "prefill" if max(self.prefill_load, self.prefill_util) >= self.decode_util else "decode"


def predict(profile: StageProfile, workload: Workload, resources: Resources, config: Config,
            lengths: tuple[np.ndarray, np.ndarray] | None = None, policy: RouterPolicy = ROUTER_DEFAULTS) -> Prediction:
    """`lengths`: (prompt, output) token counts of the requests to serve instead of the workload's draw."""
    prompts, outputs = lengths if lengths is not None else workload.draw()
    scale = resources.time_scale(profile, workload.rate_rps)
    prefill_load = _full_call_load(profile, workload, config, prompts, workload.cached(prompts), scale, policy)
    decode_util = _full_batch_load(profile, workload, config, prompts, outputs, scale)
    units = (config.prefill_workers + config.decode_workers) * resources.per_worker
    if prefill_load >= 1 or decode_util >= 1:
        return Prediction(config, units, prefill_load, decode_util, 1.0, math.inf, math.inf, math.inf, math.inf,
                          math.inf, 0.0, 0.0, 0.0)
    times = StageTimes.of(profile, scale, resources.transfer_gbps, resources.interfere,
                          transfer_hidden=resources.kind == "gpu")
    sim = simulate(times, workload.arrivals(len(prompts)), prompts, outputs, config.prefill_workers,
                   config.decode_workers, config.max_batch, policy, workload.cached(prompts))
    ttft_ok, tpot_ok, both = sim.attainment(workload.slo.ttft_s, workload.slo.tpot_s)
    decoded = outputs > 1
    return Prediction(config, units, prefill_load, decode_util, sim.prefill_busy, sim.prompts_per_call,
                      float(sim.prefill_wait_s.mean()), float(sim.ttft_s.mean()), sim.rows_per_step,
                      float(sim.tpot_s[decoded].mean()) if decoded.any() else 0.0, ttft_ok, tpot_ok, both)


def stage_capacity_rps(profile: StageProfile, workload: Workload, resources: Resources, max_batch: int,
                       policy: RouterPolicy = ROUTER_DEFAULTS) -> tuple[float, float]:
    """Requests/s one prefill worker and one decode worker (at `max_batch`) sustain when fully busy: the
    autoscaler's model of each role (pdserve/autoscale/controller.py Capacity)."""
    prompts, outputs = workload.draw()
    unit = replace(workload, rate_rps=1.0)
    scale = resources.time_scale(profile)
    one = Config(1, 1, max_batch)
    prefill = _full_call_load(profile, unit, one, prompts, unit.cached(prompts), scale, policy)
    decode = _full_batch_load(profile, unit, one, prompts, outputs, scale)
    return 1.0 / max(prefill, 1e-12), 1.0 / max(decode, 1e-12)


def _full_call_load(profile, workload, config, prompts, cached, scale, policy: RouterPolicy) -> float:
    """Prefill work per worker-second when every call packs as many prompts as the router allows."""
    mean, square = float((prompts - cached).mean()), float(computed_squares(prompts, cached).mean())
    per_call = max(1, min(policy.max_prefill_batch, int(policy.max_prefill_tokens // mean)))
    call = profile.prefill.time(per_call * mean, per_call * square)
    return workload.rate_rps / config.prefill_workers * scale * call / per_call


def _full_batch_load(profile, workload, config, prompts, outputs, scale) -> float:
    """Decode work per worker-second when every step runs the max batch."""
    steps = outputs - 1  # the first token comes from prefill
    if steps.sum() == 0:
        return 0.0
    context = _step_context(prompts, outputs)
    b = config.max_batch
    step = scale * profile.decode.time(b, context)
    return workload.rate_rps / config.decode_workers * float(steps.mean()) * step / b


def _step_context(prompts: np.ndarray, outputs: np.ndarray) -> float:
    """The mean context of a decode step's row, weighted by the steps each request runs."""
    steps = outputs - 1
    return float((steps * (prompts + outputs / 2)).sum() / max(steps.sum(), 1))


DEFAULT_MAX_BATCHES = (8, 16, 32, 64, 128, 256)


def _pick_max_batch(per_batch: list, load: Callable[[Any], float]):
    """Of one split's predictions at each max batch (ascending): the smallest whose attainment is within
    0.5 points of the best (less KV memory reserved for the same goodput); when none meets the SLOs, the
    one whose stages come closest to keeping up (`load`)."""
    best = max(p.attainment for p in per_batch)
    if best > 0:
        return next(p for p in per_batch if p.attainment >= best - 0.005)
    return min(per_batch, key=load)


def search(profile: StageProfile, workload: Workload, resources: Resources,
           max_batches: tuple[int, ...] = DEFAULT_MAX_BATCHES,
           policy: RouterPolicy = ROUTER_DEFAULTS) -> list[Prediction]:
    """Every (N prefill, M decode) that fits the resources, each with the smallest max batch whose
    attainment is within 0.5 points of the best one's (less KV memory reserved for the same goodput;
    when none meets the SLOs, the one whose stages come closest to keeping up).
    Sorted best first: goodput per unit, then attainment, then fewer units."""
    lengths = workload.draw()
    slots = int(resources.total / resources.per_worker + 1e-9)
    if slots < 2:
        raise ValueError(f"{resources.total:g} {resources.kind}s at {resources.per_worker:g} per worker "
                         "cannot hold one prefill and one decode worker")
    results = []
    for n in range(1, slots):
        for m in range(1, slots - n + 1):
            per_batch = [predict(profile, workload, resources, Config(n, m, b), lengths, policy)
                         for b in sorted(max_batches)]
            results.append(_pick_max_batch(per_batch, lambda p: (max(p.prefill_load, p.decode_util),
                                                                  p.config.max_batch)))
    return sorted(results, key=lambda p: (-p.goodput_rps(workload.rate_rps) / p.units, -p.attainment, p.units))


def max_rate(profile: StageProfile, workload: Workload, resources: Resources, config: Config,
             target: float = 0.9, lengths: tuple[np.ndarray, np.ndarray] | None = None,
             policy: RouterPolicy = ROUTER_DEFAULTS) -> float:
    """The highest arrival rate this configuration serves at >= `target` attainment.
    DistServe's per-configuration figure of merit. `lengths`: (prompt, output) token counts to average
    over instead of the workload's draw (a benchmark's own requests)."""
    lengths = lengths if lengths is not None else workload.draw()
    return highest_rate(lambda rate: predict(profile, replace(workload, rate_rps=rate), resources, config, lengths,
                                             policy).attainment >= target)


def highest_rate(ok: Callable[[float], bool], rel_tol: float = 2e-3) -> float:
    """The highest rate for which ok(rate) holds, to `rel_tol` (bisection: attainment falls as the rate
    rises); 0 when not even a trickle is served."""
    if not ok(1e-9):
        return 0.0
    lo, hi = 0.0, 1.0
    while ok(hi) and hi < 1e6:
        lo, hi = hi, hi * 2
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


# ---- --mode colocated on the same resources ------------------------------------------------------------
@dataclass(frozen=True)
class ColocatedPrediction:
    workers: int
    max_batch: int
    batched_tokens: int  # each step's token budget (decode rows + prefill chunks)
    units: float
    load: float  # a lower bound on the work offered per worker-second; >= 1: unstable
    chunk_busy: float  # share of the time a worker runs steps that carry prefill chunks (simulated)
    decode_batch: float  # decode rows per step (simulated)
    ttft_mean_s: float
    tpot_mean_s: float
    ttft_attainment: float
    tpot_attainment: float
    attainment: float

    @property
    def stable(self) -> bool:
        return self.load < 1

    def goodput_rps(self, rate_rps: float) -> float:
        return rate_rps * self.attainment


def predict_colocated(profile: StageProfile, workload: Workload, resources: Resources, workers: int, max_batch: int,
                      batched_tokens: int = 0, lengths: tuple[np.ndarray, np.ndarray] | None = None,
                      policy: RouterPolicy = ROUTER_DEFAULTS) -> ColocatedPrediction:
    """`workers` colocated workers, each with resources.per_worker; batched_tokens 0: the worker's default."""
    prompts, outputs = lengths if lengths is not None else workload.draw()
    budget = batched_tokens or default_batched_tokens("cuda" if resources.kind == "gpu" else "cpu", max_batch)
    scale = resources.time_scale(profile, workload.rate_rps)
    steps = outputs - 1
    context = _step_context(prompts, outputs)
    pf, dc = profile.prefill, profile.decode
    # a lower bound on a request's work: its prompt's tokens and attention, its decode rows without
    # any step's fixed cost (mixed steps share that with prefill)
    cached = np.floor(workload.cached(prompts))  # whole tokens: colocated chunks start after them
    per_request = (pf.b_s_per_token * float((prompts - cached).mean())
                   + pf.g_s_per_token2 * float(computed_squares(prompts, cached).mean())
                   + float(steps.mean()) * (dc.d_s_per_seq + dc.e_s_per_seq_token * context))
    load = workload.rate_rps / workers * scale * per_request
    units = workers * resources.per_worker
    if load >= 1:
        return ColocatedPrediction(workers, max_batch, budget, units, load, 1.0, math.inf, math.inf, math.inf,
                                   0.0, 0.0, 0.0)
    times = StageTimes.of(profile, scale, 0.0, resources.interfere)  # nothing is transferred
    sim = simulate_colocated(times, workload.arrivals(len(prompts)), prompts, outputs, workers, max_batch, budget,
                             policy=policy, cached=cached)
    ttft_ok, tpot_ok, both = sim.attainment(workload.slo.ttft_s, workload.slo.tpot_s)
    decoded = outputs > 1
    return ColocatedPrediction(workers, max_batch, budget, units, load, sim.prefill_busy, sim.rows_per_step,
                               float(sim.ttft_s.mean()), float(sim.tpot_s[decoded].mean()) if decoded.any() else 0.0,
                               ttft_ok, tpot_ok, both)


def search_colocated(profile: StageProfile, workload: Workload, resources: Resources,
                     max_batches: tuple[int, ...] = DEFAULT_MAX_BATCHES,
                     policy: RouterPolicy = ROUTER_DEFAULTS) -> ColocatedPrediction:
    """A colocated worker on every unit of the resources: the max batch with the best attainment (the
    smallest within 0.5 points of it)."""
    lengths = workload.draw()
    workers = int(resources.total / resources.per_worker + 1e-9)
    per_batch = [predict_colocated(profile, workload, resources, workers, b, lengths=lengths, policy=policy)
                 for b in sorted(max_batches)]
    return _pick_max_batch(per_batch, lambda p: (p.load, p.max_batch))


def max_rate_colocated(profile: StageProfile, workload: Workload, resources: Resources, workers: int,
                       max_batch: int, batched_tokens: int = 0, target: float = 0.9,
                       lengths: tuple[np.ndarray, np.ndarray] | None = None,
                       policy: RouterPolicy = ROUTER_DEFAULTS) -> float:
    lengths = lengths if lengths is not None else workload.draw()
    return highest_rate(lambda rate: predict_colocated(profile, replace(workload, rate_rps=rate), resources, workers,
                                                       max_batch, batched_tokens, lengths, policy).attainment >= target)
