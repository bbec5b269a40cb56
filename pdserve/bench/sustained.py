"""The highest request rate served at >= 90% SLO attainment, read off a measured curve.

The curve is measured at a few rates only. Walking up from the lowest rate,
the answer lies between the last rate that still meets the target and the
first that misses it; between those two the attainment is taken as linear in
the rate, so the answer is where that segment crosses the target:

    r* = r_lo + (a_lo - target) * (r_hi - r_lo) / (a_lo - a_hi)

The first miss counts, even if a higher rate meets the target again (noise on
a shared machine): the rate a mode sustains must hold for every rate below it.
When every rate meets the target the answer is only a lower bound (the
highest rate measured); when the lowest already misses, only an upper one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sustained:
    rate_rps: float  # the answer, or the bound that `bound` names
    bound: str  # "interpolated" | "at_least" (every rate met it) | "below" (the lowest missed)
    target: float

    def describe(self) -> str:
        if self.bound == "below":
            return f"< {self.rate_rps:.3g} req/s (the lowest rate measured misses {self.target:.0%})"
        if self.bound == "at_least":
            return f">= {self.rate_rps:.3g} req/s (every rate measured meets {self.target:.0%})"
        return f"{self.rate_rps:.3g} req/s"


def sustained_rate(points: Sequence[tuple[float, float]], target: float = 0.9) -> Sustained:
    """points: (rate, attainment) pairs, any order, distinct rates; attainment in [0, 1]."""
    if not points:
        raise ValueError("no measured rates")
    if not 0 < target <= 1:
        raise ValueError(f"the attainment target must be in (0, 1], got {target}")
    curve = sorted(points)
    if len({r for r, _ in curve}) != len(curve):
        raise ValueError(f"each rate must be measured once, got {[r for r, _ in curve]}")
    if curve[0][1] < target:
        return Sustained(curve[0][0], "below", target)
    for (r_lo, a_lo), (r_hi, a_hi) in zip(curve, curve[1:]):
        if a_hi < target:
            return Sustained(r_lo + (a_lo - target) * (r_hi - r_lo) / (a_lo - a_hi), "interpolated", target)
    return Sustained(curve[-1][0], "at_least", target)
