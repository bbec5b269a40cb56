"""KV across tensor-parallel degrees: the pools of a decode worker's ranks, written as one pool of all heads.

A decode worker of degree M keeps one pool per rank, each with its KV heads (engine/parallel/shard.py), under
the same block ids. A sender holds every head (a prefill worker of any degree gathers them: follow.py's
`gathered_sink`), so resharding is a split along the head axis at the receiving end:

    rows [n, KVH, D] (+ int8 scales [n, KVH])  --heads [s0, e0)-->  rank 0's pool [.., KVH_0, D]
                                               --heads [s1, e1)-->  rank 1's pool [.., KVH_1, D]   ...

`HeadShardedPool` offers what the writers use of a KVPool (`layout`, `device`, `write_runs`): the shared-memory
sender (kvtransfer/direct.py, mapping every rank's segment) and the gRPC receiver's inbox (rank 0, mapping its
followers' segments) write through it unchanged. Replicated heads (degree > KV heads) go to every rank holding
them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.kv_cache import KVLayout, KVPool, LayerKV
from engine.parallel.shard import HeadRange
from proto.messages import KVShard


def heads_of(shard: KVShard) -> HeadRange:
    return HeadRange(shard.head_start, shard.head_count, shard.total_heads)


def shard_of(heads: HeadRange, shm_name: str | None = None) -> KVShard:
    return KVShard(heads.start, heads.count, heads.total, shm_name)


def whole_layout(rank_layout: KVLayout, total_heads: int) -> KVLayout:
    """The layout of all `total_heads` KV heads, from one rank's layout (same blocks, dtype, windows)."""
    layers = tuple(LayerKV(total_heads, s.head_dim, s.window) for s in rank_layout.layers)
    return replace(rank_layout, num_kv_heads=total_heads, layers=layers)


def rank_layout(layout: KVLayout, heads: HeadRange) -> KVLayout:
    """One rank's share of a whole layout: the same blocks with `heads.count` KV heads per layer."""
    layers = tuple(LayerKV(heads.count, s.head_dim, s.window) for s in layout.layers)
    return replace(layout, num_kv_heads=heads.count, layers=layers)


def check_tiling(shards: tuple[KVShard, ...] | list[KVShard], total_heads: int) -> str | None:
    """None when the shards' head ranges cover heads [0, total) exactly (each head on one or more ranks,
    no range past the end); else what is wrong."""
    held = set()
    for i, h in enumerate(map(heads_of, shards)):
        if h.total != total_heads or h.start < 0 or h.stop > total_heads or h.count < 1:
            return f"rank {i} holds KV heads {h.start}..{h.stop} of {h.total}, the model has {total_heads}"
        held.update(range(h.start, h.stop))
    missing = sorted(set(range(total_heads)) - held)
    return f"KV heads {missing} are held by no rank" if missing else None


class HeadShardedPool:
    """Every rank's pool seen as one pool of all KV heads, for writing (see the module docstring)."""

    def __init__(self, parts: list[tuple[KVPool, HeadRange]]) -> None:
        if not parts:
            raise ValueError("a sharded pool needs at least one rank's pool")
        total = parts[0][1].total
        problem = check_tiling([shard_of(h) for _, h in parts], total)
        if problem:
            raise ValueError(problem)
        first = parts[0][0].layout
        self.layout = whole_layout(first, total)
        for pool, heads in parts:
            if pool.layout != rank_layout(self.layout, heads):
                raise ValueError(f"rank pool {pool.layout} does not hold heads {heads} of {self.layout}")
        self.parts = parts

    @property
    def device(self) -> torch.device:
        return self.parts[0][0].device

    def write_runs(self, layer: int, runs: list[tuple[int, int, int]], k: torch.Tensor, v: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """k, v: [n, KVH, D] of all heads (int8: scales [n, KVH]); each rank's pool gets its heads' rows."""
        for pool, h in self.parts:
            cut = [None if x is None else x[:, h.start:h.stop].contiguous() for x in (k, v, k_scale, v_scale)]
            pool.write_runs(layer, runs, *cut)
