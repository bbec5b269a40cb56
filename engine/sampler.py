"""Batched sampling on the logits' device: greedy, temperature, top-k, top-p, reproducible per request.

The random draw for token number `step` of a request depends only on (seed, step), never on which
worker samples it, on which device, or what else is in the batch: the prefill worker samples step 0,
the decode worker the rest, and a retried request produces the same text.

The randomness is counter-based (a 32-bit integer hash of seed, step and salt), computed with plain
tensor ops: no `torch.Generator` per row, no host sync, the same uniform on a CPU and a GPU, and usable
inside a CUDA graph (the token drawn with it still depends on the device's float arithmetic). A token
is drawn by inverse CDF: one keyed uniform per row, located in the cumulative sum of the row's
probabilities. (An exponential race, argmax_i p_i / -log(u_i), needs a uniform per
vocabulary entry: at 49k entries hashing them cost more than the model's decode step on a CPU.)

Top-p needs the tokens in probability order. On a CPU a full sort of every row is the slowest part of
sampling (240 ms for 64 rows of 49k), so each row's nucleus is first looked for among its 256, then
4096 most likely tokens (torch.topk); only a row whose nucleus reaches past those (a flat
distribution) is sorted whole. Either way the kept set is the same: the smallest prefix reaching p,
plus every token as probable as its last one (so equal probabilities never split it).

`SamplingTensors` holds the per-row parameters as device tensors plus host flags saying which
transforms any row needs; the decode loop keeps one per batch and updates it at admit/finish only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.config import SamplingParams

M32 = 0xFFFFFFFF
TOP_P_CANDIDATES = (256, 4096)  # on a CPU, top-p looks for each row's nucleus among this many tokens first


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32 family) on int64 tensors holding values in [0, 2^32).
    Both multipliers are < 2^31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def _mix32_int(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def seed_halves(seed: int) -> tuple[int, int]:
    """A request's seed as two 32-bit words (any Python int; negative seeds wrap)."""
    seed &= (1 << 64) - 1
    return seed & M32, seed >> 32


def keyed_uniform_t(seed_lo: torch.Tensor, seed_hi: torch.Tensor, steps: torch.Tensor, salt: int,
                  n: int) -> torch.Tensor:
    """[B, n] float32 uniforms in (0, 1), a pure function of (seed, step, salt, column).
    seed_lo/seed_hi/steps: [B] int64 on the target device. `salt` separates independent draws of the
    same step (e.g. speculative acceptance tests vs the token draw)."""
    salt_key = _mix32_int(salt * 0x9E3779B1 + 0x7F4A7C15)
    a = _mix32(seed_lo ^ _mix32((steps & M32) ^ salt_key))
    b = _mix32(seed_hi ^ _mix32((a + 0x9E3779B9) & M32))
    cols = torch.arange(n, device=steps.device, dtype=torch.int64)
    h = _mix32(_mix32((cols[None, :] + a[:, None]) & M32) ^ b[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def keyed_uniform(seeds: Sequence[int], steps: Sequence[int], salt: int, n: int = 1,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """keyed_uniform_t for Python seeds and steps: [B, n] uniforms keyed on (seed, step, salt)."""
    halves = [seed_halves(s) for s in seeds]
    lo = torch.tensor([h[0] for h in halves], dtype=torch.int64, device=device)
    hi = torch.tensor([h[1] for h in halves], dtype=torch.int64, device=device)
    return keyed_uniform_t(lo, hi, torch.tensor(list(steps), dtype=torch.int64, device=device), salt, n)


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters on the device. Greedy rows (temperature 0 or top_k 1) have
    temperature 0. Host flags (`any_*`) decide which transforms run, so sampling never syncs."""

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    seed_lo: torch.Tensor  # [B] int64
    seed_hi: torch.Tensor  # [B] int64
    all_greedy: bool
    max_top_k: int  # 0: no row uses top-k
    any_top_p: bool
    any_greedy: bool = True  # False: no row needs the argmax one-hot

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device | str) -> SamplingTensors:
        greedy = [p.greedy for p in params]
        halves = [seed_halves(p.seed) for p in params]
        top_ks = [0 if g else p.top_k for p, g in zip(params, greedy)]
        top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        return cls(
            temperature=torch.tensor([0.0 if g else p.temperature for p, g in zip(params, greedy)],
                                     dtype=torch.float32, device=device),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_ps, dtype=torch.float32, device=device),
            seed_lo=torch.tensor([lo for lo, _ in halves], dtype=torch.int64, device=device),
            seed_hi=torch.tensor([hi for _, hi in halves], dtype=torch.int64, device=device),
            all_greedy=all(greedy), max_top_k=max(top_ks, default=0), any_top_p=any(p < 1 for p in top_ps),
            any_greedy=any(greedy))

    def rows(self, index: torch.Tensor) -> SamplingTensors:
        """The same parameters for a subset/reordering of rows (e.g. one row per verified token)."""
        return SamplingTensors(self.temperature[index], self.top_k[index], self.top_p[index], self.seed_lo[index],
                               self.seed_hi[index], self.all_greedy, self.max_top_k, self.any_top_p,
                               self.any_greedy)


def processed_probs_t(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """[B, V] float32 probabilities after temperature, top-k and top-p; greedy rows are one-hot."""
    greedy = st.temperature == 0
    if st.all_greedy:
        return _one_hot_argmax(logits)
    scaled = logits / torch.where(greedy, 1.0, st.temperature)[:, None]
    if st.max_top_k > 0:
        k_max = min(st.max_top_k, scaled.shape[-1])
        top_vals = scaled.topk(k_max, dim=-1).values  # [B, k_max], descending
        kth = (st.top_k.clamp(1, k_max) - 1)[:, None]
        thresh = top_vals.gather(1, kth).squeeze(1).masked_fill(st.top_k == 0, float("-inf"))
        scaled = scaled.masked_fill(scaled < thresh[:, None], float("-inf"))
    if st.any_top_p:
        scaled = scaled.masked_fill(_outside_top_p(scaled, st.top_p), float("-inf"))
    probs = scaled.softmax(dim=-1)
    return torch.where(greedy[:, None], _one_hot_argmax(logits), probs) if st.any_greedy else probs


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)


def _outside_top_p(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] True where a token lies outside its row's nucleus. In descending order a token is in when
    the mass of the tokens before it is below top_p (the first always is); every token as probable as
    the last one in is in too, so the set depends on the probabilities, not on how a sort orders equal
    ones (a CPU's topk and a GPU's sort agree). Rows with top_p >= 1 drop nothing."""
    on = top_p < 1
    probs = scaled.softmax(dim=-1)
    if scaled.device.type != "cpu":
        return _outside_top_p_by_sort(probs, top_p)
    floor = torch.zeros_like(top_p)  # keep tokens with p >= floor
    todo = on.nonzero().flatten()
    for k in TOP_P_CANDIDATES:
        if len(todo) == 0 or k >= scaled.shape[-1]:
            break
        top = probs[todo].topk(k, dim=-1).values  # the sort's first k columns, same prefix sums
        kept = _nucleus_size(top, top_p[todo])
        covered = kept < k  # the first token out lies among these k: the nucleus is decided
        floor[todo[covered]] = top[covered].gather(1, (kept[covered] - 1)[:, None]).squeeze(1)
        todo = todo[~covered]
    if len(todo):
        floor[todo] = _nucleus_floor(probs[todo].sort(dim=-1, descending=True).values, top_p[todo])
    return (probs < floor[:, None]) & on[:, None]


def _outside_top_p_by_sort(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """_outside_top_p from one sort of every row: no host sync (the GPU's way; the CPU's reference)."""
    floor = _nucleus_floor(probs.sort(dim=-1, descending=True).values, top_p)
    return (probs < floor[:, None]) & (top_p < 1)[:, None]


def _nucleus_size(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """How many of the leading (descending) tokens are in: the mass before each, an exclusive prefix
    sum, is below top_p. At least 1."""
    before = torch.cat([torch.zeros_like(sorted_probs[:, :1]), sorted_probs.cumsum(dim=-1)[:, :-1]], dim=-1)
    return (before < top_p[:, None]).sum(dim=-1).clamp_min(1)


def _nucleus_floor(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The probability of the last token in (descending order): the nucleus is every token at least as probable."""
    return sorted_probs.gather(1, (_nucleus_size(sorted_probs, top_p) - 1)[:, None]).squeeze(1)


def draw_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [n, V] (unnormalised, nonnegative), u [n] in (0, 1) -> [n]. The first index
    whose cumulative sum reaches u * total: never a zero-probability token, as u > 0."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def draw(probs: torch.Tensor, st: SamplingTensors, steps: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """One token per row from `probs` [B, V], keyed on (seed, step, salt). -> [B] int64."""
    return draw_from(probs, keyed_uniform_t(st.seed_lo, st.seed_hi, steps, salt, 1)[:, 0])


def sample_t(logits: torch.Tensor, st: SamplingTensors, steps: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32, steps [B] int64 (the token number each row draws) -> token ids [B]."""
    if st.all_greedy:
        return logits.argmax(dim=-1)
    return draw(processed_probs_t(logits, st), st, steps)  # a greedy row is one-hot: its draw is its argmax


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """processed_probs_t for a list of SamplingParams."""
    return processed_probs_t(logits, SamplingTensors.build(params, logits.device))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B] (int64, on logits' device)."""
    st = SamplingTensors.build(params, logits.device)
    return sample_t(logits, st, torch.tensor(list(steps), dtype=torch.int64, device=logits.device))
