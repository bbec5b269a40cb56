"""Speculative decoding's arithmetic and sampling rule, on hand-made numbers with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import draw_from
from engine.specdec import AcceptanceTracker, GammaChooser, best_gamma, chen_residual, lookup, omega, rejection_sample
from engine.specdec.gamma import batch_bucket, tokens_per_second


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile for a normal quantile z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expected below min_expected are pooled."""
    n = float(counts.sum())
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small].double(), expected[small].double().sum().reshape(1)])
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def test_lookup_takes_the_latest_earlier_occurrence_longest_n_first():
    assert lookup([1, 2, 3, 4, 1, 2, 3], 2) == (4, 1)
    # [1, 2] occurs at 0 and 3: the latest is followed by 8. The 3-gram [8, 1, 2] never occurred.
    assert lookup([1, 2, 9, 1, 2, 8, 1, 2], 3) == (8, 1, 2)
    assert lookup([5, 6, 7, 6], 4) == (7, 6)  # falls back to the 1-gram [6]; cut at the context's end
    assert lookup([1, 2, 3], 3) == ()  # nothing repeats
    assert lookup([4], 3) == ()


def test_omega_matches_eq4():
    assert omega(3, 0.5) == pytest.approx(1.875)
    assert omega(5, 1.0) == 6.0
    assert omega(0, 0.9) == 1.0
    assert omega(4, 0.0) == 1.0


def test_best_gamma_on_hand_made_costs():
    """Memory-bound (verify costs barely grow with γ): γ* = 5 of {0,1,2,3,5,7} at α = 0.8.
    Rates: γ0 1.000, γ1 1.565, γ2 1.877, γ3 2.036, γ5 2.108, γ7 2.030 tokens per second."""
    verify = {1: 1.1, 2: 1.2, 3: 1.3, 5: 1.5, 7: 1.7}
    assert tokens_per_second(5, [0.8], 0.05, 1.5) == pytest.approx((1 - 0.8 ** 6) / 0.2 / 1.75)
    assert best_gamma((0, 1, 2, 3, 5, 7), [0.8], 1.0, 0.05, verify) == 5
    # Acceptance 0.1: nothing pays.
    assert best_gamma((0, 1, 2, 3, 5, 7), [0.1], 1.0, 0.05, verify) == 0
    # Compute-bound batch of 64: verify costs grow with every token fed, plain decoding wins.
    bound = {g: 1.0 * (g + 1) for g in verify}
    assert best_gamma((0, 1, 2, 3, 5, 7), [0.8] * 64, 1.0, 0.05, bound) == 0


def test_acceptance_tracker_is_a_decayed_geometric_estimate():
    t = AcceptanceTracker(decay=0.8)
    assert t.alpha == 0.5
    t.update(asked=3, drafted=3, accepted=3)  # all stood: 3 successes, no failure
    assert t.alpha == pytest.approx(3.8 / 4.6)
    t.update(asked=4, drafted=2, accepted=2)  # ngram proposed 2 of 4: the third position failed
    assert (t.accepted, t.rejected) == (pytest.approx(0.8 * 3.8 + 2), pytest.approx(0.8 * 0.8 + 1))
    assert (t.drafted_total, t.accepted_total) == (5, 5)
    t.update(asked=0, drafted=0, accepted=0)  # a plain step says nothing about α
    assert (t.drafted_total, t.accepted_total) == (5, 5)


def test_gamma_chooser_measures_plain_then_extrapolates_verify_costs():
    c = GammaChooser(candidates=(0, 2, 5), explore_every=1000)
    assert c.choose([0.9, 0.9]) == 0  # nothing measured at batch 2: a plain step first
    c.costs.observe_plain(2, 1.0, c.steps)
    # Verify costs unknown: taken as T_plain (memory-bound), so the largest γ wins at α = 0.9.
    assert c.choose([0.9, 0.9]) == 5
    c.costs.observe_spec(2, 5, 0.05 * 5, 2.0, c.steps)  # verify at γ=5 costs 2 s: 0.2 s per extra token
    assert c.costs.verify_estimate(2, 2) == pytest.approx(1.4)
    # γ=2: 2·Ω(2,.9)=5.42 tokens / (0.1 + 1.4) s = 3.61/s; γ=5: 2·4.69 / 2.25 = 4.17/s; plain 2/s.
    assert c.choose([0.9, 0.9]) == 5
    assert c.choose([0.3, 0.3]) == 0  # γ=2: 2.78 / 1.5 = 1.85/s < 2/s
    assert GammaChooser(fixed=3).choose([0.0]) == 3
    assert [batch_bucket(b) for b in (1, 2, 3, 8, 9, 64)] == [1, 2, 4, 8, 16, 64]


def _first_tokens(p, q, n, residual, gen):
    gamma = q.shape[0]
    counts = torch.zeros(p.shape[-1])
    for _ in range(n):
        draft = draw_from(q, torch.rand(gamma, generator=gen))
        a, tok = rejection_sample(p, q, draft, torch.rand(gamma, generator=gen), torch.rand(gamma, generator=gen),
                                  residual)
        counts[int(draft[0]) if a > 0 else tok] += 1
    return counts


@pytest.mark.parametrize("rule", ["chen", "resample_from_p"])
def test_rejection_sampling_keeps_the_target_distribution(rule):
    """The first token Algorithm 2 emits is distributed as p, never as the draft's q. Drawing from p
    (instead of norm(max(0, p - q))) after a rejection is the classic mistake: the test rejects it.
    20,000 draws over 8 tokens detect moving 2% of the mass between two tokens (shown below)."""
    gen = torch.Generator().manual_seed(0)
    vocab, gamma, n = 8, 3, 20_000
    p = torch.rand(gamma + 1, vocab, generator=gen)
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(gamma, vocab, generator=gen)
    q = q / q.sum(-1, keepdim=True)
    residual = chen_residual if rule == "chen" else (lambda p_, q_: p_)
    stat, df = chi2(_first_tokens(p, q, n, residual, gen), p[0])
    if rule == "chen":
        assert stat < chi2_critical(df), f"chi2 {stat:.1f} on {df} df: Algorithm 2 changed the distribution"
    else:
        assert stat > chi2_critical(df), f"chi2 {stat:.1f} on {df} df: the wrong rule went unnoticed"
    # Power: the same test on draws from p with 2% of the mass moved from one token to another.
    shifted = p[0].clone()
    shifted[0] -= min(0.02, float(shifted[0]))
    shifted[1] += p[0][0] - shifted[0]
    counts = torch.bincount(torch.multinomial(shifted, n, replacement=True, generator=gen), minlength=vocab)
    stat, df = chi2(counts, p[0])
    assert stat > chi2_critical(df), "20,000 draws do not detect a 2% shift"


def test_processed_probs_is_what_the_sampler_draws_from():
    """Algorithm 2 must verify against the distribution plain decoding samples from: over many seeds,
    `sample`'s draws follow `processed_probs` (temperature, top-k, top-p; greedy rows one-hot)."""
    from engine.config import SamplingParams
    from engine.sampler import processed_probs, sample

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 12, generator=gen) * 0.5
    for prm in (SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=1.3, top_k=5),
                SamplingParams(temperature=0)):
        probs = processed_probs(logits, [prm])[0]
        n = 6000
        params = [SamplingParams(temperature=prm.temperature, top_p=prm.top_p, top_k=prm.top_k, seed=s)
                  for s in range(n)]
        draws = sample(logits.expand(n, -1), params, [3] * n)
        counts = torch.bincount(draws, minlength=12)
        assert bool((counts[probs == 0] == 0).all()), "a token outside the nucleus / top-k was drawn"
        if not prm.greedy:
            stat, df = chi2(counts, probs)
            assert stat < chi2_critical(df), f"{prm}: chi2 {stat:.1f} on {df} df"
