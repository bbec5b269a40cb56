"""Masks for speculative verification: one bitmask row per verified position of a constrained sequence.

A sequence that feeds its newest token plus drafts d_0..d_{k-1} gets k + 1 logits rows; row j
decides the token after d_0..d_{j-1}, so its mask is the grammar's after those drafts:

    row 0      mask(state)
    row j      mask(state + d_0..d_{j-1})      while each d_i is allowed
    after a forbidden d_j: rows > j repeat row j's mask (never used: d_j differs from any allowed token,
                           so verification stops at row j and samples there, under row j's mask)

The drafts are taken tentatively and rolled back, so the matcher ends where it started; the tokens
verification keeps are taken later, as every kept token is (StopChecker.accept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.structured.bitmask import apply_bitmask_, bitmask_words
from engine.structured.matcher import Matcher


def draft_bitmask(matcher: Matcher, drafts: Sequence[int], vocab_size: int) -> torch.Tensor:
    """[len(drafts) + 1, W] int32: the mask of each verified position."""
    bitmask = torch.empty(len(drafts) + 1, bitmask_words(vocab_size), dtype=torch.int32)
    taken = 0
    for j, token in enumerate(drafts):
        matcher.fill(bitmask, j)
        if not matcher.try_accept(token):
            bitmask[j + 1:] = bitmask[j]
            break
        taken += 1
    else:
        matcher.fill(bitmask, len(drafts))
    matcher.rollback(taken)
    return bitmask


def mask_verify_logits_(logits: torch.Tensor, grammars: Sequence[Matcher | None],
                        drafts: Sequence[Sequence[int]]) -> None:
    """Mask verify logits in place: sequence i owns the next len(drafts[i]) + 1 rows."""
    start = 0
    for g, d in zip(grammars, drafts):
        n = len(d) + 1
        if g is not None:
            apply_bitmask_(logits, draft_bitmask(g, d, logits.shape[-1]), range(start, start + n))
        start += n
