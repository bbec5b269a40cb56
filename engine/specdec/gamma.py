"""Choosing γ from measurement: the homework's cost model (Eq. 4-5) fed with measured costs.

Per step of a batch of B sequences with per-request acceptance rates α_i:

    tokens(γ)  = Σ_i Ω(γ, α_i),   Ω(γ, α) = (1 - α^{γ+1}) / (1 - α)          (Eq. 4)
    seconds(γ) = γ · T_draft(B) + T_verify(B, γ),   seconds(0) = T_plain(B)
    γ*         = argmax tokens(γ) / seconds(γ)                                (Eq. 5, inverted)

γ* = 0 means plain decoding: no drafts, the batcher's own step. Costs are moving averages
of measured seconds per (batch-size bucket, γ). Only T_plain must be measured before the model
decides; a verify cost not yet measured is extrapolated from the largest γ measured (linear in
the tokens fed), or taken as T_plain when none is: optimistic, memory-bound, so an untried γ gets
tried when it could win, and its measurement corrects the guess. Every `explore_every` steps the
stalest candidate is re-measured, so a cost that moved (other load, longer contexts) is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def omega(gamma: int, alpha: float) -> float:
    """Expected tokens per verification with γ drafts accepted i.i.d. with probability α (Eq. 4)."""
    if gamma <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def tokens_per_second(gamma: int, alphas: list[float], t_draft: float, t_verify: float) -> float:
    """Expected batch throughput of one speculative step (γ > 0) under the cost model."""
    return sum(omega(gamma, a) for a in alphas) / (gamma * t_draft + t_verify)


def batch_bucket(batch_size: int) -> int:
    """Costs are shared between nearby batch sizes: 1, 2, 4, 8, ... (the next power of two)."""
    return 1 << max(0, (batch_size - 1).bit_length())


@dataclass
class AcceptanceTracker:
    """One request's α: a decayed geometric MLE, α = accepted / (accepted + rejections).

    A step that asked for γ drafts and kept a of them is a + 1 Bernoulli trials when a < γ (the
    last failed) and γ trials when all stood. A drafter that proposed fewer than γ (ngram found
    a short match) failed at the first missing one: α is the chance that a position yields a
    kept draft, which is what Ω(γ, α) needs. Old steps decay by `decay`; the prior
    (1 kept, 1 failed) starts α at 0.5."""

    decay: float = 0.8
    accepted: float = 1.0
    rejected: float = 1.0
    drafted_total: int = 0
    accepted_total: int = 0

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, asked: int, drafted: int, accepted: int) -> None:
        if asked <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if accepted < asked else 0.0)
        self.drafted_total += drafted
        self.accepted_total += accepted


@dataclass
class CostModel:
    """Moving averages of measured seconds: T_plain(B), T_draft(B) per draft step, T_verify(B, γ)."""

    smoothing: float = 0.3
    plain: dict[int, float] = field(default_factory=dict)
    draft: dict[int, float] = field(default_factory=dict)
    verify: dict[tuple[int, int], float] = field(default_factory=dict)
    last_seen: dict[tuple[int, int], int] = field(default_factory=dict)  # (bucket, γ) -> step measured

    def _avg(self, table: dict, key, seconds: float) -> None:
        old = table.get(key)
        table[key] = seconds if old is None else (1 - self.smoothing) * old + self.smoothing * seconds

    def verify_estimate(self, bucket: int, gamma: int) -> float:
        """T_verify(B, γ): measured, else extrapolated from the largest γ measured, else T_plain(B)."""
        if (bucket, gamma) in self.verify:
            return self.verify[(bucket, gamma)]
        plain = self.plain[bucket]
        measured = [g for b, g in self.verify if b == bucket]
        if not measured:
            return plain
        top = max(measured)
        return plain + (self.verify[(bucket, top)] - plain) * gamma / top

    def observe_plain(self, batch_size: int, seconds: float, step: int = 0) -> None:
        b = batch_bucket(batch_size)
        self._avg(self.plain, b, seconds)
        self.last_seen[(b, 0)] = step

    def observe_spec(self, batch_size: int, gamma: int, draft_s: float, verify_s: float, step: int = 0) -> None:
        b = batch_bucket(batch_size)
        self._avg(self.draft, b, draft_s / gamma)
        self._avg(self.verify, (b, gamma), verify_s)
        self.last_seen[(b, gamma)] = step


@dataclass
class GammaChooser:
    """Fixed γ (`fixed` set) or γ* from the cost model over `candidates` (0 always among them)."""

    candidates: tuple[int, ...] = (0, 1, 2, 3, 5, 7)
    fixed: int | None = None
    explore_every: int = 50
    costs: CostModel = field(default_factory=CostModel)
    steps: int = 0

    def choose(self, alphas: list[float]) -> int:
        self.steps += 1
        if self.fixed is not None:
            return self.fixed
        b = batch_bucket(len(alphas))
        if b not in self.costs.plain:
            return 0
        if self.steps % self.explore_every == 0:
            return min(self.candidates, key=lambda g: self.costs.last_seen.get((b, g), -1))
        return best_gamma(self.candidates, alphas, self.costs.plain[b], self.costs.draft.get(b, 0.0),
                          {g: self.costs.verify_estimate(b, g) for g in self.candidates if g > 0})


def best_gamma(candidates: tuple[int, ...], alphas: list[float], t_plain: float, t_draft: float,
               t_verify: dict[int, float]) -> int:
    """argmax over γ of expected tokens per second; γ = 0 is plain decoding at len(alphas) / t_plain."""
    rates = {0: len(alphas) / t_plain}
    for g in candidates:
        if g > 0:
            rates[g] = tokens_per_second(g, alphas, t_draft, t_verify[g])
    return max(sorted(rates), key=lambda g: rates[g])
