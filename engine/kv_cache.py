"""Paged KV cache: one fixed pool of blocks, and the BlockManager that hands them out.

Pool layout, one contiguous buffer (so it can live in one shared-memory
segment or one CUDA allocation and be exposed to a peer once):

    pool[layer, kv, block, slot, kv_head, head_dim]      kv: 0 = K, 1 = V
          L     2    NB    BS     KVH       D

A token at position p of a request whose block table is `table` lives at
block table[p // BS], slot p % BS. One block of one layer's K (or V) is
BS*KVH*D contiguous values: the unit the KV-transfer layer ships.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import DTYPES


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_layers * 2 * self.num_blocks * self.block_bytes

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def compatible_with(self, other: KVLayout) -> str | None:
        """None when a peer with `other` may write into this pool; else what differs."""
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype"):
            if getattr(self, name) != getattr(other, name):
                return f"{name}: {getattr(self, name)} != {getattr(other, name)}"
        return None

    @classmethod
    def for_budget(cls, *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: str, budget_bytes: int) -> KVLayout:
        probe = cls(num_layers, 1, block_size, num_kv_heads, head_dim, dtype)
        num_blocks = max(1, budget_bytes // probe.nbytes)
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype)


class KVPool:
    """Typed views over a pool buffer that someone else allocated (torch, shm, CUDA IPC)."""

    def __init__(self, layout: KVLayout, buffer: torch.Tensor) -> None:
        if buffer.numel() * buffer.element_size() < layout.nbytes:
            raise ValueError(f"buffer of {buffer.numel() * buffer.element_size()} bytes < pool {layout.nbytes}")
        self.layout = layout
        flat = buffer.view(torch.uint8).reshape(-1)[: layout.nbytes]
        self.tensor = flat.view(layout.torch_dtype).view(layout.shape)

    @classmethod
    def allocate(cls, layout: KVLayout, device: str = "cpu") -> KVPool:
        return cls(layout, torch.zeros(layout.shape, dtype=layout.torch_dtype, device=device))

    def write_blocks(self, layer: int, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, BS, KVH, D] into blocks `block_ids` of `layer`."""
        self.tensor[layer, 0].index_copy_(0, block_ids, k)
        self.tensor[layer, 1].index_copy_(0, block_ids, v)

    def read_blocks(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[layer, 0].index_select(0, block_ids), self.tensor[layer, 1].index_select(0, block_ids)

    def write_runs(self, layer: int, runs: list[tuple[int, int, int]], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, KVH, D] copied as contiguous runs (dst slot, src row, length): memcpy speed."""
        _, _, nb, bs, kvh, d = self.layout.shape
        dst_k = self.tensor[layer, 0].view(nb * bs, kvh, d)
        dst_v = self.tensor[layer, 1].view(nb * bs, kvh, d)
        for dst, src, n in runs:
            dst_k[dst:dst + n].copy_(k[src:src + n])
            dst_v[dst:dst + n].copy_(v[src:src + n])

    def write_tokens(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, KVH, D] into flat slots (block * BS + offset) of `layer`."""
        _, _, nb, bs, kvh, d = self.layout.shape
        self.tensor[layer, 0].view(nb * bs, kvh, d).index_copy_(0, slots, k)
        self.tensor[layer, 1].view(nb * bs, kvh, d).index_copy_(0, slots, v)


def block_runs(table: list[int], block_size: int, num_tokens: int, first_block: int = 0) -> list[tuple[int, int, int]]:
    """Tokens [first_block * BS, first_block * BS + num_tokens) of a request as contiguous copies.

    Consecutive block ids are consecutive in the pool (slot-major inside a block), so a run of them
    takes one copy: returns (dst slot, src row, length) per run. A fresh pool hands out consecutive
    blocks, so a request is usually one run.
    """
    runs: list[tuple[int, int, int]] = []
    src = 0
    index = first_block
    while src < num_tokens:
        start_block = table[index]
        length = 0
        while src + length < num_tokens and table[index] == start_block + (length // block_size):
            take = min(block_size, num_tokens - src - length)
            length += take
            index += 1
            if index >= len(table) or take < block_size:
                break
        runs.append((start_block * block_size, src, length))
        src += length
    return runs


class OutOfBlocks(RuntimeError):
    """An allocation asked for more blocks than are free; callers check can_allocate first."""


class BlockManager:
    """Free list and per-request block tables over a pool of `num_blocks` blocks.

    `can_allocate` / `allocate` / `free` form the contract: the caller checks,
    allocates once per request for all the tokens it will ever hold
    (prompt + max_tokens: no preemption needed), and frees when done.

    The free list is a stack: the most recently freed blocks are reused first
    (warm in cache and TLB), and a table comes out in ascending block order
    whenever it can, so a request's cache is usually one contiguous run.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._tables: dict[str, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already holds blocks")
        need = self.blocks_for(num_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"request {request_id} needs {need} blocks, {len(self._free)} free")
        table = [self._free.pop() for _ in range(need)]
        self._tables[request_id] = table
        return table

    def table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def free(self, request_id: str) -> int:
        """Return the request's blocks to the pool; freeing twice is a no-op."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return 0
        self._free.extend(reversed(table))
        return len(table)

    def requests(self) -> list[str]:
        return list(self._tables)

    def assert_empty(self) -> None:
        """Leak check: every block back on the free list, no request holding any."""
        if self._tables or len(self._free) != self.num_blocks or len(set(self._free)) != self.num_blocks:
            raise AssertionError(f"leak: {len(self._tables)} requests hold {self.num_used} blocks")
