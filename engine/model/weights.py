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

Mixture-of-experts layers (engine/model/moe.py: SparseMoE under `mlp.`) stack their experts into one
tensor per projection, so those entries are loaders rather than names. The experts' block is
`block_sparse_moe.` in Mixtral's original checkpoints, `mlp.` otherwise; its experts come one tensor per
expert and projection (Mixtral w1/w3/w2, the others gate/up/down_proj) or already stacked (transformers'
fused gate_up_proj [E, 2I, H], down_proj [E, H, I]).

    mlp.router                {block}gate.weight
    mlp.experts.w13           per expert e: cat(gate_e, up_e)  -> [E, 2I, H]
    mlp.experts.w2            per expert e: down_e             -> [E, H, I]
    mlp.shared_*              mlp.shared_expert.{gate,up,down}_proj, mlp.shared_expert_gate (Qwen2-MoE)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Sources = tuple[str, ...]
Loader = Callable[[str, dict[str, torch.Tensor]], torch.Tensor]  # (layer prefix 'model.layers.3.', state) -> tensor
Entry = Sources | Loader

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



def _tensor(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state:
        raise KeyError(f"checkpoint lacks {name}")
    return state[name]


def _moe_block(layer: str, state: dict[str, torch.Tensor]) -> str:
    """The prefix of this layer's experts block: Mixtral's block_sparse_moe., or mlp."""
    for block in ("mlp.", "block_sparse_moe."):
        if layer + block + "gate.weight" in state:
            return layer + block
    raise KeyError(f"checkpoint lacks {layer}mlp.gate.weight (the router of a sparse layer)")


def _per_expert(block: str, state: dict[str, torch.Tensor], projection: int) -> list[torch.Tensor]:
    """Expert e's gate (0), up (1) or down (2) projection for every e, as the checkpoint names them."""
    names = ("w1", "w3", "w2") if block + "experts.0.w1.weight" in state else ("gate_proj", "up_proj", "down_proj")
    count = sum(1 for key in state if key.startswith(block + "experts.") and key.endswith(f".{names[0]}.weight"))
    return [_tensor(state, f"{block}experts.{e}.{names[projection]}.weight") for e in range(count)]


def _router(layer: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    return _tensor(state, _moe_block(layer, state) + "gate.weight")


def _experts_w13(layer: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    block = _moe_block(layer, state)
    if block + "experts.gate_up_proj" in state:
        return state[block + "experts.gate_up_proj"]
    return torch.stack([torch.cat([g, u]) for g, u in zip(_per_expert(block, state, 0), _per_expert(block, state, 1))])


def _experts_w2(layer: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    block = _moe_block(layer, state)
    if block + "experts.down_proj" in state:
        return state[block + "experts.down_proj"]
    return torch.stack(_per_expert(block, state, 2))


_MOE = {**_LLAMA,
        "o_proj.bias": ("self_attn.o_proj.bias",),
        "mlp.router": _router,
        "mlp.experts.w13": _experts_w13,
        "mlp.experts.w2": _experts_w2,
        "mlp.shared_gate_up.weight": ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
        "mlp.shared_down.weight": ("mlp.shared_expert.down_proj.weight",),
        "mlp.shared_gate": ("mlp.shared_expert_gate.weight",)}

LAYER: dict[str, dict[str, Entry]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma2": _GEMMA, "gemma3_text": _GEMMA, "phi3": _PHI3,
    "mixtral": _MOE, "qwen2_moe": _MOE, "qwen3_moe": _MOE, "olmoe": _MOE,
}


def entry(model_type: str, name: str) -> tuple[str, Entry]:
    """(the checkpoint prefix of our parameter `name`'s layer, where its tensors come from)."""
    if name in GLOBAL:
        return "", GLOBAL[name]
    head, i, suffix = name.split(".", 2)
    table = LAYER[model_type]
    if head != "layers" or suffix not in table:
        raise KeyError(f"no checkpoint name for parameter {name} of a {model_type} model")
    return f"model.layers.{i}.", table[suffix]


def gather(model_type: str, names: list[str], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each of our parameters `names` from the checkpoint `state` (fused ones concatenated, experts stacked)."""
    out = {}
    for name in names:
        prefix, source = entry(model_type, name)
        if callable(source):
            out[name] = source(prefix, state)
            continue
        parts = [_tensor(state, prefix + s) for s in source]
        out[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out
