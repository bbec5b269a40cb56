"""ModelRunner: the only thing that calls the model. `prefill(batch)` and `decode(batch)`.

It takes plain token lists and block tables; it knows nothing of requests'
states, workers or transports.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from engine.attention import ExtendAttention, KVSink, PagedDecodeAttention, PrefillAttention, VarlenBatch, get_backend
from engine.config import EngineConfig, ModelArch, ModelImpl
from engine.families import read_arch
from engine.kv_cache import KVLayout, KVPool, LayerKV
from engine.loader import load_hf_config, load_state_dict, read_generation_eos, resolve_model
from engine.model.llama import CausalLM
from engine.model.ops import ops_for
from engine.parallel import SINGLE, ShardPlan, TensorParallel, TensorParallelUnsupported
from engine.parallel.layers import parallelize
from engine.quant import quantize_model

log = logging.getLogger("pdserve.runner")


@dataclass(frozen=True)
class LoadedModel:
    folder: Path
    arch: ModelArch  # this rank's shape: its query/KV heads and MLP width under tensor parallelism
    model: nn.Module  # CausalLM (native) or GenericCausalLM (transformers' modules): the same forward
    shard: ShardPlan  # which part of the whole model this rank holds (the whole of it at TP 1)


def load_model(config: EngineConfig, tp: TensorParallel = SINGLE) -> LoadedModel:
    """The checkpoint on the path engine/model/registry.py picks for it (a refused one raises before any
    weight is read); the log says which."""
    config = config.resolved()
    folder = resolve_model(config.model, config.cache_dir)
    hf_config = load_hf_config(folder)
    arch = read_arch(hf_config, config.model_impl)
    extra_eos = read_generation_eos(folder)
    if extra_eos:
        arch = replace(arch, eos_token_ids=tuple(dict.fromkeys(arch.eos_token_ids + extra_eos)))
    if tp.size > 1 and config.quantization != "none":
        raise TensorParallelUnsupported(f"--quantization {config.quantization} with tensor parallel size {tp.size}: "
                                        "quantized weights are not sharded yet; use tensor parallel size 1")
    log.info("%s (%s): %s path", folder.name, arch.model_type, arch.impl.label)
    if arch.impl is ModelImpl.TRANSFORMERS:
        if tp.size > 1:
            raise TensorParallelUnsupported(f"tensor parallel size {tp.size} on the generic (transformers) path: "
                                            "native families only; use tensor parallel size 1")
        from engine.model.generic import load_generic

        model = load_generic(folder, config, arch)
        return LoadedModel(folder, model.arch, model, ShardPlan.of(model.arch, 0, 1))
    plan = ShardPlan.of(arch, tp.rank, tp.size)
    with torch.device("meta"):  # skip the random init of 100M+ parameters
        model = CausalLM(plan.rank_arch, hf_config)
        parallelize(model, plan, tp)
    # assigns the checkpoint's tensors (this rank's slices): no meta one is left
    model.load_hf_weights(load_state_dict(folder), plan.shard if tp.size > 1 else None)
    quantize_model(model, config, folder)  # --quantization: swaps linear layers for QuantLinear
    model = model.to(device=config.device, dtype=config.torch_dtype).eval()
    model.init_rope(config.torch_dtype)
    return LoadedModel(folder, plan.rank_arch, model, plan)


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, tp: TensorParallel = SINGLE) -> None:
        config = config.resolved()
        self.config = config
        self.tp = tp  # every rank of a tensor-parallel worker runs the same calls with its own pool
        self.bind_thread()
        loaded = loaded or load_model(config, tp)
        self.folder, self.arch, self.model, self.shard = loaded.folder, loaded.arch, loaded.model, loaded.shard
        self.device = torch.device(config.device)
        self.backend = get_backend(config.attention_backend, config.device)
        self.model.use_ops(ops_for(self.backend.name))
        if self.arch.impl is ModelImpl.TRANSFORMERS:
            if config.speculative.startswith("layers:"):
                raise ValueError("--speculative layers:K drafts with the model's first layers: native path only")
            if config.device == "cuda" and not config.enforce_eager:  # modules of unknown host syncs: no graphs
                self.config = replace(config, enforce_eager=True)

    @functools.cached_property
    def compiled_step(self):
        """The compiled CPU decode step over this model (engine/compiled_step.py), built once per runner: its
        packed weights are a second copy of the projections. None where it is refused (the log says why)."""
        from engine.compiled_step import compile_decode_step

        return compile_decode_step(self)

    @property
    def attention_backend(self) -> str:
        """The attention backend's name (torch, cpu, triton)."""
        return self.backend.name

    def bind_thread(self) -> None:
        """Apply `num_threads` to the calling thread (OpenMP's thread count is per calling thread).
        Workers run the model on one ComputeThread, which does this at start."""
        if self.config.num_threads > 0:
            torch.set_num_threads(self.config.num_threads)

    def kv_layout(self, num_blocks: int | None = None) -> KVLayout:
        """The pool layout for this model (this rank's KV heads); sized from `kv_cache_gib` unless `num_blocks`
        is given. Tensor parallel: the rank holding the most heads sizes it, so every rank has the same blocks."""
        if num_blocks is None and self.shard.size > 1:
            widest = replace(self.arch, num_kv_heads=self.shard.max_kv_heads)
            num_blocks = kv_layout_for(widest, self.config).num_blocks
        return kv_layout_for(self.arch, self.config, num_blocks)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], kv_sink: KVSink | None) -> torch.Tensor:
        """Run all prompts packed together; return last-token logits [n, vocab] float32."""
        lens = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        last = torch.tensor(lens, device=self.device).cumsum(0) - 1
        ctx = PrefillAttention(lens, kv_sink, self.backend, self.device)
        return self.model(ids, positions, ctx, logits_index=last)

    @torch.inference_mode()
    def extend(self, pool: KVPool, chunks: list[list[int]], prefix_lens: list[int], block_tables: list[list[int]],
               all_logits: bool = False, kv_sink: KVSink | None = None) -> torch.Tensor:
        """Append `chunks[i]` to sequence i, whose first prefix_lens[i] tokens are already in `pool`
        (blocks `block_tables[i]`, which must also cover the new tokens). Writes the new tokens' K/V
        into the pool. Returns logits [T, vocab] for every new token (`all_logits`, e.g. speculative
        verification) or [n, vocab] for each sequence's last one (prefix-cached prefill)."""
        bs = pool.layout.block_size
        lens = [len(c) for c in chunks]
        positions = [p for start, n in zip(prefix_lens, lens) for p in range(start, start + n)]
        slots = [table[p // bs] * bs + p % bs
                 for table, start, n in zip(block_tables, prefix_lens, lens) for p in range(start, start + n)]
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        batch = VarlenBatch.build(lens, prefix_lens, tables, self.device)
        ctx = ExtendAttention(pool, torch.tensor(slots, device=self.device), batch, self.backend, kv_sink)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=self.device)
        last = None if all_logits else torch.tensor(lens, device=self.device).cumsum(0) - 1
        return self.model(ids, torch.tensor(positions, device=self.device), ctx, logits_index=last)

    @torch.inference_mode()
    def mixed(self, pool: KVPool, chunks: list[list[int]], starts: list[int], block_tables: list[list[int]],
              num_decode: int, logits_rows: list[int]) -> torch.Tensor:
        """One forward over decode rows (the first `num_decode` chunks, one token each) and prefill chunks
        (engine/mixed.py). Row i appends chunks[i] at position starts[i]; returns the logits of the last
        token of each row in `logits_rows` [len(logits_rows), vocab] float32."""
        from engine.mixed import mixed_context

        lens = [len(c) for c in chunks]
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=self.device)
        positions = torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)], device=self.device)
        ends = torch.tensor(lens).cumsum(0) - 1
        ctx = mixed_context(pool, chunks, starts, block_tables, num_decode, self.backend, self.device)
        return self.model(ids, positions, ctx, logits_index=ends[logits_rows].to(self.device))

    @torch.inference_mode()
    def decode(self, pool: KVPool, tokens: torch.Tensor, positions: torch.Tensor,
               block_tables: torch.Tensor) -> torch.Tensor:
        """One step for B sequences: tokens/positions [B], block_tables [B, MB] -> logits [B, vocab]."""
        bs = pool.layout.block_size
        slots = block_tables.gather(1, (positions // bs)[:, None]).squeeze(1) * bs + positions % bs
        ctx = PagedDecodeAttention(pool, slots, block_tables, positions + 1, self.backend)
        return self.model(tokens, positions, ctx)


def kv_layout_for(arch: ModelArch, config: EngineConfig, num_blocks: int | None = None) -> KVLayout:
    """A pool layout for `arch`: each layer's KV heads, head dim and window travel with it (handshake)."""
    layers = tuple(LayerKV(arch.num_kv_heads, arch.head_dim, arch.layer(i).sliding_window)
                   for i in range(arch.num_layers))
    if all(spec == LayerKV(arch.num_kv_heads, arch.head_dim) for spec in layers):
        layers = ()  # plain full attention everywhere: the layout every peer before per-layer specs sent
    if num_blocks is not None:
        return KVLayout(arch.num_layers, num_blocks, config.block_size, arch.num_kv_heads, arch.head_dim,
                        config.dtype, config.kv_cache_dtype, layers)
    return KVLayout.for_budget(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                               block_size=config.block_size, dtype=config.dtype,
                               budget_bytes=int(config.kv_cache_gib * 2**30), kv_cache_dtype=config.kv_cache_dtype,
                               layers=layers)


def pool_writer(pool: KVPool, slot_lists: list[list[int]]) -> KVSink:
    """A KV sink that writes packed prefill K/V into a local pool (single-process use and tests)."""
    slots = torch.tensor([s for lst in slot_lists for s in lst], dtype=torch.long, device=pool.device)

    def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pool.write_tokens(layer, slots, k, v)  # quantized here for an int8 pool

    return sink


def token_slots(table: list[int], num_tokens: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(num_tokens)]


def model_fingerprint(folder: Path) -> str:
    """Identifies a checkpoint so two workers can check they run the same model."""
    import hashlib

    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]
