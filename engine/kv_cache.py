"""Paged KV cache: one fixed pool of blocks, and the BlockManager that hands them out.

Pool layout, one contiguous buffer (so it can live in one shared-memory
segment or one CUDA allocation and be exposed to a peer once); layer l's region holds

    data  [kv, block, slot, kv_head, head_dim]    kv: 0 = K, 1 = V; per layer l: KVH_l heads of D_l
           2    NB    BS    KVH_l     D_l          model dtype, or int8
    scales[kv, block, slot, kv_head]              float32; int8 pools only
           2    NB    BS    KVH_l

    buffer = | data of layer 0 | layer 1 | ... | scales of layer 0 | layer 1 | ... |

When every layer has the same KV heads and head dim (every model we run today), that is exactly
data [layer, kv, block, slot, kv_head, head_dim] and scales [layer, kv, block, slot, kv_head]
(`KVPool.tensor`, `KVPool.scales`). A layer's sliding window (`LayerKV.window`) does not change its
region: it tells readers which positions they may skip and BlockManager which blocks it may free.

A token at position p of a request whose block table is `table` lives at
block table[p // BS], slot p % BS, in every layer's tensors. One block of one layer's K (or V) is
BS*KVH*D contiguous values (+ BS*KVH contiguous scales): the unit the KV-transfer layer ships.
A table entry -1 is a block the request does not hold: before its window (engine/kv_window.py).

`--kv-cache-dtype int8` (engine/kv_quant.py) stores each token's row of each KV head as int8 with
one float32 scale. The scales sit in their own region of the same buffer, indexed exactly like the
data (block id, slot, head) rather than interleaved into each block: every view of the data stays a
plain contiguous [NB, BS, KVH, D] tensor (the native and Triton kernels, the run copies of the
transports, a flat slot view all work unchanged), block b's scales are found by the same block id,
and one segment / one IPC handle still exposes everything. Float32 scales keep the round-trip
bound exact (|err| <= s/2) at 4 bytes per token-head: with D = 64, 68 bytes instead of 128 (bf16)
or 256 (fp32), so a pool of the same bytes holds 1.88x the blocks of bf16, 3.76x of fp32.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.config import torch_dtype
from engine.kv_quant import KV_CACHE_DTYPES, quantize_kv
from engine.kv_window import NO_BLOCK
from engine.prefix_cache import BlockKey, KVEvents, block_keys

SCALE_BYTES = 4  # float32, one per token per KV head (int8 pools)


@dataclass(frozen=True)
class LayerKV:
    """One layer's share of the pool: its KV heads and head dim, and the sliding window its attention
    reads within (None: every position)."""

    num_kv_heads: int
    head_dim: int
    window: int | None = None


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int  # of every layer, unless `layers` says otherwise
    head_dim: int
    dtype: str  # the model's dtype (what attention computes in)
    kv_cache_dtype: str = "auto"  # auto: stored in `dtype`; int8: quantized with per-token-per-head scales
    layers: tuple[LayerKV, ...] = ()  # per layer; () = LayerKV(num_kv_heads, head_dim) for each, no window

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.layers and len(self.layers) != self.num_layers:
            raise ValueError(f"{len(self.layers)} per-layer specs for {self.num_layers} layers")

    def layer(self, index: int) -> LayerKV:
        return self.layers[index] if self.layers else LayerKV(self.num_kv_heads, self.head_dim)

    @property
    def uniform(self) -> bool:
        """Every layer has the same KV heads and head dim (the pool is one [L, 2, NB, BS, KVH, D] tensor)."""
        return all((spec.num_kv_heads, spec.head_dim) == (self.num_kv_heads, self.head_dim) for spec in self.layers)

    @property
    def kv_window(self) -> int | None:
        """The widest window when every layer has one: positions older than it are never read again
        (engine/kv_window.py); None when any layer attends to every position."""
        windows = [self.layer(i).window for i in range(self.num_layers)]
        return None if any(w is None for w in windows) else max(windows)

    def _require_uniform(self) -> None:
        if not self.uniform:
            raise ValueError("this layout's layers differ in KV heads or head dim: address layers one by one")

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole data tensor [L, 2, NB, BS, KVH, D] (uniform layouts only)."""
        self._require_uniform()
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return self.shape[:-1]

    def layer_shape(self, layer: int) -> tuple[int, ...]:
        """Layer `layer`'s data [2, NB, BS, KVH_l, D_l]."""
        spec = self.layer(layer)
        return (2, self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)

    @property
    def quantized(self) -> bool:
        return self.kv_cache_dtype == "int8"

    @property
    def storage_dtype(self) -> str:
        """The name of what the pool's data holds (and a KV chunk on the wire carries)."""
        return "int8" if self.quantized else self.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        """The data tensor's dtype: int8 for a quantized pool, else the model's."""
        return torch.int8 if self.quantized else torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def layer_token_bytes(self, layer: int) -> int:
        """Bytes of one token's K (or V) of `layer`, all its KV heads, scales included."""
        spec = self.layer(layer)
        return spec.num_kv_heads * (spec.head_dim * self.itemsize + (SCALE_BYTES if self.quantized else 0))

    @property
    def token_bytes(self) -> int:
        """layer_token_bytes of every layer (uniform layouts only)."""
        self._require_uniform()
        return self.layer_token_bytes(0)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V), its scales included (uniform layouts only)."""
        return self.block_size * self.token_bytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies in the pool: K and V of every layer, scales included."""
        return 2 * sum(self.layer_token_bytes(i) for i in range(self.num_layers))

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block id across the pool: K and V of every layer, scales included."""
        return self.block_size * self.bytes_per_token

    def _layer_values(self, layer: int) -> int:
        spec = self.layer(layer)
        return 2 * self.num_blocks * self.block_size * spec.num_kv_heads * spec.head_dim

    def _layer_scales(self, layer: int) -> int:
        return 2 * self.num_blocks * self.block_size * self.layer(layer).num_kv_heads

    def data_offset(self, layer: int) -> int:
        """Byte offset of layer `layer`'s data in the buffer."""
        return sum(self._layer_values(i) for i in range(layer)) * self.itemsize

    def scales_offset(self, layer: int) -> int:
        """Byte offset of layer `layer`'s scales in the buffer (int8 pools)."""
        return self.data_nbytes + sum(self._layer_scales(i) for i in range(layer)) * SCALE_BYTES

    @property
    def data_nbytes(self) -> int:
        return self.data_offset(self.num_layers)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def compatible_with(self, other: KVLayout) -> str | None:
        """None when a peer with `other` may write into this pool; else what differs."""
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype", "kv_cache_dtype"):
            if getattr(self, name) != getattr(other, name):
                return f"{name}: {getattr(self, name)} != {getattr(other, name)}"
        for i in range(self.num_layers):
            if self.layer(i) != other.layer(i):
                return f"layer {i}: {self.layer(i)} != {other.layer(i)}"
        return None

    @classmethod
    def for_budget(cls, *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: str, budget_bytes: int, kv_cache_dtype: str = "auto",
                   layers: tuple[LayerKV, ...] = ()) -> KVLayout:
        probe = cls(num_layers, 1, block_size, num_kv_heads, head_dim, dtype, kv_cache_dtype, layers)
        num_blocks = max(1, budget_bytes // probe.nbytes)
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, kv_cache_dtype, layers)


class KVPool:
    """Typed views over a pool buffer that someone else allocated (torch, shm, CUDA IPC).

    `layer(l)`: layer l's data [2, NB, BS, KVH_l, D_l]; `layer_scales(l)`: its K and V scales [NB, BS, KVH_l]
    float32 for an int8 pool; `buffer`: all of it as bytes (what a transport exposes to a peer).
    For a uniform layout also `tensor` [L, 2, NB, BS, KVH, D] and `scales` [L, 2, NB, BS, KVH] (else None)."""

    def __init__(self, layout: KVLayout, buffer: torch.Tensor) -> None:
        if buffer.numel() * buffer.element_size() < layout.nbytes:
            raise ValueError(f"buffer of {buffer.numel() * buffer.element_size()} bytes < pool {layout.nbytes}")
        self.layout = layout
        self.buffer = buffer.view(torch.uint8).reshape(-1)[: layout.nbytes]
        self._layers = []
        self._scales = []
        for i in range(layout.num_layers):
            shape = layout.layer_shape(i)
            start = layout.data_offset(i)
            self._layers.append(self.buffer[start: layout.data_offset(i + 1)].view(layout.torch_dtype).view(shape))
            if layout.quantized:
                start = layout.scales_offset(i)
                end = start + layout._layer_scales(i) * SCALE_BYTES
                self._scales.append(self.buffer[start:end].view(torch.float32).view(shape[:-1]))
        self.tensor = self.scales = None
        if layout.uniform:
            self.tensor = self.buffer[: layout.data_nbytes].view(layout.torch_dtype).view(layout.shape)
            self.scales = (self.buffer[layout.data_nbytes:].view(torch.float32).view(layout.scale_shape)
                           if layout.quantized else None)

    @classmethod
    def allocate(cls, layout: KVLayout, device: str = "cpu") -> KVPool:
        return cls(layout, torch.zeros(layout.nbytes, dtype=torch.uint8, device=device))

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def layer(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s data [2, NB, BS, KVH_l, D_l] (0: K, 1: V)."""
        return self._layers[layer]

    def layer_scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """K and V scales [NB, BS, KVH] of `layer` (None, None for a float pool)."""
        if not self._scales:
            return None, None
        return self._scales[layer][0], self._scales[layer][1]

    def _flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V as [NB * BS, KVH, D]: one row per slot."""
        _, nb, bs, kvh, d = self.layout.layer_shape(layer)
        data = self._layers[layer]
        return data[0].view(nb * bs, kvh, d), data[1].view(nb * bs, kvh, d)

    def _flat_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, nb, bs, kvh, _ = self.layout.layer_shape(layer)
        scales = self._scales[layer]
        return scales[0].view(nb * bs, kvh), scales[1].view(nb * bs, kvh)

    def write_blocks(self, layer: int, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, BS, KVH, D] into blocks `block_ids` of `layer` (as stored: no quantization)."""
        self._layers[layer][0].index_copy_(0, block_ids, k)
        self._layers[layer][1].index_copy_(0, block_ids, v)

    def read_blocks(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._layers[layer]
        return data[0].index_select(0, block_ids), data[1].index_select(0, block_ids)

    def read_block_scales(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales [n, BS, KVH] of blocks `block_ids` of `layer` (int8 pools)."""
        assert self._scales, "a float pool has no scales"
        scales = self._scales[layer]
        return scales[0].index_select(0, block_ids), scales[1].index_select(0, block_ids)

    def _check_stored(self, k: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
        if k.dtype != self.layout.torch_dtype or (not self._scales) != (k_scale is None or v_scale is None):
            raise ValueError(f"KV rows of {k.dtype} ({'with' if k_scale is not None else 'without'} scales) "
                             f"do not fit a {self.layout.storage_dtype} pool (kv_cache_dtype "
                             f"{self.layout.kv_cache_dtype})")

    def write_runs(self, layer: int, runs: list[tuple[int, int, int]], k: torch.Tensor, v: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """k, v: [n, KVH, D] as stored (int8 pools: with scales [n, KVH]), copied as contiguous runs
        (dst slot, src row, length): memcpy speed."""
        self._check_stored(k, k_scale, v_scale)
        dst_k, dst_v = self._flat(layer)
        for dst, src, n in runs:
            dst_k[dst:dst + n].copy_(k[src:src + n])
            dst_v[dst:dst + n].copy_(v[src:src + n])
        if self._scales:
            sk, sv = self._flat_scales(layer)
            for dst, src, n in runs:
                sk[dst:dst + n].copy_(k_scale[src:src + n])
                sv[dst:dst + n].copy_(v_scale[src:src + n])

    def write_stored(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """k, v: [T, KVH, D] as stored (with scales [T, KVH] for int8) into flat slots (block * BS + offset)."""
        self._check_stored(k, k_scale, v_scale)
        dst_k, dst_v = self._flat(layer)
        dst_k.index_copy_(0, slots, k)
        dst_v.index_copy_(0, slots, v)
        if self._scales:
            sk, sv = self._flat_scales(layer)
            sk.index_copy_(0, slots, k_scale)
            sv.index_copy_(0, slots, v_scale)

    def write_tokens(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, KVH, D] in the model's dtype into flat slots of `layer`, quantized for an int8 pool."""
        self.write_stored(layer, slots, *as_stored(self.layout, k, v))


def rows_nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of KV rows (and their scales, when given) as they travel."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def as_stored(layout: KVLayout, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """k, v [T, KVH, D] from the model -> what the pool stores: (k, v, None, None) for a float pool,
    (k int8, v int8, k_scale, v_scale) for an int8 one (engine/kv_quant.py)."""
    if not layout.quantized:
        return k, v, None, None
    qk, sk = quantize_kv(k)
    qv, sv = quantize_kv(v)
    return qk, qv, sk, sv


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

    Sliding windows (engine/kv_window.py): `allocate(..., skip=n)` leaves the first n table entries
    NO_BLOCK (prompt blocks before the first decode step's window: never read, never sent), and
    `release_before` drops the leading blocks a sequence's window has left behind as it decodes;
    `take_released` reports those counts (the router's mirror shrinks the request's hold by them).
    A keyed block released this way becomes evictable like any other: its KV is still what its key says.
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
        self._released: dict[str, int] = {}  # request -> blocks release_before dropped since take_released

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

    def match_prefix(self, token_ids: list[int] | tuple[int, ...], max_blocks: int | None = None,
                     skip: int = 0) -> list[int]:
        """Physical ids of the longest run of full blocks already cached from block `skip` on (up to block
        `max_blocks`). A block's key names its whole prefix, so a run may start past block 0."""
        if not self.enable_prefix_caching or not token_ids:
            return []
        found = []
        for key in self.keys(token_ids, max_blocks)[skip:]:
            block = self._by_key.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, num_tokens: int, token_ids: list[int] | tuple[int, ...] = (),
                     max_shared: int | None = None, skip: int = 0) -> bool:
        """Does a request fit, counting only the blocks it does not find cached (nor skips)?"""
        need = self.blocks_for(num_tokens)
        shared = self.match_prefix(token_ids, min(need, max_shared if max_shared is not None else need), skip)
        idle_shared = sum(1 for b in shared if self._ref[b] == 0)  # evictable now, not once shared
        return need - skip - len(shared) <= self.num_free - idle_shared

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, token_ids: list[int] | tuple[int, ...] = (),
                 max_shared: int | None = None, skip: int = 0) -> list[int]:
        """Blocks for `num_tokens`, the first `skip` of them NO_BLOCK (before a sliding window: never
        held); the full blocks of `token_ids` from there (up to block `max_shared`) that are cached are
        shared, the rest are taken free (evicting least recently used cached blocks)."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already holds blocks")
        if not self.can_allocate(num_tokens, token_ids, max_shared, skip):
            raise OutOfBlocks(f"request {request_id} needs {self.blocks_for(num_tokens) - skip} blocks, "
                              f"{self.num_free} free")
        need = self.blocks_for(num_tokens)
        shared = self.match_prefix(token_ids, min(need, max_shared if max_shared is not None else need), skip)
        for b in shared:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        self._shared[request_id] = len(shared)
        table = [NO_BLOCK] * skip + shared
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
            if b == NO_BLOCK or b in self._key_of or key in self._by_key:
                continue
            self._key_of[b] = key
            self._by_key[key] = b
            self._events[key] = True
            added += 1
        return added

    def table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def shared_blocks(self, request_id: str) -> int:
        """How many blocks of the request (after those it skipped) were found cached at allocation."""
        return self._shared.get(request_id, 0)

    def release_before(self, request_id: str, num_blocks: int) -> int:
        """Drop the request's references to its first `num_blocks` blocks (a sliding window has passed them);
        their entries become NO_BLOCK. Returns how many it still held."""
        table = self._tables.get(request_id)
        if table is None:
            return 0
        released = 0
        for i in range(min(num_blocks, len(table))):
            if table[i] != NO_BLOCK:
                self._unref(table[i])
                table[i] = NO_BLOCK
                released += 1
        if released:
            self._released[request_id] = self._released.get(request_id, 0) + released
        return released

    def take_released(self) -> dict[str, int]:
        """Blocks release_before dropped per request since the last call."""
        released, self._released = self._released, {}
        return released

    def _unref(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if b in self._key_of:
                self._evictable[b] = None
            else:
                self._free.append(b)

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def free(self, request_id: str) -> int:
        """Drop the request's references; freeing twice is a no-op. Returns its number of blocks."""
        table = self._tables.pop(request_id, None)
        self._shared.pop(request_id, None)
        if table is None:
            return 0
        held = [b for b in table if b != NO_BLOCK]
        for b in reversed(held):  # a chain's tail becomes least recent: evicted before its head
            self._unref(b)
        return len(held)

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
