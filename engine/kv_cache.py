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

from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.config import DTYPES
from engine.prefix_cache import BlockKey, KVEvents, block_keys


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
    """Ref-counted blocks over a pool of `num_blocks`, with an optional prefix cache.

    `can_allocate` / `allocate` / `free` form the contract: the caller checks,
    allocates once per request for all the tokens it will ever hold
    (prompt + max_tokens: no preemption needed), and frees when done.

    Prefix caching (`enable_prefix_caching`): `register` gives a request's full prompt blocks their
    keys (prefix_cache.block_keys) once their KV is complete; a later `allocate` with the same
    leading tokens shares those blocks (ref count + 1) and takes fresh ones only for the rest.
    Each block is in exactly one state:

        referenced   ref > 0; never reused
        evictable    ref == 0 with a key: in an LRU, reused (its key dropped) only when room is needed
        free         ref == 0, no key: a stack

    `num_free` counts free + evictable: cached blocks cost nothing until someone needs the room.
    The free stack returns ascending runs whenever it can, so a request's cache is usually one
    contiguous run (one copy per layer in a transfer).
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False,
                 salt: str = "") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._ref = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}
        self._by_key: dict[BlockKey, int] = {}
        self._tables: dict[str, list[int]] = {}
        self._shared: dict[str, int] = {}  # request -> leading blocks it found cached
        self._events: dict[BlockKey, bool] = {}  # key -> held, since the last take_events (last change wins)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks carrying a key (referenced or evictable)."""
        return len(self._key_of)

    # ---- prefix lookup -------------------------------------------------------------------
    def keys(self, token_ids: list[int] | tuple[int, ...], max_blocks: int | None = None) -> list[BlockKey]:
        return block_keys(token_ids, self.block_size, self.salt, max_blocks)

    def match_prefix(self, token_ids: list[int] | tuple[int, ...], max_blocks: int | None = None) -> list[int]:
        """Physical ids of the longest run of leading full blocks already cached (at most `max_blocks`)."""
        if not self.enable_prefix_caching or not token_ids:
            return []
        found = []
        for key in self.keys(token_ids, max_blocks):
            block = self._by_key.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, num_tokens: int, token_ids: list[int] | tuple[int, ...] = (),
                     max_shared: int | None = None) -> bool:
        """Does a request fit, counting only the blocks it does not find cached?"""
        need = self.blocks_for(num_tokens)
        shared = self.match_prefix(token_ids, min(need, max_shared if max_shared is not None else need))
        idle_shared = sum(1 for b in shared if self._ref[b] == 0)  # evictable now, not once shared
        return need - len(shared) <= self.num_free - idle_shared

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, token_ids: list[int] | tuple[int, ...] = (),
                 max_shared: int | None = None) -> list[int]:
        """Blocks for `num_tokens`; the leading full blocks of `token_ids` (up to `max_shared`) that are
        cached are shared, the rest are taken free (evicting least recently used cached blocks)."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already holds blocks")
        if not self.can_allocate(num_tokens, token_ids, max_shared):
            raise OutOfBlocks(f"request {request_id} needs {self.blocks_for(num_tokens)} blocks, "
                              f"{self.num_free} free")
        need = self.blocks_for(num_tokens)
        table = self.match_prefix(token_ids, min(need, max_shared if max_shared is not None else need))
        for b in table:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        self._shared[request_id] = len(table)
        for _ in range(need - len(table)):
            b = self._take()
            self._ref[b] = 1
            table.append(b)
        self._tables[request_id] = table
        return table

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        b, _ = self._evictable.popitem(last=False)
        key = self._key_of.pop(b)
        del self._by_key[key]
        self._events[key] = False
        return b

    def register(self, request_id: str, token_ids: list[int] | tuple[int, ...]) -> int:
        """Key the request's full blocks of `token_ids`, whose KV is now complete: later requests may
        share them. A block whose key another block already carries stays private. Returns how many
        blocks got a key."""
        if not self.enable_prefix_caching:
            return 0
        table = self._tables[request_id]
        added = 0
        for b, key in zip(table, self.keys(token_ids, len(table))):
            if b in self._key_of or key in self._by_key:
                continue
            self._key_of[b] = key
            self._by_key[key] = b
            self._events[key] = True
            added += 1
        return added

    def table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def shared_blocks(self, request_id: str) -> int:
        """How many leading blocks of the request were found cached at allocation."""
        return self._shared.get(request_id, 0)

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def free(self, request_id: str) -> int:
        """Drop the request's references; freeing twice is a no-op. Returns its number of blocks."""
        table = self._tables.pop(request_id, None)
        self._shared.pop(request_id, None)
        if table is None:
            return 0
        for b in reversed(table):  # a chain's tail becomes least recent: evicted before its head
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        return len(table)

    def take_events(self) -> KVEvents:
        """Keys stored and evicted since the last call (for the router's KV index)."""
        events, self._events = self._events, {}
        return KVEvents([k for k, held in events.items() if held], [k for k, held in events.items() if not held])

    def requests(self) -> list[str]:
        return list(self._tables)

    def assert_empty(self) -> None:
        """Leak check: no request holds a block, no reference is left, every block free or evictable."""
        blocks = self._free + list(self._evictable)
        if (self._tables or any(self._ref) or len(blocks) != self.num_blocks
                or len(set(blocks)) != self.num_blocks):
            raise AssertionError(f"leak: {len(self._tables)} requests hold {self.num_used} blocks, "
                                 f"{sum(1 for r in self._ref if r)} referenced")
