"""The attention-backend interface: one object per device covers prefill, extend and decode.

Every backend implements the same four operations over the paged pool layout
(`engine/kv_cache.py`); the model never sees which one runs:

    varlen_prefill  packed causal attention of each sequence's new tokens over
                    [its cached prefix (paged, through its block table)] + [itself]
    paged_decode    one new token per sequence over its whole cache (paged)
    store_kv        a layer's K/V for every token of a batch into its slots (one launch)

The torch backend is the reference (any device, any shape); `cpu` adds the
native decode kernel; `triton` runs everything as Triton kernels on CUDA.

Per layer (`AttentionSpec`): the softmax scale; a sliding window W (a query at position p sees keys at
p - W < j <= p, as transformers' sliding-window mask); a logit softcap c (scores -> c * tanh(s / c)
before masking and softmax, Gemma 2). Every reader takes them as keyword arguments `window` / `softcap`
(None: off) and never reads a key outside the window, so blocks before it may be freed (-1 in a table).

An int8 pool (`--kv-cache-dtype int8`, engine/kv_quant.py) comes with its scales: every method
that touches the cache takes k_scale/v_scale [NB, BS, KVH] float32 (None for a float pool);
store_kv quantizes, the readers dequantize (K/V values q * s) as they load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.kv_quant import quantize_kv


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention, as the model hands it to its context with each call."""

    scale: float
    window: int | None = None  # sliding window in positions (the query's own included); None: every key
    softcap: float | None = None  # attention-logit soft-capping; None: off


@dataclass(frozen=True)
class VarlenBatch:
    """A packed batch of B sequences. Sequence i owns query rows cu_q[i]:cu_q[i+1] and has
    prefix_lens[i] tokens already in the pool (read through block_tables[i]) before them.

    Host copies (`q_lens`, `prefix_lens_host`) serve reference loops and grid sizes; the tensors
    live on the device. `block_tables` is None when no sequence has a cached prefix."""

    q_lens: tuple[int, ...]
    prefix_lens_host: tuple[int, ...]
    cu_q: torch.Tensor  # [B + 1] int32
    prefix_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor | None  # [B, MB] int32

    @classmethod
    def build(cls, q_lens: list[int], prefix_lens: list[int] | None = None,
              block_tables: torch.Tensor | None = None, device: torch.device | str = "cpu") -> VarlenBatch:
        prefix = list(prefix_lens) if prefix_lens is not None else [0] * len(q_lens)
        if any(prefix) and block_tables is None:
            raise ValueError("a cached prefix needs block tables")
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
        return cls(tuple(q_lens), tuple(prefix), cu.to(device), torch.tensor(prefix, dtype=torch.int32, device=device),
                   None if block_tables is None else block_tables.to(device=device, dtype=torch.int32))

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens, default=0)

    @property
    def has_prefix(self) -> bool:
        return any(self.prefix_lens_host)


class AttentionBackend(ABC):
    """Shapes: q [T, H, D]; k, v [T, KVH, D]; one layer's caches k_cache/v_cache [NB, BS, KVH, D]
    (model dtype, or int8 with k_scale/v_scale [NB, BS, KVH] float32)."""

    name: str

    @abstractmethod
    def varlen_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch,
                       k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, scale: float,
                       k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                       window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Causal: row j of sequence i sees its prefix and its own rows 0..j (within `window`). -> [T, H, D]."""

    def paged_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """varlen_prefill for new tokens whose K/V are already stored in the cache (ExtendAttention stores
        them first), so a backend may read every key from the pool. Default: varlen_prefill."""
        return self.varlen_prefill(q, k, v, batch, k_cache, v_cache, scale, k_scale, v_scale,
                                   window=window, softcap=softcap)

    @abstractmethod
    def paged_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """q [B, H, D]; sequence b sees its first context_lens[b] cached tokens (the last `window` of them).
        -> [B, H, D]."""

    def store_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """k, v [T, KVH, D] into flat slots (block * BS + offset); a slot < 0 is skipped (padding).
        With scales (an int8 cache) each row is quantized first (engine/kv_quant.quantize_kv)."""
        nb, bs, kvh, d = k_cache.shape
        keep = slots >= 0
        if not bool(keep.all()):
            slots, k, v = slots[keep], k[keep], v[keep]
        slots = slots.long()
        if k_scale is not None:
            (k, sk), (v, sv) = quantize_kv(k), quantize_kv(v)
            k_scale.view(nb * bs, kvh).index_copy_(0, slots, sk)
            v_scale.view(nb * bs, kvh).index_copy_(0, slots, sv)
        k_cache.view(nb * bs, kvh, d).index_copy_(0, slots, k)
        v_cache.view(nb * bs, kvh, d).index_copy_(0, slots, v)

    @property
    def graph_safe(self) -> bool:
        """True when paged_decode and store_kv may be captured in a CUDA graph (no host syncs,
        no shapes that depend on values)."""
        return False
