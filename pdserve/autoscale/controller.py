"""The autoscaler's controller: signals in, add/remove decisions out. Pure: no Ray, no clock of its own.

Each role (prefill, decode) is sized from the planner's model, not from queue length: `Capacity` says how
many requests per second one worker of each role sustains within the SLOs (pdserve/plan/model.py
`stage_capacity_rps`), and the offered rate, smoothed, over that capacity is the role's utilisation.
The limiting stage (pdserve/observability/limiting.py: the stage blamed for the most SLO misses) adds a
worker to its role when attainment falls below the floor even where the utilisation looks fine (the
model is a model). What keeps it from oscillating — the 2 <-> 1 flapping reported of Dynamo's planner:

    hysteresis   up when utilisation > up_util; down only when one worker fewer stays below down_util
                 (down_util < target_util < up_util), never while attainment is below the floor
    cooldown     after any change to a role, no change up for up_cooldown_s, down for down_cooldown_s
    reversals    at most `max_reversals` changes of direction per role within reversal_window_s

Sizing jumps straight to the count the model asks for (rate / (capacity x target_util)), so a step in
load takes one decision, not one worker per cooldown. min/max bound every decision.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from proto.kinds import StrEnum


class ScaleRole(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class Capacity:
    """Requests per second one worker sustains within the SLOs (the planner's model)."""

    prefill_rps: float
    decode_rps: float

    def of(self, role: ScaleRole) -> float:
        return self.prefill_rps if role == ScaleRole.PREFILL else self.decode_rps


@dataclass(frozen=True)
class Bounds:
    min_workers: int = 1
    max_workers: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"autoscale bounds need 1 <= min <= max, got {self.min_workers}..{self.max_workers}")


@dataclass(frozen=True)
class ControllerConfig:
    prefill: Bounds = field(default_factory=Bounds)
    decode: Bounds = field(default_factory=Bounds)
    target_util: float = 0.7  # a decision sizes the role for this utilisation
    up_util: float = 0.85
    down_util: float = 0.5  # scale down only if one worker fewer stays below this
    attainment_floor: float = 0.95  # below it: the limiting role may grow, no role shrinks
    smoothing: float = 0.3  # EWMA weight of the newest rate observation
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0
    max_reversals: int = 1
    reversal_window_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 < self.down_util < self.target_util < self.up_util:
            raise ValueError("autoscale needs 0 < down_util < target_util < up_util, got "
                             f"{self.down_util}, {self.target_util}, {self.up_util}")

    def bounds(self, role: ScaleRole) -> Bounds:
        return self.prefill if role == ScaleRole.PREFILL else self.decode


@dataclass(frozen=True)
class Observation:
    """What the deployment measured over the last interval."""

    at_s: float
    rate_rps: float  # requests arrived per second
    attainment: float = 1.0  # share of the interval's finished requests that met both SLOs
    limiting: ScaleRole | None = None  # the stage blamed for most misses (None: no misses)


@dataclass(frozen=True)
class Decision:
    at_s: float
    role: ScaleRole
    before: int
    after: int
    reason: str

    @property
    def delta(self) -> int:
        return self.after - self.before


@dataclass
class _RoleState:
    workers: int
    last_change_s: float = -math.inf
    last_direction: int = 0
    reversals: deque[float] = field(default_factory=deque)


class Controller:
    def __init__(self, config: ControllerConfig, capacity: Capacity, prefill: int, decode: int) -> None:
        self.config, self.capacity = config, capacity
        self.roles = {ScaleRole.PREFILL: _RoleState(prefill), ScaleRole.DECODE: _RoleState(decode)}
        self.rate: float | None = None  # smoothed

    def workers(self, role: ScaleRole) -> int:
        return self.roles[role].workers

    def observe(self, obs: Observation) -> list[Decision]:
        a = self.config.smoothing
        self.rate = obs.rate_rps if self.rate is None else a * obs.rate_rps + (1 - a) * self.rate
        decisions = [self._decide(role, obs) for role in ScaleRole]
        return [d for d in decisions if d is not None]

    def _decide(self, role: ScaleRole, obs: Observation) -> Decision | None:
        c, state, bounds = self.config, self.roles[role], self.config.bounds(role)
        per_worker = self.capacity.of(role)
        util = self.rate / (state.workers * per_worker)
        wanted = max(1, math.ceil(self.rate / (per_worker * c.target_util)))
        missing = obs.attainment < c.attainment_floor
        if util > c.up_util or (missing and obs.limiting == role):
            after = min(bounds.max_workers, max(wanted, state.workers + 1))
            why = f"utilisation {util:.2f} > {c.up_util}" if util > c.up_util else \
                f"attainment {obs.attainment:.2f} < {c.attainment_floor}, limited by {role}"
        elif not missing and state.workers > 1 and self.rate / ((state.workers - 1) * per_worker) < c.down_util:
            after = max(bounds.min_workers, min(wanted, state.workers - 1))
            why = f"utilisation {util:.2f}; {after} workers would run at {self.rate / (after * per_worker):.2f}"
        else:
            return None
        if after == state.workers or not self._allowed(state, obs.at_s, 1 if after > state.workers else -1):
            return None
        return self._apply(role, state, obs.at_s, after, why)

    def _allowed(self, state: _RoleState, now: float, direction: int) -> bool:
        c = self.config
        cooldown = c.up_cooldown_s if direction > 0 else c.down_cooldown_s
        if now - state.last_change_s < cooldown:
            return False
        while state.reversals and now - state.reversals[0] > c.reversal_window_s:
            state.reversals.popleft()
        reverses = state.last_direction not in (0, direction)
        return not reverses or len(state.reversals) < c.max_reversals

    def _apply(self, role: ScaleRole, state: _RoleState, now: float, after: int, why: str) -> Decision:
        direction = 1 if after > state.workers else -1
        if state.last_direction not in (0, direction):
            state.reversals.append(now)
        decision = Decision(now, role, state.workers, after, why)
        state.workers, state.last_change_s, state.last_direction = after, now, direction
        return decision
