"""Rotary position tables, with the checkpoint's RoPE scaling.

The inverse frequencies come from transformers' own RoPE parameter functions,
so linear / llama3 / yarn scaling match the reference exactly. Types whose
frequencies change with the sequence (dynamic NTK, longrope) are refused.
"""

from __future__ import annotations

from typing import Any

import torch

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_inv_freq(hf_config: Any) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scaling) for `hf_config`."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; pdserve supports {STATIC_ROPE_TYPES}")
    if rope_type == "default":
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
    return inv_freq.float(), float(scaling)


def rope_tables(hf_config: Any, max_positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_positions, head_dim] in `dtype`, computed in float32 as the reference does."""
    inv_freq, scaling = rope_inv_freq(hf_config)
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D] gathered at each token's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
