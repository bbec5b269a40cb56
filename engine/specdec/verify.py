"""Verification of drafted tokens against the target's logits: which drafts stand, and the next token.

Rows: sequence i owns rows [cu[i], cu[i] + len(draft_i) + 1) of the verify logits, one per
position it fed (its newest token, then each draft). Row j decides output token number
`first_step[i] + j`, so every draw is keyed on (seed, step) as in plain decoding.

Two rules, both exact (the output distribution is the target's):
  * deterministic drafts (q a point mass: ngram, greedy self-drafts): the target samples row j
    with the plain sampler's own keyed draw and the draft stands while it equals that sample.
    This is Chen et al.'s Algorithm 2 for a point-mass q (accept x with probability p(x), on
    rejection draw from p without x), coupled to plain decoding's draws: the text is the one
    plain decoding writes, token for token, at any temperature, whatever γ was.
  * sampled drafts (q given): Algorithm 2 as written, with uniforms keyed on (seed, step, salt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.config import SamplingParams
from engine.sampler import draw_from, keyed_uniform, processed_probs, sample

SALT_ACCEPT, SALT_RESIDUAL, SALT_DRAFT = 0xACC, 0x4E5, 0xD4F

# (p [n, V], q [n, V]) -> the distribution to draw from after a rejection, unnormalised [n, V].
ResidualRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def chen_residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) of Algorithm 2 (normalised by the caller)."""
    return (p - q).clamp_min(0)


@dataclass(frozen=True)
class Draft:
    """What a drafter proposes for one sequence: tokens (possibly none) and, for drafts sampled
    from a distribution, that distribution per token (q [len(tokens), V]); None: point masses."""

    tokens: tuple[int, ...]
    probs: torch.Tensor | None = None


def rejection_sample(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor,
                     u_residual: torch.Tensor, residual: ResidualRule = chen_residual) -> tuple[int, int | None]:
    """Algorithm 2 over one sequence's γ drafts. p [γ+1, V] target, q [γ, V] draft, draft [γ],
    u_* [γ]. Returns (accepted count a, token at row a) — None there when all γ stood (the
    caller draws the bonus token from p[γ] with the plain sampler)."""
    gamma = draft.shape[0]
    rows = torch.arange(gamma)
    px, qx = p[rows, draft], q[rows, draft]
    ok = (u_accept * qx < px).tolist()  # u < p(x)/q(x), without dividing by a tiny q(x)
    a = next((j for j, good in enumerate(ok) if not good), gamma)
    if a == gamma:
        return a, None
    r = residual(p[a:a + 1], q[a:a + 1])
    if float(r.sum()) <= 0:  # p == q: a rejection has probability 0; guard the division
        r = p[a:a + 1]
    return a, int(draw_from(r, u_residual[a:a + 1])[0])


class Verifier:
    """Turns verify logits + drafts into each sequence's new tokens (accepted drafts + one)."""

    def __init__(self, residual: ResidualRule = chen_residual) -> None:
        self.residual = residual

    def __call__(self, logits: torch.Tensor, drafts: Sequence[Draft], params: Sequence[SamplingParams],
                 first_steps: Sequence[int]) -> list[list[int]]:
        lens = [len(d.tokens) + 1 for d in drafts]
        row_params = [p for p, n in zip(params, lens) for _ in range(n)]
        row_steps = [s + j for s, n in zip(first_steps, lens) for j in range(n)]
        # The plain sampler's keyed draw at every row: the answer for point-mass drafts, and the
        # bonus token (all drafts stood) for sampled ones.
        plain = sample(logits, row_params, row_steps).tolist()
        out, start = [], 0
        for d, n, prm, step in zip(drafts, lens, params, first_steps):
            if d.probs is None or prm.greedy:
                a = 0
                while a < n - 1 and d.tokens[a] == plain[start + a]:
                    a += 1
                out.append(list(d.tokens[:a]) + [plain[start + a]])
            else:
                out.append(self._algorithm2(logits[start:start + n], d, prm, step, plain[start + n - 1]))
            start += n
        return out

    def _algorithm2(self, logits: torch.Tensor, d: Draft, prm: SamplingParams, step: int, bonus: int) -> list[int]:
        gamma = len(d.tokens)
        p = processed_probs(logits, [prm] * (gamma + 1))
        steps = [step + j for j in range(gamma)]
        seeds = [prm.seed] * gamma
        u_acc = keyed_uniform(seeds, steps, SALT_ACCEPT)[:, 0]
        u_res = keyed_uniform(seeds, steps, SALT_RESIDUAL)[:, 0]
        draft = torch.tensor(d.tokens, dtype=torch.long, device=p.device)
        a, token = rejection_sample(p, d.probs.to(p.device, torch.float32), draft, u_acc.to(p.device),
                                    u_res.to(p.device), self.residual)
        return list(d.tokens[:a]) + [bonus if token is None else token]
