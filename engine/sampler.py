"""Batched sampling: greedy, temperature, top-k, top-p, reproducible per request.

The random draw for token number `step` of a request depends only on
(seed, step), never on which worker samples it or what else is in the batch:
the prefill worker samples step 0, the decode worker the rest, and a retried
request produces the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.config import SamplingParams

_MASK64 = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) & _MASK64


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B] (int64, on logits' device)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    device = logits.device
    idx = torch.tensor(rows, device=device)
    sub = logits.index_select(0, idx)
    temps = torch.tensor([params[i].temperature for i in rows], device=device, dtype=sub.dtype)
    sub = sub / temps[:, None]
    top_ks = [params[i].top_k for i in rows]
    if any(k > 0 for k in top_ks):
        k_max = min(max(top_ks), sub.shape[-1])
        top_vals = sub.topk(k_max, dim=-1).values  # [R, k_max], descending
        kth = torch.tensor([min(k, k_max) - 1 if k > 0 else 0 for k in top_ks], device=device)
        thresh = top_vals.gather(1, kth[:, None]).squeeze(1)
        thresh = thresh.masked_fill(torch.tensor([k == 0 for k in top_ks], device=device), float("-inf"))
        sub = sub.masked_fill(sub < thresh[:, None], float("-inf"))
    top_ps = torch.tensor([params[i].top_p for i in rows], device=device, dtype=sub.dtype)
    if bool((top_ps < 1).any()):
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_ps[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        sub = sub.masked_fill(drop, float("-inf"))
    probs = sub.softmax(dim=-1)
    noise = torch.empty_like(probs)
    for r, i in enumerate(rows):
        gen = torch.Generator(device=device).manual_seed(step_seed(params[i].seed, steps[i]))
        noise[r].exponential_(generator=gen)
    # Exponential race: argmax p_i / E_i draws i with probability p_i.
    tokens[idx] = (probs / noise).argmax(dim=-1)
    return tokens
