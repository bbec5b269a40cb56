"""Rotary position tables, with the checkpoint's RoPE scaling, one per RoPE key of the model.

The inverse frequencies come from transformers' own RoPE parameter functions, so linear / llama3 /
yarn / longrope scaling match the reference exactly. A model may hold several tables: Gemma 3's
local and global layers rotate with their own bases (`LayerSpec.rope` names the table). Types whose
frequencies change with the sequence are refused before we get here (engine/families.check_rope).
Partial rotary (Phi): a table covers the leading `rotary_dim` dims of a head; the rest pass through.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.families import STATIC_ROPE_TYPES, rope_parameters


def rope_inv_freq(hf_config: Any, key: str = "default", rotary_dim: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] float32, attention scaling) of RoPE table `key` of `hf_config`."""
    params = rope_parameters(hf_config, key)
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; pdserve supports {STATIC_ROPE_TYPES}")
    if rope_type == "default":
        dim = rotary_dim or getattr(hf_config, "head_dim", None) or \
            hf_config.hidden_size // hf_config.num_attention_heads
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {} if key == "default" else {"layer_type": key}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, **kwargs)  # longrope: its short factors
    return inv_freq.float(), float(scaling)


def rope_tables(hf_config: Any, max_positions: int, dtype: torch.dtype, key: str = "default",
                rotary_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_positions, rotary_dim] in `dtype`, computed in float32 as the reference does."""
    inv_freq, scaling = rope_inv_freq(hf_config, key, rotary_dim)
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, R] gathered at each token's position; the first R dims rotate (R <= D)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
