"""Frozen configuration shared by every engine user (workers, router, tests).

`ModelArch` is what the forward needs to know about a checkpoint; `EngineConfig`
is what a user chooses; `SamplingParams` travels with each request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.arch import (  # noqa: F401  re-exported: the model's shape is part of the engine's config
    NATIVE_MODEL_TYPES,
    Activation,
    LayerSpec,
    ModelArch,
    Norm,
    UnsupportedArchitecture,
)

if TYPE_CHECKING:
    import torch

# Names only: the driver (configs, tokenizer, router, Ray) never imports torch (~1 s); `torch_dtype` maps a
# name to its torch dtype where the model runs.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# weights: int8, int4 group-wise; w8a8 = int8 weights and activations; gguf = the file's own blocks (engine.quant)
QUANTIZATIONS = ("none", "int8", "int4", "w8a8", "gguf")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # auto: see engine/cpu_features.auto_dtype, resolved where the worker runs

def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` (one of DTYPE_NAMES); imports torch, which configs alone do not need."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def default_cache_dir() -> Path:
    """Where converted weights live; PDSERVE_CACHE overrides."""
    env = os.environ.get("PDSERVE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EngineConfig:
    """What a user picks for model execution; identical on prefill and decode workers."""

    model: str | None = None  # None: the default SmolLM2-135M-Instruct GGUF
    dtype: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16), else fp32
    device: str = "auto"  # auto: CUDA when the worker's process sees a GPU, else CPU
    block_size: int = 16
    kv_cache_gib: float = 2.0  # decode worker's KV pool
    kv_cache_dtype: str = "auto"  # auto: the model's dtype | int8: per-token-per-head scaled (engine/kv_quant.py)
    max_num_seqs: int = 128  # decode batch limit
    max_prefill_tokens: int = 2048  # prefill batch token budget
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's choice
    attention_backend: str = "auto"  # auto (CUDA: triton, CPU: cpu) | torch | cpu (native kernel) | triton
    enforce_eager: bool = False  # CUDA: no decode graphs (vLLM's --enforce-eager)
    enable_prefix_caching: bool = True  # share cached prompt blocks (decode pool, prefill cache, routing)
    prefill_cache_gib: float = 0.5  # each prefill worker's own KV pool, kept as a prefix cache
    speculative: str = "off"  # decode worker's drafter: off | ngram | layers:K | model:PATH (engine/specdec)
    num_speculative_tokens: int | str = "auto"  # γ, or auto: chosen each step from measured costs
    cache_dir: str = field(default_factory=lambda: str(default_cache_dir()))
    quantization: str = "none"  # none | int8 | int4 | w8a8 (int8 activations too) | gguf (the GGUF's own blocks)
    quant_group_size: int = 0  # inputs per scale; 0: int8 one per output channel, int4 32
    quantize_lm_head: bool = False  # also quantize the LM head (the embedding stays float)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_gib <= 0 or self.max_num_seqs <= 0 or self.max_prefill_tokens <= 0:
            raise ValueError("kv_cache_gib, max_num_seqs and max_prefill_tokens must be positive")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"--kv-cache-dtype must be one of auto, int8, got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quant_group_size < 0 or (self.quantization == "int4" and self.quant_group_size % 2):
            raise ValueError(f"quant_group_size must be 0 (default) or positive (even for int4), "
                             f"got {self.quant_group_size}")
        spec, n = self.speculative, self.num_speculative_tokens
        if spec not in ("off", "ngram") and not (spec.startswith("layers:") and spec[7:].isdigit()) \
                and not (spec.startswith("model:") and spec[6:]):
            raise ValueError(f"--speculative must be off, ngram, layers:K or model:PATH, got {spec!r}")
        if n != "auto" and not (isinstance(n, int) and n > 0):
            raise ValueError(f"--num-speculative-tokens must be a positive integer or auto, got {n!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ValueError("dtype 'auto' depends on the worker's device and CPU: use config.resolved()")
        return torch_dtype(self.dtype)

    def resolved(self) -> EngineConfig:
        """This config with `auto` device and dtype resolved where it runs (a worker may have a GPU, or a CPU
        with native bf16, that the driver lacks)."""
        from dataclasses import replace

        from engine.cpu_features import auto_dtype, cpu_flags

        device = default_device() if self.device == "auto" else self.device
        dtype = auto_dtype(device, cpu_flags()) if self.dtype == "auto" else self.dtype
        return self if (device, dtype) == (self.device, self.dtype) else replace(self, device=device, dtype=dtype)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding rules. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def default_batched_tokens(device: str, max_num_seqs: int) -> int:
    """A colocated step's token budget when --max-num-batched-tokens is 0 (auto). vLLM's chunked-prefill
    budget is 2048 on a GPU; on a CPU a 512-token step keeps a decode step (all running rows ride along)
    within a few hundred ms for SmolLM2-135M on two cores. At least max_num_seqs: every running row
    needs its decode token in each step."""
    return max(2048 if device == "cuda" else 512, max_num_seqs)
