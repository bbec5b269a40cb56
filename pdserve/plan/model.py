"""The planner's model: predicted TTFT, TPOT and SLO attainment of a (prefill, decode, max batch) choice.

Prefill: each prefill worker is an M/G/1 queue (Poisson arrivals split evenly over N workers, one
prompt per prefill call, service a + b*L). Its mean wait is Pollaczek-Khinchine's
    Wq = lambda_p * E[S^2] / (2 * (1 - rho)),   rho = lambda_p * E[S]
(M/D/1 when every prompt has the same length: Wq = rho * S / (2 * (1 - rho))). For attainment the wait
is taken as 0 with probability 1 - rho and exponential otherwise, with the P-K mean: the usual
heavy-traffic shape. TTFT = wait + service + the exposed KV transfer (the last layer's share; the other
layers stream while prefill computes).

Decode: a request holds a slot of its decode worker for O - 1 steps (prefill made the first token).
A request steps with itself and, on average, N others, so Little's law gives the mean batch
N = lambda_d * k * t(1 + N), k = E[O - 1], t(B) = c + s*B, s = d + e*ctx: linear, so the fixed point
is closed-form, N = lambda_d*k*(c + s) / (1 - lambda_d*k*s). The others a request finds are taken as
Poisson(N) (decode as an M/G/infinity system up to the max batch); it joins at the next step
boundary, half a step late on average, so its TPOT is t(n + 1) * (k + 1/2) / k. It meets the TPOT
SLO when that is within the SLO and the batch it joins fits under the max batch; requests that find
the batch full wait for a slot and count as misses. Checked against a step-by-step simulation in
tests/test_plan.py: the mean batch agrees, the attainment is a few points conservative.

Both stages are taken as independent: attainment = P(TTFT ok) * P(TPOT ok); goodput = rate *
attainment (DistServe's definition, as in pdserve.observability.metrics). A stage with rho >= 1 is
unstable: its queue grows without bound, so attainment is 0.

Neighbours: workers that share a node slow each other (`Resources.shared`; on by default for CPU
cores, off for whole GPUs). With a profile that has busy-neighbour fits, each stage's times move from
its solo fit toward its busy fit by the expected number of busy neighbours: the other workers'
utilisations summed (prefill: rho; decode: the fraction of time it has a batch to step, 1 - exp(-N)).
Those utilisations depend on the times in turn, so the two are iterated to a fixed point. The busy fits
were each measured beside one neighbour of the other stage; a neighbour of the same stage is taken to
cost the same (an approximation: with one prefill and one decode worker, the benchmarked case, there is
none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pdserve.observability.metrics import SLO
from pdserve.plan.profile import StageProfile


@dataclass(frozen=True)
class LengthDist:
    """Token counts uniform over [low, high] (low == high: fixed)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"a length range needs 1 <= low <= high, got {self.low}:{self.high}")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """'128' (fixed) or '16:512' (uniform)."""
        try:
            low, _, high = text.partition(":")
            return cls(int(low), int(high or low))
        except ValueError as e:
            raise ValueError(f"a length is N or MIN:MAX, got {text!r} ({e})") from None

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class Workload:
    rate_rps: float  # Poisson arrivals, requests per second
    prompt: LengthDist
    output: LengthDist
    slo: SLO = SLO()
    samples: int = 2000  # requests drawn to average attainment over the length distributions
    seed: int = 0

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return self.prompt.sample(rng, self.samples), self.output.sample(rng, self.samples)


@dataclass(frozen=True)
class Resources:
    """`total` cores (kind cpu) or GPUs (kind gpu); each worker gets `per_worker` of them."""

    total: float
    per_worker: float = 1.0
    kind: str = "cpu"
    transfer_gbps: float = 2.0  # per-request KV transfer rate (run-batch reports ~2 GB/s over shm)
    shared: bool | None = None  # workers slow each other (one node's cores, one GPU); None: cpu yes, gpu no

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"resource kind is cpu or gpu, got {self.kind!r}")
        if not 0 < self.per_worker <= self.total:
            raise ValueError(f"need 0 < per-worker share <= total, got {self.per_worker} of {self.total}")

    def time_scale(self, profile: StageProfile) -> float:
        """Multiplier on profiled times for one worker's share: linear in the share (an assumption;
        profile with --threads equal to the share to make it 1)."""
        measured = max(profile.threads, 1) if self.kind == "cpu" else 1.0
        return measured / self.per_worker

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
    prefill_util: float  # rho of each prefill worker
    decode_util: float  # offered rate over the decode capacity at the max batch
    prefill_wait_s: float  # mean queueing wait (P-K); inf when unstable
    ttft_mean_s: float
    decode_batch: float  # Little's-law mean batch (time average); inf when unstable
    tpot_mean_s: float
    ttft_attainment: float
    tpot_attainment: float

    @property
    def stable(self) -> bool:
        return self.prefill_util < 1 and self.decode_util < 1

    @property
    def attainment(self) -> float:
        return self.ttft_attainment * self.tpot_attainment

    def goodput_rps(self, rate_rps: float) -> float:
        return rate_rps * self.attainment

    @property
    def limiting_stage(self) -> str:
        """The stage whose attainment is lower (ties: the busier one): where a worker helps most."""
        if self.ttft_attainment != self.tpot_attainment:
            return "prefill" if self.ttft_attainment < self.tpot_attainment else "decode"
        return "prefill" if self.prefill_util >= self.decode_util else "decode"


def md1_wait(rate: float, service_s: float) -> float:
    """Mean queueing wait of an M/D/1 queue; inf when rho >= 1."""
    rho = rate * service_s
    return math.inf if rho >= 1 else rho * service_s / (2 * (1 - rho))


def mg1_wait(rate: float, mean_s: float, second_moment_s2: float) -> float:
    """Pollaczek-Khinchine mean wait of an M/G/1 queue; inf when rho >= 1."""
    rho = rate * mean_s
    return math.inf if rho >= 1 else rate * second_moment_s2 / (2 * (1 - rho))


NEIGHBOUR_ITERATIONS = 100  # at most; the fixed point is usually reached in a handful


def predict(profile: StageProfile, workload: Workload, resources: Resources, config: Config,
            lengths: tuple[np.ndarray, np.ndarray] | None = None) -> Prediction:
    prompts, outputs = lengths if lengths is not None else workload.draw()
    scale = resources.time_scale(profile)
    prefill_fit, decode_fit = profile.prefill, profile.decode
    neighbours = resources.interfere and (profile.prefill_busy is not None or profile.decode_busy is not None)
    busy_before = (-1.0, -1.0)
    for _ in range(NEIGHBOUR_ITERATIONS if neighbours else 1):
        ttft_att, p_util, wait, ttft = _prefill(prefill_fit, profile, workload, resources, config, prompts, scale)
        tpot_att, d_util, batch, tpot = _decode(decode_fit, workload, config, prompts, outputs, scale)
        if not neighbours:
            break
        rho_p = min(p_util, 1.0)  # an unstable stage is busy all the time
        busy_d = 1.0 if math.isinf(batch) else 1 - math.exp(-batch) if batch > 0 else 0.0
        if abs(rho_p - busy_before[0]) < 1e-9 and abs(busy_d - busy_before[1]) < 1e-9:
            break  # the times these utilisations imply are the ones they came from
        busy_before = (rho_p, busy_d)
        n_p, n_d = config.prefill_workers, config.decode_workers
        # busy neighbours each worker sees: every other worker, weighted by how busy it is
        prefill_fit = profile.prefill.toward(profile.prefill_busy, (n_p - 1) * rho_p + n_d * busy_d)
        decode_fit = profile.decode.toward(profile.decode_busy, n_p * rho_p + (n_d - 1) * busy_d)
    return Prediction(config, (config.prefill_workers + config.decode_workers) * resources.per_worker,
                      p_util, d_util, wait, ttft, batch, tpot, ttft_att, tpot_att)


def _prefill(fit, profile, workload, resources, config, prompts, scale) -> tuple[float, float, float, float]:
    service = scale * (fit.a_s + fit.b_s_per_token * prompts)
    transfer = (prompts * profile.kv_bytes_per_token / (resources.transfer_gbps * 1e9) / profile.num_layers
                if resources.transfer_gbps > 0 else np.zeros_like(service))
    rate = workload.rate_rps / config.prefill_workers
    rho = rate * float(service.mean())
    wait = mg1_wait(rate, float(service.mean()), float((service ** 2).mean()))
    if math.isinf(wait):
        return 0.0, rho, wait, math.inf
    slack = workload.slo.ttft_s - service - transfer  # how long each request may wait
    if wait > 0:
        p_ok = np.where(slack < 0, 0.0, 1 - rho * np.exp(-np.maximum(slack, 0) * rho / wait))
    else:
        p_ok = (slack >= 0).astype(float)
    return float(p_ok.mean()), rho, wait, wait + float((service + transfer).mean())


def _decode(fit, workload, config, prompts, outputs, scale) -> tuple[float, float, float, float]:
    steps = outputs - 1  # the first token comes from prefill
    k = float(steps.mean())
    if k == 0:
        return 1.0, 0.0, 0.0, 0.0
    ctx = float((steps * (prompts + outputs / 2)).sum() / steps.sum())  # step-weighted mean context
    c, slope = scale * fit.c_s, scale * (fit.d_s_per_seq + fit.e_s_per_seq_token * ctx)
    rate = workload.rate_rps / config.decode_workers
    bmax = config.max_batch
    util = rate * k * (c + slope * bmax) / bmax  # offered rate / capacity at the max batch
    if util >= 1:
        return 0.0, util, math.inf, math.inf
    # Little: N = rate * k * t(1 + N), a request stepping with itself and N others on average
    others = rate * k * (c + slope) / (1 - rate * k * slope)
    n = np.arange(bmax)  # others already in the batch a request joins
    if others > 0:
        cdf = np.cumsum(np.exp(n * math.log(others) - others - np.array([math.lgamma(i + 1) for i in n])))
    else:
        cdf = np.ones(bmax)
    # It joins at the next step boundary, half a step late on average: TPOT = t(n + 1) * (k_i + 1/2) / k_i
    live = steps[steps > 0]
    budget = workload.slo.tpot_s * live / (live + 0.5)  # the step time each request can afford
    if slope > 0:
        most = np.floor((budget - c) / slope - 1 + 1e-9)  # most others that still fit its SLO
    else:
        most = np.where(budget >= c, bmax - 1, -1)
    most = np.minimum(most, bmax - 1).astype(int)
    p_ok = np.where(most >= 0, cdf[np.maximum(most, 0)], 0.0)
    attainment = (p_ok.sum() + (len(steps) - len(live))) / len(steps)
    return float(attainment), util, others, (c + slope * (1 + others)) * (k + 0.5) / k


DEFAULT_MAX_BATCHES = (8, 16, 32, 64, 128, 256)


def search(profile: StageProfile, workload: Workload, resources: Resources,
           max_batches: tuple[int, ...] = DEFAULT_MAX_BATCHES) -> list[Prediction]:
    """Every (N prefill, M decode) that fits the resources, each with the smallest max batch whose
    attainment is within 0.5 points of the best one's (less KV memory reserved for the same goodput).
    Sorted best first: goodput per unit, then attainment, then fewer units."""
    lengths = workload.draw()
    slots = int(resources.total / resources.per_worker + 1e-9)
    if slots < 2:
        raise ValueError(f"{resources.total:g} {resources.kind}s at {resources.per_worker:g} per worker "
                         "cannot hold one prefill and one decode worker")
    results = []
    for n in range(1, slots):
        for m in range(1, slots - n + 1):
            per_batch = [predict(profile, workload, resources, Config(n, m, b), lengths) for b in sorted(max_batches)]
            best = max(p.attainment for p in per_batch)
            results.append(next(p for p in per_batch if p.attainment >= best - 0.005))
    return sorted(results, key=lambda p: (-p.goodput_rps(workload.rate_rps) / p.units, -p.attainment, p.units))


def max_rate(profile: StageProfile, workload: Workload, resources: Resources, config: Config,
             target: float = 0.9, lengths: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """The highest arrival rate this configuration serves at >= `target` attainment (bisection:
    attainment falls as the rate rises). DistServe's per-configuration figure of merit.
    `lengths`: (prompt, output) token counts to average over instead of the workload's draw
    (a benchmark's own requests)."""
    from dataclasses import replace

    lengths = lengths if lengths is not None else workload.draw()

    def ok(rate: float) -> bool:
        return predict(profile, replace(workload, rate_rps=rate), resources, config, lengths).attainment >= target

    lo, hi = 0.0, 1.0
    if not ok(1e-9):
        return 0.0
    while ok(hi) and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
