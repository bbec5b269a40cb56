"""Which forward runs a checkpoint: ours (native), transformers' modules (generic), or none (refused).

    native    our forward (engine/model/llama.py, moe.py): the model types in NATIVE_MODEL_TYPES
    generic   any other decoder-only model that AutoModelForCausalLM loads, run by transformers' own
              modules with pdserve's paged KV cache behind their attention interface (generic.py)
    refused   models whose state is not a KV cache (encoder-decoder, recurrent, state-space, hybrid
              layers), and decoder-only models whose modules take no pluggable attention function

This is the one place that decides. The driver asks it through engine.families.read_arch before any
worker starts, and every worker again when it loads, so a refused model stops at start with one message.
Torch-free: the driver reads configs without importing torch (transformers only for generic ones).
"""

from __future__ import annotations

from typing import Any

from engine.arch import NATIVE_MODEL_TYPES, ModelArch, ModelImpl, UnsupportedArchitecture

# Model types whose per-sequence state is not (only) a KV cache, and what it is instead. Configs that
# declare their layers (`layer_types`) are also checked layer by layer (`_stateful_layers`).
STATEFUL_MODEL_TYPES = {
    "mamba": "a state-space (Mamba) state", "mamba2": "a state-space (Mamba-2) state",
    "falcon_mamba": "a state-space (Mamba) state", "rwkv": "a recurrent (RWKV) state",
    "xlstm": "a recurrent (xLSTM) state", "recurrent_gemma": "a recurrent (Griffin) state",
    "jamba": "Mamba layers' state", "bamba": "Mamba layers' state", "zamba": "Mamba layers' state",
    "zamba2": "Mamba layers' state", "falcon_h1": "Mamba layers' state", "nemotron_h": "Mamba layers' state",
    "granitemoehybrid": "Mamba layers' state", "lfm2": "convolution layers' state",
    "lfm2_moe": "convolution layers' state", "qwen3_next": "linear-attention layers' state",
    "kimi_linear": "linear-attention layers' state", "minimax": "linear-attention layers' state",
    "reformer": "a chunked (LSH) attention state", "xlnet": "a two-stream memory",
}
KV_LAYER_TYPES = ("full_attention", "sliding_attention")
# Layer types whose attention reads a KV cache in a pattern our kernels do not compute (chunks, indexers...).
PATTERNED_ATTENTION = ("chunked_attention", "window_attention", "indexed_attention", "compressed_sparse_attention",
                       "heavily_compressed_attention", "minimax_m3_sparse", "reference_sliding_attention")


def model_path(config: Any, model_impl: ModelImpl | str = ModelImpl.AUTO) -> ModelImpl:
    """NATIVE or TRANSFORMERS for `config` under --model-impl; raises UnsupportedArchitecture."""
    impl = ModelImpl(model_impl)
    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type in NATIVE_MODEL_TYPES and impl is not ModelImpl.TRANSFORMERS:
        return ModelImpl.NATIVE
    if impl is ModelImpl.NATIVE:
        raise UnsupportedArchitecture(f"architecture {model_type!r} has no native path in pdserve (native: "
                                      f"{', '.join(NATIVE_MODEL_TYPES)}); use --model-impl auto or transformers")
    why = refusal(config)
    if why:
        raise UnsupportedArchitecture(f"architecture {model_type!r} cannot be served: {why}")
    return ModelImpl.TRANSFORMERS


def refusal(config: Any) -> str | None:
    """Why transformers' modules cannot run `config` over pdserve's paged KV cache, or None."""
    model_type = getattr(config, "model_type", None) or "unknown"
    if getattr(config, "is_encoder_decoder", False):
        return ("it is an encoder-decoder model (its decoder also attends to an encoder's output); "
                "pdserve serves decoder-only models")
    if model_type in STATEFUL_MODEL_TYPES:
        return f"it keeps {STATEFUL_MODEL_TYPES[model_type]}, not a KV cache"
    layers = _stateful_layers(config)
    if layers:
        kinds, which = sorted({t for _, t in layers}), [i for i, _ in layers][:8]
        if set(kinds) <= set(PATTERNED_ATTENTION):
            return f"layers {which} attend in patterns ({', '.join(kinds)}) pdserve does not compute"
        return f"layers {which} are of types {', '.join(kinds)}, whose state is not a KV cache"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if cls_name is None:
        return "transformers' AutoModelForCausalLM does not load it"
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None or not getattr(cls, "_supports_attention_backend", False):
        return (f"transformers' {cls_name} takes no pluggable attention function (its modules call their own "
                "attention), so pdserve's paged KV cache cannot be plugged in")
    return None


def _stateful_layers(config: Any) -> list[tuple[int, str]]:
    types = getattr(config, "layer_types", None) or ()
    return [(i, t) for i, t in enumerate(types) if t not in KV_LAYER_TYPES]


def generic_arch(config: Any) -> ModelArch:
    """What the engine needs of a model run by transformers' modules. The KV shape read here is
    provisional: the loader measures it from the modules' own attention calls (generic.py)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = getattr(config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return ModelArch(
        model_type=config.model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        rms_norm_eps=float(getattr(config, "rms_norm_eps", 0.0) or 0.0),
        max_position_embeddings=max_positions(config),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=False, qk_norm=False, eos_token_ids=eos_ids, impl=ModelImpl.TRANSFORMERS)


def max_positions(config: Any) -> int:
    """The longest context the checkpoint was made for, under the names configs use for it."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedArchitecture(f"architecture {config.model_type!r}: its config names no maximum context "
                                  "(max_position_embeddings or the like)")
