"""The CPU backend: the native paged decode kernel (engine/kernels/paged_attention_cpu.cpp) for decode,
the torch reference (SDPA per sequence) for prefill."""

from __future__ import annotations

from engine.attention.torch_ref import TorchBackend


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, module) -> None:
        self._kernel = module.paged_decode_attention

    @classmethod
    def load(cls) -> CpuBackend | None:
        from engine.kernels import cpu_paged_attention

        module = cpu_paged_attention()
        return None if module is None else cls(module)

    def paged_decode(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        return self._kernel(q.contiguous(), k_cache, v_cache, block_tables.long(), context_lens.long(), scale)
