"""The Triton backend (CUDA): varlen prefill with a paged prefix, split-KV paged decode and the KV
store, each one launch per layer (engine/kernels/triton_attention.py, triton_ops.py)."""

from __future__ import annotations

import logging

from engine.attention.base import AttentionBackend, VarlenBatch

log = logging.getLogger("pdserve.attention")


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        from engine.kernels import triton_attention, triton_ops

        self._attn, self._ops = triton_attention, triton_ops

    @classmethod
    def load(cls) -> TritonBackend | None:
        try:
            return cls()
        except ImportError as e:  # no Triton on this platform
            log.warning("Triton is unavailable (%s)", e)
            return None

    def varlen_prefill(self, q, k, v, batch: VarlenBatch, k_cache, v_cache, scale, k_scale=None, v_scale=None, *,
                       window=None, softcap=None):
        prefix = batch.prefix_lens if batch.has_prefix else None
        return self._attn.extend_attention(q, k, v, batch.cu_q, batch.max_q_len, prefix, k_cache, v_cache,
                                           batch.block_tables, scale, k_scale, v_scale, window, softcap)

    def paged_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale, k_scale=None, v_scale=None, *,
                     window=None, softcap=None):
        return self._attn.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale,
                                       k_scale=k_scale, v_scale=v_scale, window=window, softcap=softcap)

    def store_kv(self, k_cache, v_cache, slots, k, v, k_scale=None, v_scale=None) -> None:
        self._ops.store_kv(k_cache, v_cache, slots, k, v, k_scale, v_scale)

    @property
    def graph_safe(self) -> bool:
        return True

