"""The running batch's decode inputs, resident on the model's device.

Row i of every tensor belongs to the i-th running sequence. Rows change only when a sequence is
admitted (a row appended) or finishes (the last row moves into its place); a step reads rows
[0, n) and advances tokens, positions and sampling steps on the device, so nothing is rebuilt from
Python lists per step and the only host sync is reading the sampled ids for the stop checks.

    tokens[i]        the newest token of sequence i (fed to the next step)
    positions[i]     its position (where its K/V go)
    steps[i]         its sampling step (= tokens generated so far; keys the random draw)
    block_tables[i]  its blocks, zero-padded to max_blocks
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.config import SamplingParams
from engine.sampler import SamplingTensors, seed_halves


class DecodeState:
    def __init__(self, max_seqs: int, max_blocks: int, device: torch.device) -> None:
        self.max_seqs, self.max_blocks, self.device = max_seqs, max_blocks, device
        zeros = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.tokens, self.positions, self.steps = zeros(max_seqs), zeros(max_seqs), zeros(max_seqs)
        self.block_tables = zeros(max_seqs, max_blocks, dtype=torch.int32)
        self.temperature = zeros(max_seqs, dtype=torch.float32)
        self.top_p = torch.ones(max_seqs, dtype=torch.float32, device=device)
        self.top_k, self.seed_lo, self.seed_hi = zeros(max_seqs), zeros(max_seqs), zeros(max_seqs)
        self._params: list[SamplingParams] = []  # host copy, row order
        self._widths: list[int] = []  # blocks per row, host copy
        self._sampling: SamplingTensors | None = None

    @property
    def n(self) -> int:
        return len(self._params)

    @property
    def width(self) -> int:
        """Block-table columns the running rows use (a host value: no sync)."""
        return max(self._widths, default=1)

    def append(self, token: int, position: int, step: int, table: Sequence[int], params: SamplingParams) -> int:
        """A new row; returns its index."""
        i = self.n
        if i >= self.max_seqs:
            raise RuntimeError(f"decode state holds at most {self.max_seqs} sequences")
        if len(table) > self.max_blocks:
            raise ValueError(f"a block table of {len(table)} blocks exceeds max_blocks {self.max_blocks}")
        lo, hi = seed_halves(params.seed)
        greedy = params.greedy
        ints = torch.tensor([token, position, step, 0 if greedy else params.top_k, lo, hi], dtype=torch.int64)
        ints = ints.to(self.device, non_blocking=True)
        self.tokens[i], self.positions[i], self.steps[i] = ints[0], ints[1], ints[2]
        self.top_k[i], self.seed_lo[i], self.seed_hi[i] = ints[3], ints[4], ints[5]
        self.temperature[i] = 0.0 if greedy else params.temperature
        self.top_p[i] = 1.0 if greedy else params.top_p
        row = torch.zeros(self.max_blocks, dtype=torch.int32)
        row[: len(table)] = torch.tensor(list(table), dtype=torch.int32)
        self.block_tables[i].copy_(row.to(self.device, non_blocking=True))
        self._params.append(params)
        self._widths.append(len(table))
        self._sampling = None
        return i

    def remove(self, i: int) -> None:
        """Drop row i: the last row moves into its place (callers mirror this in their own lists)."""
        last = self.n - 1
        if i != last:
            for t in (self.tokens, self.positions, self.steps, self.temperature, self.top_p, self.top_k,
                      self.seed_lo, self.seed_hi, self.block_tables):
                t[i] = t[last]
            self._params[i], self._widths[i] = self._params[last], self._widths[last]
        self._params.pop()
        self._widths.pop()
        self._sampling = None

    def set_row(self, i: int, token: int, position: int, step: int) -> None:
        """Overwrite a row's inputs from the host (e.g. after a speculative step accepted several tokens)."""
        self.tokens[i], self.positions[i], self.steps[i] = token, position, step

    def sampling(self) -> SamplingTensors:
        """The running rows' sampling parameters; rebuilt only after an admit or finish."""
        if self._sampling is None:
            n, params = self.n, self._params
            greedy = [p.greedy for p in params]
            self._sampling = SamplingTensors(
                self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seed_lo[:n], self.seed_hi[:n],
                all_greedy=all(greedy), max_top_k=max((0 if g else p.top_k for p, g in zip(params, greedy)), default=0),
                any_top_p=any(not g and p.top_p < 1 for p, g in zip(params, greedy)), any_greedy=any(greedy))
        return self._sampling

    def advance(self, sampled: torch.Tensor) -> None:
        """After a step over rows [0, n): the sampled ids become the next inputs, one position on."""
        n = self.n
        self.tokens[:n] = sampled
        self.positions[:n] += 1
        self.steps[:n] += 1
