"""Request arrival times for the arrival-rate benchmark: Poisson, or gamma for burstiness.

Inter-arrival gaps are i.i.d. gamma with mean 1/rate and coefficient of
variation `cv` (std/mean): shape k = 1/cv^2, scale = 1/(rate*k). cv = 1 is
the exponential, i.e. Poisson arrivals; cv > 1 bunches requests into bursts
with long quiet spells between them; cv < 1 spaces them more evenly.
(vLLM's `--burstiness` is the shape k itself; here it is the CV, so 2.0
means gaps twice as variable as Poisson's.) The first request arrives at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARRIVALS = ("poisson", "gamma")


@dataclass(frozen=True)
class ArrivalSpec:
    process: str = "poisson"
    cv: float = 1.0  # coefficient of variation of the gaps; poisson requires 1

    def __post_init__(self) -> None:
        if self.process not in ARRIVALS:
            raise ValueError(f"--arrival must be one of {ARRIVALS}, got {self.process!r}")
        if not self.cv > 0:
            raise ValueError(f"--burstiness (the CV of inter-arrival gaps) must be positive, got {self.cv}")
        if self.process == "poisson" and self.cv != 1.0:
            raise ValueError(f"Poisson arrivals have CV 1; for --burstiness {self.cv:g} use --arrival gamma")

    def describe(self) -> str:
        return "Poisson" if self.process == "poisson" else f"gamma (CV {self.cv:g})"


def gaps(spec: ArrivalSpec, rate_rps: float, n: int, seed: int) -> np.ndarray:
    """n inter-arrival gaps in seconds, reproducible from `seed`."""
    if not rate_rps > 0:
        raise ValueError(f"request rates must be positive, got {rate_rps}")
    rng = np.random.default_rng(seed)
    if spec.process == "poisson":
        return rng.exponential(1.0 / rate_rps, size=n)
    shape = 1.0 / spec.cv ** 2
    return rng.gamma(shape, 1.0 / (rate_rps * shape), size=n)


def arrival_times(spec: ArrivalSpec, rate_rps: float, n: int, seed: int) -> np.ndarray:
    """Offsets (s) of n arrivals from the first, which is at 0: n - 1 gaps."""
    if n <= 0:
        return np.zeros(0)
    return np.concatenate([[0.0], np.cumsum(gaps(spec, rate_rps, n - 1, seed))])
