"""Each native model_type's HF config read into a ModelArch: one `Family` per type, no torch.

The driver calls this before any worker starts (read_arch), so an architecture we do not run,
or a feature of one we do not run (a dynamic RoPE, bidirectional attention), is refused up front with
an error that names it. What differs between families is data here; the forward
(engine/model/llama.py) reads only the ModelArch.

    family       windows (layers)               norm          MLP     extras
    llama        none                           RMS           SwiGLU
    mistral      sliding_window: every layer    RMS           SwiGLU
    qwen2/qwen3  use_sliding_window: layer_types RMS          SwiGLU  q/k/v bias / q,k norm
    phi3         sliding_window: every layer    RMS           SwiGLU  fused checkpoint, partial rotary
    gemma2       layer_types (local/global)     (1 + w) RMS   GeGLU   sandwich norms, embed scale,
                                                                       softcaps, query_pre_attn_scalar
    gemma3_text  layer_types, a RoPE per type   (1 + w) RMS   GeGLU   as gemma2 + q/k norm
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from engine.arch import NATIVE_MODEL_TYPES, Activation, LayerSpec, ModelArch, Norm, UnsupportedArchitecture

# RoPE types whose frequencies are fixed at load (engine/model/rope.py builds them with transformers' own
# functions). dynamic NTK and a LongRoPE that switches factor sets with the sequence's length are not.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional", "longrope")
_ACTIVATIONS = {"silu": Activation.SILU, "swish": Activation.SILU, "gelu_pytorch_tanh": Activation.GELU_TANH}
_LAYER_TYPES = ("full_attention", "sliding_attention")


class Windows(Enum):
    """Where a family's `sliding_window` applies."""

    NONE = "none"  # never (Llama ignores the field)
    EVERY_LAYER = "every_layer"  # one mask for every layer (Mistral, Phi-3)
    LAYER_TYPES = "layer_types"  # the layers `layer_types` marks sliding_attention (Qwen2/3, Gemma 2/3)


@dataclass(frozen=True)
class Family:
    windows: Windows
    norm: Norm = Norm.RMS
    activation_field: str = "hidden_act"
    gemma: bool = False  # sandwich norms, embedding scale, query_pre_attn_scalar, softcaps
    qk_norm: bool = False
    rope_per_layer_type: bool = False  # rope_parameters keyed by layer type (Gemma 3)
    attn_softcap_field: str | None = None  # Gemma 3's attention never passes its softcap on


FAMILIES: dict[str, Family] = {
    "llama": Family(Windows.NONE),
    "mistral": Family(Windows.EVERY_LAYER),
    "qwen2": Family(Windows.LAYER_TYPES),
    "qwen3": Family(Windows.LAYER_TYPES, qk_norm=True),
    "phi3": Family(Windows.EVERY_LAYER),
    "gemma2": Family(Windows.LAYER_TYPES, Norm.RMS_UNIT_OFFSET, "hidden_activation", gemma=True,
                     attn_softcap_field="attn_logit_softcapping"),
    "gemma3_text": Family(Windows.LAYER_TYPES, Norm.RMS_UNIT_OFFSET, "hidden_activation", gemma=True,
                          qk_norm=True, rope_per_layer_type=True),
}
assert set(FAMILIES) == set(NATIVE_MODEL_TYPES), "engine/config.py NATIVE_MODEL_TYPES and FAMILIES disagree"

# Architectures whose state is not (only) a KV cache: named in the refusal, never sent to a generic path.
_NOT_KV = ("mamba", "mamba2", "rwkv", "recurrent_gemma", "jamba", "t5", "bart", "whisper", "falcon_mamba")


def read_arch(config: Any) -> ModelArch:
    model_type = config.model_type
    family = FAMILIES.get(model_type)
    if family is None:
        kind = " (its state is not a KV cache)" if model_type in _NOT_KV else ""
        raise UnsupportedArchitecture(f"unsupported architecture {model_type!r}{kind}; native: "
                                      f"{', '.join(NATIVE_MODEL_TYPES)}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{model_type} with use_bidirectional_attention (an embedding model) is not a decoder "
                         "pdserve can serve")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eos = config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    layers = layer_specs(config, family)
    rope = {spec.rope for spec in layers}
    check_rope(config, family, rope)
    return ModelArch(
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
        attention_bias=bool(getattr(config, "attention_bias", model_type == "qwen2")),
        qk_norm=family.qk_norm,
        eos_token_ids=eos_ids,
        layers=layers,
        norm=family.norm,
        activation=_activation(config, family),
        sandwich_norms=family.gemma,
        embed_scale=config.hidden_size ** 0.5 if family.gemma else None,
        query_scale=config.query_pre_attn_scalar ** -0.5 if family.gemma else None,
        attn_softcap=getattr(config, family.attn_softcap_field, None) if family.attn_softcap_field else None,
        final_softcap=getattr(config, "final_logit_softcapping", None) if family.gemma else None,
        rotary_dim=int(head_dim * _partial_rotary_factor(config, family)),
    )


def layer_specs(config: Any, family: Family) -> tuple[LayerSpec, ...]:
    """Each layer's window and RoPE table, as transformers builds that model's masks."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) if family.windows != Windows.NONE else None
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        window = None  # their configs carry a sliding_window that only use_sliding_window turns on
    types = getattr(config, "layer_types", None) or _default_layer_types(config, family, window)
    unknown = sorted(set(types) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(f"{config.model_type}: layer types {unknown} are not run natively "
                         f"(pdserve runs {', '.join(_LAYER_TYPES)})")
    if len(types) != n:
        raise ValueError(f"{config.model_type}: {len(types)} layer_types for {n} layers")
    specs = []
    for t in types:
        sliding = window is not None and (family.windows == Windows.EVERY_LAYER or t == "sliding_attention")
        specs.append(LayerSpec(sliding_window=int(window) if sliding else None,
                               rope=t if family.rope_per_layer_type else "default"))
    return tuple(specs)


def _default_layer_types(config: Any, family: Family, window: int | None) -> list[str]:
    """transformers' own fill-in when a config.json has no layer_types (read without transformers)."""
    n = config.num_hidden_layers
    if config.model_type in ("qwen2", "qwen3"):
        first = getattr(config, "max_window_layers", n)
        return ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    if family.gemma:
        pattern = getattr(config, "sliding_window_pattern", 2 if config.model_type == "gemma2" else 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    return ["full_attention"] * n


def _activation(config: Any, family: Family) -> Activation:
    name = getattr(config, family.activation_field, None) or "silu"
    if name not in _ACTIVATIONS:
        raise ValueError(f"{config.model_type}: MLP activation {name!r} is not run natively "
                         f"(pdserve runs {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def rope_parameters(config: Any, key: str) -> dict[str, Any]:
    """The RoPE parameters of table `key` ('default', or a layer type where they are kept per type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if key != "default":
        params = params.get(key) or {}
    return params


def _partial_rotary_factor(config: Any, family: Family) -> float:
    params = rope_parameters(config, "full_attention" if family.rope_per_layer_type else "default")
    return float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))


def check_rope(config: Any, family: Family, keys: set[str]) -> None:
    """Refuse, naming it, a RoPE whose frequencies change with the sequence; accept LongRoPE only where
    one factor set applies to every position the config allows."""
    for key in sorted(keys):
        params = rope_parameters(config, key)
        rope_type = params.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"{config.model_type}: RoPE type {rope_type!r} changes with the sequence length and "
                             f"is not supported; pdserve runs {', '.join(STATIC_ROPE_TYPES)}")
        if rope_type == "longrope" and longrope_switches(config, params):
            original = (params.get("original_max_position_embeddings")
                        or getattr(config, "original_max_position_embeddings", None))
            raise ValueError(
                f"{config.model_type}: RoPE type 'longrope' switches from its short to its long factors once a "
                f"sequence passes {original} positions (max_position_embeddings {config.max_position_embeddings}),"
                f" which a cached prefix cannot follow; set max_position_embeddings to {original} in config.json to "
                "serve it with its short factors")


def longrope_switches(config: Any, params: dict[str, Any]) -> bool:
    """True when a LongRoPE config would use both factor sets (transformers picks by the sequence's length)."""
    original = (params.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    return (config.max_position_embeddings > original
            and list(params.get("long_factor") or []) != list(params.get("short_factor") or []))
