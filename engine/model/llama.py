"""A compact Llama-family decoder: Llama, Mistral, SmolLM2, Qwen2 (qkv bias), Qwen3 (q/k norm).

Tokens of all sequences in a batch are packed along one axis (no padding):
every projection runs on [T, hidden]. Attention is delegated to an
`AttentionContext` that knows whether this is a packed prefill or a paged
decode step and where the KV goes; the model itself holds no cache.

q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from engine.config import ModelArch
from engine.model.ops import TORCH_OPS, ModelOps, Rotary
from engine.model.rope import rope_tables


class AttentionContext(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] (RoPE applied) -> [T, H, D]."""
        ...


class RMSNorm(nn.Module):
    """Holds the weight; the arithmetic is the model's ops (torch, or a fused Triton kernel on CUDA)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps, residual)[0]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); with no residual yet, (norm(x), x)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, index: int) -> None:
        super().__init__()
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.input_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.qkv_proj = nn.Linear(arch.hidden_size, q_size + 2 * kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.post_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.ops = TORCH_OPS
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rotary: Rotary,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        # x: the previous layer's output [T, hidden]; residual: the stream before it (None at layer 0).
        # Returns (this layer's MLP output, the residual stream before it): the add is fused into the next norm.
        t = x.shape[0]
        h, residual = self.input_norm.add_norm(x, residual)
        q, k, v = self.qkv_proj(h).split(self.split, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # per head: rows of head_dim
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = self.ops.rope(q, k, rotary)
        attn = ctx.attend(self.index, q, k, v)  # [T, H, D]
        h, residual = self.post_norm.add_norm(self.o_proj(attn.reshape(t, -1)), residual)
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(h))), residual


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch, hf_config: Any) -> None:
        super().__init__()
        self.arch = arch
        # No random init: the weights are loaded next, and normal_ on the meta device (load_model) pulls
        # in torch._dynamo, 4-9 s of a worker's start-up here.
        self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size,
                                  _weight=torch.empty(arch.vocab_size, arch.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.hf_config = hf_config

    def use_ops(self, ops: ModelOps) -> None:
        """Set the elementwise ops of every layer (at load, once the device is known)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, DecoderLayer)):
                module.ops = ops

    def init_rope(self, dtype: torch.dtype) -> None:
        """(Re)build the RoPE tables on the model's device; call after moving the model."""
        cos, sin = rope_tables(self.hf_config, self.arch.max_position_embeddings, dtype)
        device = self.embed.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        ctx: AttentionContext,
        logits_index: torch.Tensor | None = None,  # [N] rows of T that need logits; None: all
        num_layers: int | None = None,  # run only the first layers (self-speculative drafts); None: all
    ) -> torch.Tensor:  # [N, vocab] float32
        x = self.embed(input_ids)
        rotary = Rotary(self.rope_cos, self.rope_sin, positions)
        residual = None
        for layer in self.layers[:num_layers]:
            x, residual = layer(x, residual, rotary, ctx)
        if logits_index is not None:
            x, residual = x[logits_index], residual[logits_index]
        return self.lm_head(self.norm(x, residual)).float()

    def load_hf_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Take an HF Llama/Qwen state dict's tensors as this model's parameters, fusing q/k/v and gate/up.

        The model may be on the meta device: tensors are assigned, not copied into preallocated ones
        (in the parameters' dtype, so as a copy would convert them). Unfused weights of a float32
        checkpoint stay views of the file's mapping, shared with other workers through the page cache;
        copying 538 MB into fresh pages took 2-6 s of a worker's start here."""
        own = self.state_dict()
        loaded: dict[str, torch.Tensor] = {}

        def put(name: str, tensor: torch.Tensor) -> None:
            target = own[name]
            if target.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
            loaded[name] = tensor.to(target.dtype)

        def get(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"checkpoint lacks {name}")
            return state[name]

        put("embed.weight", get("model.embed_tokens.weight"))
        put("norm.weight", get("model.norm.weight"))
        if not self.arch.tie_word_embeddings:
            put("lm_head.weight", get("lm_head.weight"))
        for i in range(self.arch.num_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            attn = src + "self_attn."
            put(dst + "qkv_proj.weight", torch.cat([get(attn + f"{p}_proj.weight") for p in "qkv"]))
            if self.arch.attention_bias:
                put(dst + "qkv_proj.bias", torch.cat([get(attn + f"{p}_proj.bias") for p in "qkv"]))
            put(dst + "o_proj.weight", get(attn + "o_proj.weight"))
            if self.arch.qk_norm:
                put(dst + "q_norm.weight", get(attn + "q_norm.weight"))
                put(dst + "k_norm.weight", get(attn + "k_norm.weight"))
            put(dst + "input_norm.weight", get(src + "input_layernorm.weight"))
            put(dst + "post_norm.weight", get(src + "post_attention_layernorm.weight"))
            mlp = src + "mlp."
            put(dst + "gate_up_proj.weight", torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]))
            put(dst + "down_proj.weight", get(mlp + "down_proj.weight"))
        missing = set(own) - set(loaded) - ({"lm_head.weight"} if self.arch.tie_word_embeddings else set())
        if missing:
            raise KeyError(f"weights not loaded: {sorted(missing)[:5]}")
        self.load_state_dict(loaded, strict=False, assign=True)
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        if self.rope_cos.is_meta:  # non-persistent buffers: init_rope fills them after the model moved
            self.rope_cos, self.rope_sin = torch.empty(0), torch.empty(0)
