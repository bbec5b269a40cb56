"""The CPU backend: the native paged decode kernel (engine/kernels/paged_attention_cpu.h) for decode,
the torch reference (SDPA per sequence) for prefill."""

from __future__ import annotations

import torch

from engine.attention.torch_ref import TorchBackend


class CpuBackend(TorchBackend):
    name = "cpu"
    SHORT_CHUNK = 16  # longer chunks (a prefill's uncached suffix) go to SDPA, which tiles better

    def __init__(self, module) -> None:
        self._kernel = module.paged_decode_attention

    @classmethod
    def load(cls) -> CpuBackend | None:
        from engine.kernels import cpu_kernels

        module = cpu_kernels()
        return None if module is None else cls(module)

    def paged_extend(self, q, k, v, batch, k_cache, v_cache, scale, k_scale=None, v_scale=None, *,
                     window=None, softcap=None):
        """Short chunks (speculative verification: γ+1 tokens per sequence) as one native decode call
        with a row per new token: row j of sequence i sees the first prefix_i + j + 1 cached tokens,
        its own included (stored before attention). The torch path would loop over sequences."""
        if batch.max_q_len > self.SHORT_CHUNK or batch.block_tables is None:
            return super().paged_extend(q, k, v, batch, k_cache, v_cache, scale, k_scale, v_scale,
                                        window=window, softcap=softcap)
        lens = torch.tensor(batch.q_lens)
        tables = batch.block_tables.long().repeat_interleave(lens.to(batch.block_tables.device), dim=0)
        ctx = torch.cat([torch.arange(p + 1, p + n + 1) for p, n in zip(batch.prefix_lens_host, batch.q_lens)])
        return self._kernel(q.contiguous(), k_cache, v_cache, tables.contiguous(), ctx, scale, k_scale, v_scale,
                            window or 0, softcap or 0.0)

    def paged_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale, k_scale=None, v_scale=None, *,
                     window=None, softcap=None):
        """An int8 pool is read with its scales by the kernel itself (no dequantized copy)."""
        return self._kernel(q.contiguous(), k_cache, v_cache, block_tables.long(), context_lens.long(), scale,
                            k_scale, v_scale, window or 0, softcap or 0.0)
