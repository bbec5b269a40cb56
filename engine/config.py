"""Frozen configuration shared by every engine user (workers, router, tests).

`ModelArch` is what the forward needs to know about a checkpoint; `EngineConfig`
is what a user chooses; `SamplingParams` travels with each request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Names only: the driver (configs, tokenizer, router, Ray) never imports torch (~1 s); `torch_dtype` maps a
# name to its torch dtype where the model runs.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# weights: int8, int4 group-wise; w8a8 = int8 weights and activations; gguf = the file's own blocks (engine.quant)
QUANTIZATIONS = ("none", "int8", "int4", "w8a8", "gguf")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # auto: see engine/cpu_features.auto_dtype, resolved where the worker runs

# Architectures our forward implements, by HF `model_type`; any other decoder-only model runs through
# transformers' own modules (engine/model/registry.py decides which path a checkpoint takes).
DENSE_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
MOE_ARCHS = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")  # engine/model/moe.py
SUPPORTED_ARCHS = DENSE_ARCHS + MOE_ARCHS


class ModelImpl(str, Enum):
    """Which forward runs a checkpoint (vLLM's --model-impl): ours, or transformers' modules with our
    paged KV cache (engine/model/generic.py). AUTO: native where we have it."""

    AUTO = "auto"
    NATIVE = "native"
    TRANSFORMERS = "transformers"

    @property
    def label(self) -> str:
        """How the start-up log names the path."""
        return "generic (transformers modules)" if self is ModelImpl.TRANSFORMERS else self.value


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
class MoEArch:
    """Routed experts of a mixture-of-experts checkpoint (engine/model/moe.py).

    Each token goes to `top_k` of `num_experts` SwiGLU experts, weighted by the softmax of the router's
    logits over all experts, taken at the top k and renormalized to sum 1 when `norm_topk_prob`.
    Layers not in `sparse_layers` keep a dense MLP of the arch's `intermediate_size`."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[int, ...]
    shared_expert_intermediate_size: int = 0  # 0: none; else one always-on expert behind a sigmoid gate
    fp32_route_weights: bool = False  # Mixtral scales expert outputs by float32 weights; the others cast first


@dataclass(frozen=True)
class ModelArch:
    """The shape of a Llama-family checkpoint, read from its HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 has q/k/v biases
    qk_norm: bool  # Qwen3 normalizes q and k per head before RoPE
    eos_token_ids: tuple[int, ...]
    qk_norm_whole: bool = False  # OLMoE normalizes the whole q and k projections (all heads at once)
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip] after the norms
    o_proj_bias: bool = False
    moe: MoEArch | None = None  # None: every layer's MLP is dense
    impl: ModelImpl = ModelImpl.NATIVE  # which forward runs it (engine/model/registry.py)

    @classmethod
    def from_hf(cls, config: Any, model_impl: ModelImpl | str = ModelImpl.AUTO) -> ModelArch:
        """Refuses what pdserve cannot serve (engine/model/registry.py, with the reason); an architecture
        without a native path is read as transformers' modules will run it."""
        from engine.model.registry import generic_arch, model_path

        if model_path(config, model_impl) is ModelImpl.TRANSFORMERS:
            return generic_arch(config)
        model_type = config.model_type
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", getattr(config, "qkv_bias", model_type == "qwen2"))),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            eos_token_ids=eos_ids,
            qk_norm_whole=model_type == "olmoe",
            clip_qkv=getattr(config, "clip_qkv", None),
            o_proj_bias=model_type == "olmoe" and bool(getattr(config, "attention_bias", False)),
            moe=moe_arch(config),
        )

    @property
    def kv_elements_per_token(self) -> int:
        """K and V values stored per token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def num_params(self, active: bool = False) -> int:
        """Every weight; with `active`, only those one token uses (its top-k experts, not all of them)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        mlp = [3 * h * i] * self.num_layers
        if self.moe is not None:
            m = self.moe
            experts = m.top_k if active else m.num_experts
            sparse = (experts * 3 * h * m.expert_intermediate_size + m.num_experts * h
                      + m.shared_expert_intermediate_size * 3 * h + (h if m.shared_expert_intermediate_size else 0))
            mlp = [sparse if layer in m.sparse_layers else dense for layer, dense in enumerate(mlp)]
        embed = self.vocab_size * h
        return self.num_layers * (attn + 2 * h) + sum(mlp) + embed + h + (0 if self.tie_word_embeddings else embed)


def moe_arch(config: Any) -> MoEArch | None:
    """The experts of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE config, None for a dense one."""
    model_type = config.model_type
    if model_type not in MOE_ARCHS:
        return None
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0)
    layers = range(config.num_hidden_layers)
    if model_type in ("qwen2_moe", "qwen3_moe"):  # dense layers: mlp_only_layers, or off the sparse step
        only, step = set(config.mlp_only_layers), config.decoder_sparse_step
        sparse = tuple(i for i in layers if i not in only and num_experts > 0 and (i + 1) % step == 0)
        size = config.moe_intermediate_size
    else:
        sparse, size = tuple(layers), config.intermediate_size
    return MoEArch(num_experts=num_experts, top_k=config.num_experts_per_tok, expert_intermediate_size=size,
                   norm_topk_prob=True if model_type == "mixtral" else bool(config.norm_topk_prob),
                   sparse_layers=sparse,
                   shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
                   fp32_route_weights=model_type == "mixtral")


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
    model_impl: str = "auto"  # auto (native where we have it) | native | transformers (vLLM's --model-impl)

    def __post_init__(self) -> None:
        if self.model_impl not in [m.value for m in ModelImpl]:
            raise ValueError(f"--model-impl must be one of {', '.join(m.value for m in ModelImpl)}, "
                             f"got {self.model_impl!r}")
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
