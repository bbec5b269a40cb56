"""Checkpoint tensor names per family, in one table: our parameter -> the HF tensors it is made of.

Several sources are concatenated along dim 0 (our fused q/k/v and gate/up projections); Phi-3's
checkpoint is already fused. A parameter the model does not have (a bias, a q/k norm) is never
looked up, so one table serves every variant of a family.

    ours (layers.{i}.X)       Llama/Mistral/Qwen             Gemma 2/3                   Phi-3
    qkv_proj                  self_attn.{q,k,v}_proj         same                        self_attn.qkv_proj
    input_norm                input_layernorm                input_layernorm             input_layernorm
    attn_out_norm             -                              post_attention_layernorm    -
    mlp_norm                  post_attention_layernorm       pre_feedforward_layernorm   post_attention_layernorm
    mlp_out_norm              -                              post_feedforward_layernorm  -
    mlp.gate_up_proj          mlp.{gate,up}_proj             same                        mlp.gate_up_proj
"""

from __future__ import annotations

import torch

Sources = tuple[str, ...]

GLOBAL: dict[str, Sources] = {
    "embed.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}

_LLAMA: dict[str, Sources] = {
    "qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "o_proj.weight": ("self_attn.o_proj.weight",),
    "q_norm.weight": ("self_attn.q_norm.weight",),
    "k_norm.weight": ("self_attn.k_norm.weight",),
    "input_norm.weight": ("input_layernorm.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down_proj.weight": ("mlp.down_proj.weight",),
}
_GEMMA = {**_LLAMA,
          "attn_out_norm.weight": ("post_attention_layernorm.weight",),
          "mlp_norm.weight": ("pre_feedforward_layernorm.weight",),
          "mlp_out_norm.weight": ("post_feedforward_layernorm.weight",)}
_PHI3 = {**_LLAMA,
         "qkv_proj.weight": ("self_attn.qkv_proj.weight",),
         "mlp.gate_up_proj.weight": ("mlp.gate_up_proj.weight",)}

LAYER: dict[str, dict[str, Sources]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma2": _GEMMA, "gemma3_text": _GEMMA, "phi3": _PHI3,
}


def sources(model_type: str, name: str) -> Sources:
    """The checkpoint tensors our parameter `name` is made of."""
    if name in GLOBAL:
        return GLOBAL[name]
    head, i, suffix = name.split(".", 2)
    table = LAYER[model_type]
    if head != "layers" or suffix not in table:
        raise KeyError(f"no checkpoint name for parameter {name} of a {model_type} model")
    return tuple(f"model.layers.{i}.{s}" for s in table[suffix])


def gather(model_type: str, names: list[str], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each of our parameters `names` from the checkpoint `state` (fused ones concatenated)."""
    out = {}
    for name in names:
        parts = []
        for src in sources(model_type, name):
            if src not in state:
                raise KeyError(f"checkpoint lacks {src}")
            parts.append(state[src])
        out[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out
