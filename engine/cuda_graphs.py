"""Decode steps as CUDA graphs: one captured per batch-size bucket, replayed every step.

A 64-sequence decode step of a 30-layer model is ~600 kernel launches; launched from Python they
take longer than the GPU takes to run them. Captured once per bucket (1, 2, 4, 8, then every 16 up
to --max-num-seqs) over static input buffers, a step becomes one replay. A batch of n rows runs the
smallest bucket >= n; the padding rows write no KV (slot -1) and read one cached token (context 1),
so they cannot disturb real sequences. Above the largest bucket the step runs eagerly.

On a CPU (or with --enforce-eager) the same padded static-buffer path runs without capture, which is
how the bucket choice and the padding are tested without a GPU.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.attention import PagedDecodeAttention
from engine.kv_cache import KVPool

log = logging.getLogger("pdserve.cuda_graphs")


def graph_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (which is always a bucket)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds n rows; None above the largest (run eagerly)."""
    for b in buckets:
        if b >= n:
            return b
    return None


class DecodeGraphs:
    """Static buffers sized for the largest bucket, and one graph per bucket (when capturing)."""

    def __init__(self, model: torch.nn.Module, backend, pool: KVPool, max_num_seqs: int, max_blocks: int,
                 capture: bool) -> None:
        self.model, self.backend, self.pool = model, backend, pool
        self.buckets = graph_buckets(max_num_seqs)
        self.block_size = pool.layout.block_size
        device = pool.device
        top = self.buckets[-1]
        self.tokens = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slots = torch.full((top,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(top, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0
        if capture:
            self._capture_all()

    def _forward(self, b: int) -> torch.Tensor:
        ctx = PagedDecodeAttention(self.pool, self.slots[:b], self.block_tables[:b], self.context_lens[:b],
                                   self.backend)
        return self.model(self.tokens[:b], self.positions[:b], ctx)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        started = time.perf_counter()
        mempool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first: smaller graphs reuse its memory
            self._forward(b)  # warm-up: Triton compiles, allocator settles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.outputs[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - started
        log.info("captured %d decode graphs (batch sizes %s) in %.1f s", len(self.graphs), self.buckets,
                 self.capture_s)

    def covers(self, n: int) -> bool:
        return bucket_for(n, self.buckets) is not None

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """n rows (n <= the largest bucket): tokens/positions [n], block_tables [n, W] -> logits [n, vocab]."""
        n, width = block_tables.shape
        b = bucket_for(n, self.buckets)
        if b is None:
            raise ValueError(f"{n} rows exceed the largest decode graph ({self.buckets[-1]})")
        bs = self.block_size
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.block_tables[:n, :width].copy_(block_tables)
        self.block_tables[:n, width:].zero_()
        self.slots[:n].copy_(block_tables.gather(1, (positions // bs)[:, None]).squeeze(1).long() * bs + positions % bs)
        self.context_lens[:n].copy_(positions + 1)
        if b > n:  # padding rows: no KV written, one token read (block 0, harmless), positions 0
            self.slots[n:b].fill_(-1)
            self.context_lens[n:b].fill_(1)
            self.tokens[n:b].zero_()
            self.positions[n:b].zero_()
            self.block_tables[n:b].zero_()
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self._forward(b)[:n]
