"""Target/draft distributions and keyed uniforms for verification.

Stand-in for `engine.sampler.processed_probs` / `keyed_uniform` until the lead's batched sampler
lands (same names and signatures); then this module re-exports those and these bodies go.
Both must treat a row exactly as `engine.sampler.sample` does, or Algorithm 2 would verify
against a different distribution than plain decoding samples from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.config import SamplingParams
from engine.sampler import step_seed

_MASK64 = (1 << 64) - 1


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [B, V] float32 -> probs [B, V] after temperature, top-k and top-p; greedy rows one-hot.
    Row for row the distribution `sample` draws from (same masking rules, batched the same way)."""
    device = logits.device
    greedy = torch.tensor([p.greedy for p in params], device=device)
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device, dtype=logits.dtype)
    sub = logits / temps[:, None]
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        k_max = min(max(top_ks), sub.shape[-1])
        top_vals = sub.topk(k_max, dim=-1).values
        kth = torch.tensor([min(k, k_max) - 1 if k > 0 else 0 for k in top_ks], device=device)
        thresh = top_vals.gather(1, kth[:, None]).squeeze(1)
        thresh = thresh.masked_fill(torch.tensor([k == 0 for k in top_ks], device=device), float("-inf"))
        sub = sub.masked_fill(sub < thresh[:, None], float("-inf"))
    top_ps = torch.tensor([p.top_p for p in params], device=device, dtype=sub.dtype)
    if bool((top_ps < 1).any()):
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_ps[:, None]
        sub = sub.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    probs = sub.softmax(dim=-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def _mix(x: int) -> int:
    """splitmix64 finaliser: a counter-based generator, the same on every device."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keyed_uniform(seeds: Sequence[int], steps: Sequence[int], salt: int, n: int = 1,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, n] float32 uniforms in (0, 1), a pure function of (seed, step, salt, column)."""
    rows = []
    for seed, step in zip(seeds, steps):
        base = _mix(step_seed(seed, step) ^ _mix(salt))
        rows.append([((_mix(base + j) >> 40) + 0.5) / float(1 << 24) for j in range(n)])
    return torch.tensor(rows, dtype=torch.float32, device=device).reshape(len(rows), n)
