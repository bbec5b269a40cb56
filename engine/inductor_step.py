"""The inductor candidate for the compiled CPU decode step: measured against the native step
(engine/compiled_step.py, which won; `pdserve bench step --inductor`), not used by workers.

One torch.compile per batch-size bucket (dynamic=False, fullgraph): inductor with freezing (weights become
constants, linear weights prepacked for oneDNN) and its C++ wrapper. The forward is the torch reference's
ops, which inductor fuses itself; the KV store and the paged attention are one custom op
(`pdserve::paged_decode_step`, torch.library), so the graph does not break at attention. Buckets and padding
are the CUDA graphs' (engine/cuda_graphs.DecodeGraphs): a batch runs in the smallest bucket that holds it,
padding rows write no KV (slot -1) and read one cached token. Compiled code is cached on disk by inductor
(TORCHINDUCTOR_CACHE_DIR, set here to a folder keyed by model fingerprint, dtype, ISA and torch version).
Float KV pools only; quantized weights, and architectures the native step refuses
(engine/compiled_step.arch_refusal), are refused.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cuda_graphs import DecodeGraphs, graph_buckets
from engine.kv_cache import KVPool
from engine.model.ops import torch_rms_norm
from engine.model.rope import apply_rope

log = logging.getLogger("pdserve.inductor_step")


@functools.cache
def _register_op() -> None:
    """pdserve::paged_decode_step: store this step's K/V at `slots` (< 0: nowhere), then attend over the pool."""
    from engine.kernels import cpu_kernels

    native = cpu_kernels()

    @torch.library.custom_op("pdserve::paged_decode_step", mutates_args=("k_cache", "v_cache"))
    def paged_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, scale: float, window: int, softcap: float) -> torch.Tensor:
        native.store_kv(k_cache, v_cache, slots, k, v)
        return native.paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables.long(),
                                             context_lens.long(), scale, window=window, softcap=softcap)

    @paged_decode_step.register_fake
    def _(q, k, v, k_cache, v_cache, slots, block_tables, context_lens, scale, window, softcap):
        return torch.empty_like(q)


class _Step(torch.nn.Module):
    """The decode forward of `model` over a float pool, in torch ops (inductor's input)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, slots, block_tables, context_lens, pool):  # [B] x3, [B, MB], [B], pool
        m, t = self.model, tokens.shape[0]
        x = m.embed(tokens)
        rows = {key: (cos[positions], sin[positions]) for key, (cos, sin) in m.rope.items()}
        residual = None
        for i, layer in enumerate(m.layers):
            h, residual = torch_rms_norm(x, layer.input_norm.weight, layer.input_norm.eps, residual)
            q, k, v = layer.qkv_proj(h).split(layer.split, dim=-1)
            q, k = q.reshape(t, layer.num_heads, layer.head_dim), k.reshape(t, layer.num_kv_heads, layer.head_dim)
            if layer.q_norm is not None:
                q = torch_rms_norm(q.reshape(-1, layer.head_dim), layer.q_norm.weight, layer.q_norm.eps)[0].view_as(q)
                k = torch_rms_norm(k.reshape(-1, layer.head_dim), layer.k_norm.weight, layer.k_norm.eps)[0].view_as(k)
            cos, sin = rows[layer.rope_key]
            spec = layer.attention
            attn = torch.ops.pdserve.paged_decode_step(
                apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.reshape(t, layer.num_kv_heads, layer.head_dim),
                pool[i, 0], pool[i, 1], slots, block_tables, context_lens, spec.scale, spec.window or 0,
                spec.softcap or 0.0)
            h, residual = torch_rms_norm(layer.o_proj(attn.reshape(t, -1)), layer.mlp_norm.weight,
                                         layer.mlp_norm.eps, residual)
            gate, up = layer.mlp.gate_up_proj(h).chunk(2, dim=-1)
            x = layer.mlp.down_proj(F.silu(gate) * up)
        return m.lm_head(torch_rms_norm(x, m.norm.weight, m.norm.eps, residual)[0]).float()


def cache_dir(runner) -> Path:
    from engine.cpu_features import cpu_flags, isa_key
    from engine.runner import model_fingerprint

    key = f"{model_fingerprint(runner.folder)}-{runner.config.dtype}-{isa_key(cpu_flags())}-torch{torch.__version__}"
    return Path(runner.config.cache_dir) / "inductor" / key


class InductorDecodeStep(DecodeGraphs):
    """DecodeGraphs' static buffers and padding, with a compiled forward per bucket instead of a CUDA graph."""

    def __init__(self, runner, pool: KVPool, buckets: list[int]) -> None:
        from engine.compiled_step import arch_refusal

        if pool.scales is not None:
            raise ValueError("the inductor candidate runs float KV pools only")
        reason = arch_refusal(runner.model)
        if reason is not None:
            raise ValueError(f"the inductor candidate runs what the native step runs, not {reason}")
        _register_op()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir(runner))  # bench-only: this process's inductor cache
        max_blocks = -(-runner.arch.max_position_embeddings // pool.layout.block_size)
        super().__init__(runner.model, runner.backend, pool, max(buckets), max_blocks, capture=False)
        self.buckets = sorted(buckets)
        self._step = _Step(runner.model).eval()
        self._compiled = torch.compile(self._step, dynamic=False, fullgraph=True,
                                       options={"freezing": True, "cpp_wrapper": True})
        self.compile_s: dict[int, float] = {}
        for b in self.buckets:  # compiled at start, as the worker would
            started = time.perf_counter()
            self._forward(b)
            self.compile_s[b] = time.perf_counter() - started
        log.info("inductor decode step: buckets %s compiled in %s s", self.buckets,
                 {b: round(s, 1) for b, s in self.compile_s.items()})

    @torch.no_grad()
    def _forward(self, b: int) -> torch.Tensor:
        return self._compiled(self.tokens[:b], self.positions[:b], self.slots[:b], self.block_tables[:b],
                              self.context_lens[:b], self.pool.tensor)


def default_buckets(max_num_seqs: int) -> list[int]:
    return graph_buckets(max_num_seqs)
