"""A compiled decode step on the CPU: the whole forward of a step in C++, no Python between its ops.

The counterpart of the CUDA graphs (engine/cuda_graphs.py). An eager step of SmolLM2-135M is ~30 layers x
~25 Python-dispatched ops; here it is one call into engine/kernels/cpu_kernels.cpp, which runs the
CPU backend's own fused kernels (engine/model/ops.py CPU_OPS, its paged attention) in the eager order, with
the GEMMs on weights prepacked once for oneDNN (bf16). So the compiled step equals the eager one: bit for
bit in float32 (the same at::linear), and in bf16 up to oneDNN's prepacked GEMM against at::linear.

Two candidates were measured for this (README, `pdserve bench step --inductor`): inductor (torch.compile,
freezing, the paged attention as a custom op: engine/inductor_step.py) and this native step. The native
step won: it compiles nothing per model, so a warm start is the kernel import and the weight packing, and
it takes any batch size (no buckets, no padding rows); inductor took ~70 s per batch-size bucket on this
machine's cores and is not bitwise equal to the eager step (its own reductions and fusions).

What is compiled and cached on disk is the kernel module (engine/kernels: keyed by the CPU's ISA flags,
torch, Python and the source), shared by every model and dtype; what depends on the model -- the packed
weights -- is rebuilt at start (a fraction of a second) rather than cached.

Per layer it runs the arch's attention spec exactly: sliding windows (keys p - W < j <= p; blocks before the
window are never read, their table entries may be -1), a query scale, an attention-logit softcap, the
layer's own RoPE table (Gemma 3's local/global bases), q/k norms and q/k/v biases.

Refused, with one log line, the step then runs eagerly: --enforce-eager, a device other than the CPU, an
attention backend other than the native one, quantized weights (their matmuls are Python-side kernels),
a machine where the kernels cannot be built, and what the C++ step does not implement (`arch_refusal`):
Gemma's (1 + w) norms, sandwich norms, embedding scale, GeGLU and final-logit softcap, partial rotary
(Phi), layers whose KV shapes differ, and MLPs other than the dense gated one (MoE).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.kv_cache import KVPool

log = logging.getLogger("pdserve.compiled_step")


@dataclass(frozen=True)
class CompileReport:
    """What the worker's start-up log says about its decode step."""

    dtype: str
    packed_gemms: bool  # oneDNN prepacked bf16 weights (else at::linear: float32, or no oneDNN bf16 here)
    kernel_cached: bool  # the kernel module was on disk already (a warm start)
    kernel_s: float  # seconds to import (warm) or build (cold) the kernel module
    pack_s: float  # seconds to pack the weights

    def describe(self) -> str:
        source = "cache hit" if self.kernel_cached else "cache miss, built"
        gemms = "oneDNN-prepacked weights" if self.packed_gemms else "at::linear"
        return (f"compiled decode step (native C++, {self.dtype}, {gemms}): kernels {source} in {self.kernel_s:.1f} s, "
                f"weights packed in {self.pack_s:.2f} s")


def refusal(runner) -> str | None:
    """Why the decode step of `runner` (an engine.runner.ModelRunner) cannot be compiled; None if it can."""
    from engine.config import ModelImpl
    from engine.kernels import cpu_kernels
    from engine.quant import QuantLinear

    config = runner.config
    if config.enforce_eager:
        return "--enforce-eager"
    if getattr(runner, "tp", None) is not None and runner.tp.size > 1:
        return f"tensor parallel size {runner.tp.size} (the C++ step runs a whole model; ranks run eagerly)"
    if runner.arch.impl is ModelImpl.TRANSFORMERS:
        return "the generic (transformers) path: its modules run eagerly"
    if runner.device.type != "cpu":
        return f"the compiled step is the CPU's ({runner.device.type} uses CUDA graphs)"
    if cpu_kernels() is None:
        return "the native kernels cannot be built here (no C++ compiler?)"
    if runner.backend.name != "cpu":
        return f"attention backend {runner.backend.name!r} (the compiled step runs the native cpu backend's kernels)"
    if any(isinstance(m, QuantLinear) for m in runner.model.modules()):
        return f"--quantization {config.quantization} (quantized matmuls run as Python-side kernels)"
    if runner.model.embed.weight.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {config.dtype} (the native kernels run float32 and bfloat16)"
    return arch_refusal(runner.model)


def arch_refusal(model) -> str | None:
    """What of `model`'s architecture the C++ step does not implement (None: it runs the model exactly)."""
    from engine.config import Activation, Norm
    from engine.model.mlp import GatedMLP

    arch = model.arch
    name = f"{arch.model_type}:"
    if arch.norm != Norm.RMS:
        return f"{name} {arch.norm.value} norms (the native norm scales by w, not 1 + w)"
    if arch.sandwich_norms or arch.embed_scale is not None or arch.final_softcap is not None:
        return f"{name} sandwich norms, embedding scale or final-logit softcap (Gemma)"
    if arch.activation != Activation.SILU:
        return f"{name} {arch.activation.value} MLP (the native step runs SwiGLU)"
    if arch.rotary_dim and arch.rotary_dim != arch.head_dim:
        return f"{name} partial rotary ({arch.rotary_dim} of {arch.head_dim} dims)"
    if not all(type(layer.mlp) is GatedMLP for layer in model.layers):
        return f"{name} an MLP other than the dense gated one"
    return None


def compile_decode_step(runner) -> CompiledDecodeStep | None:
    """The compiled step for `runner`'s model, or None (and one log line saying why) to run eagerly."""
    from engine.kernels import cpu_kernels, cpu_kernels_cached

    cached = cpu_kernels_cached()
    started = time.perf_counter()
    reason = refusal(runner)  # imports the kernel module, or builds it on a cold start
    kernel_s = time.perf_counter() - started
    if reason is not None:
        log.info("decode step runs eagerly: %s", reason)
        return None
    module = cpu_kernels()
    started = time.perf_counter()
    packed = runner.model.embed.weight.dtype == torch.bfloat16 and _onednn_bf16()
    step = _build(module, runner.model, packed, runner.config.max_num_seqs)
    report = CompileReport(runner.config.dtype, packed, cached, kernel_s, time.perf_counter() - started)
    log.info("%s", report.describe())
    return CompiledDecodeStep(step, report)


def _onednn_bf16() -> bool:
    """oneDNN runs bf16 matmuls natively here (AVX512-BF16/AMX; else prepacking would emulate them)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.inference_mode()
def _build(module, model, packed: bool, batch_hint: int):
    """The C++ DecodeStep over `model`'s weights (views; packed copies of the GEMM weights when `packed`)."""

    def weight(linear: torch.nn.Linear) -> torch.Tensor:
        w = linear.weight.detach()
        return torch.ops.mkldnn._reorder_linear_weight(w, batch_hint) if packed else w

    arch = model.arch
    step = module.DecodeStep(model.embed.weight.detach(), model.norm.weight.detach(), weight(model.lm_head), packed,
                             arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps)
    for layer in model.layers:
        bias, spec = layer.qkv_proj.bias, layer.attention
        cos, sin = model.rope[layer.rope_key]
        step.add_layer(layer.input_norm.weight.detach(), layer.mlp_norm.weight.detach(),
                       None if layer.q_norm is None else layer.q_norm.weight.detach(),
                       None if layer.k_norm is None else layer.k_norm.weight.detach(),
                       weight(layer.qkv_proj), None if bias is None else bias.detach(), weight(layer.o_proj),
                       weight(layer.mlp.gate_up_proj), weight(layer.mlp.down_proj), packed,
                       spec.scale, spec.window or 0, spec.softcap or 0.0, cos, sin)
    return step


class CompiledDecodeStep:
    """Runs a decode step of any number of rows; the batcher calls it where CUDA would replay a graph."""

    def __init__(self, step, report: CompileReport) -> None:
        self._step, self.report = step, report

    def covers(self, n: int) -> bool:
        return n >= 1

    def run(self, pool: KVPool, tokens: torch.Tensor, positions: torch.Tensor,
            block_tables: torch.Tensor) -> torch.Tensor:
        """tokens/positions [n], block_tables [n, W] -> logits [n, vocab] float32; writes the rows' K/V."""
        if pool.tensor is None:
            raise ValueError("the compiled step needs a uniform KV layout (one [L, 2, NB, BS, KVH, D] pool)")
        return self._step.forward(tokens, positions, block_tables, pool.tensor, pool.scales)

    def set_profiling(self, on: bool) -> None:
        """Time each op of the following steps (off: nothing is timed); the sums restart from zero."""
        self._step.set_profiling(on)

    def op_times(self) -> tuple[int, dict[str, tuple[float, float]]]:
        """(profiled steps, {op: (wall s, calling-thread CPU s)} summed over them). At one torch thread the CPU
        time is the op's own work, whatever else the machine runs."""
        times = dict(self._step.op_times())
        steps = int(times.pop("steps"))
        return steps, {name: (float(wall), float(cpu)) for name, (wall, cpu) in times.items()}

    def run_rows(self, pool: KVPool, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """As `run`, from host lists (a colocated worker's decode-only step); tables of any lengths."""
        width = max(len(t) for t in tables)
        padded = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        return self.run(pool, torch.tensor(tokens), torch.tensor(positions), padded)
