"""Attention contexts: packed causal prefill, and decode over paged block tables.

Both use torch's scaled_dot_product_attention, which runs on CPU and CUDA.
A context is built once per forward and passed to the model explicitly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.kv_cache import KVPool

# (layer, k [T, KVH, D], v [T, KVH, D]) for all packed tokens of a prefill batch.
KVSink = Callable[[int, torch.Tensor, torch.Tensor], None]


class PrefillAttention:
    """Causal attention over sequences packed back to back, no padding.

    Each layer's K/V (after RoPE) is handed to `kv_sink` before attention runs,
    so a transfer of layer i can overlap the compute of layer i+1.
    """

    def __init__(self, seq_lens: list[int], kv_sink: KVSink | None = None) -> None:
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for n in seq_lens:
            self.bounds.append((start, start + n))
            start += n
        self.kv_sink = kv_sink

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_sink is not None:
            self.kv_sink(layer, k, v)
        if len(self.bounds) == 1:
            return _causal(q, k, v)
        out = torch.empty_like(q)
        for s, e in self.bounds:
            out[s:e] = _causal(q[s:e], k[s:e], v[s:e])
        return out


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [L, H, D] -> [1, H, L, D]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        is_causal=True, enable_gqa=True,
    )
    return o.squeeze(0).transpose(0, 1)


# (q [B, H, D], k_pool [NB, BS, KVH, D], v_pool, block_tables [B, MB], context_lens [B], scale) -> [B, H, D]
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def torch_paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference: gather each sequence's blocks into a padded tensor, mask, SDPA. Any device."""
    b, mb = block_tables.shape
    _, bs, kvh, d = k_pool.shape
    flat = block_tables.reshape(-1)
    keys = k_pool.index_select(0, flat).view(b, mb * bs, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
    values = v_pool.index_select(0, flat).view(b, mb * bs, kvh, d).transpose(1, 2)
    mask = (torch.arange(mb * bs, device=q.device)[None, :] < context_lens[:, None]).view(b, 1, 1, mb * bs)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)


def _cpu_kernel() -> DecodeKernel | None:
    from engine.kernels import cpu_paged_attention

    module = cpu_paged_attention()
    return None if module is None else module.paged_decode_attention


# Backends by name, imported lazily: a CPU machine never touches CUDA-only code.
DECODE_BACKENDS: dict[str, Callable[[], DecodeKernel | None]] = {
    "torch": lambda: torch_paged_decode,
    "cpu": _cpu_kernel,
}


def decode_kernel(name: str, device: str) -> tuple[str, DecodeKernel]:
    """Resolve `auto` to the fastest backend that loads on `device`; fall back to torch."""
    if name == "auto":
        name = "cpu" if device == "cpu" else "torch"
    if name not in DECODE_BACKENDS:
        raise ValueError(f"attention backend must be one of {['auto', *DECODE_BACKENDS]}, got {name!r}")
    kernel = DECODE_BACKENDS[name]()
    return (name, kernel) if kernel is not None else ("torch", torch_paged_decode)


class PagedDecodeAttention:
    """One new token per sequence, attending to its whole cache through its block table.

    The new token's K/V are written into the pool first (at `slots`), then the
    decode kernel reads each sequence's cache through its block table.
    """

    def __init__(self, pool: KVPool, slots: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, kernel: DecodeKernel = torch_paged_decode) -> None:
        # slots: [B]; block_tables: [B, MB] (padding entries are never read); context_lens: [B]
        self.pool, self.slots, self.kernel = pool, slots, kernel
        self.block_tables, self.context_lens = block_tables, context_lens
        self.scale = pool.layout.head_dim ** -0.5

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pool.write_tokens(layer, self.slots, k, v)
        cache = self.pool.tensor[layer]
        return self.kernel(q.contiguous(), cache[0], cache[1], self.block_tables, self.context_lens, self.scale)
