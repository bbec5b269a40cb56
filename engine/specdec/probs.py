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
    """logits [B, V] float32 -> probs [B, V] after temperature, top-k and top-p; greedy rows one-hot."""
    probs = torch.zeros_like(logits)
    for r, p in enumerate(params):
        row = logits[r]
        if p.greedy:
            probs[r, row.argmax()] = 1.0
            continue
        row = row / p.temperature
        if p.top_k > 0:
            k = min(p.top_k, row.shape[-1])
            row = row.masked_fill(row < row.topk(k).values[-1], float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = row.sort(descending=True)
            q = sorted_logits.softmax(-1)
            drop = (q.cumsum(-1) - q) >= p.top_p
            row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs[r] = row.softmax(-1)
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
