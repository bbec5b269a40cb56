"""The decoder: Llama, Mistral, SmolLM2, Qwen2/3, Phi-3/4, Gemma 2/3 and the mixture-of-experts ones
(Mixtral, Qwen2/3-MoE, OLMoE), as one layer shape read from ModelArch.

Tokens of all sequences in a batch are packed along one axis (no padding): every projection runs
on [T, hidden]. Attention is delegated to an `AttentionContext` that knows whether this is a
packed prefill or a paged decode step and where the KV goes; the model itself holds no cache.
What differs between families is data (engine/families.py), not branches here:

    x ──(+ residual)──> input_norm ─> qkv ─> [q/k norm] ─> RoPE[layer's table] ─> attend(layer spec)
      ─> o_proj ─> [attn_out_norm] ──(+ residual)──> mlp_norm ─> mlp ─> [mlp_out_norm] ─> next layer

    [..]: only where the arch has it (Gemma: sandwich norms; Qwen3/Gemma 3: q/k norm; OLMoE: q/k norm
    over the whole projection, then clip_qkv). The layer spec carries the attention's window, scale and
    logit softcap; `mlp` is built by engine/model/mlp.py (dense, or the experts of engine/model/moe.py).

q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from engine.attention.base import AttentionSpec
from engine.config import ModelArch, Norm
from engine.model.mlp import GatedMLP, build_mlp
from engine.model.ops import TORCH_OPS, ModelOps, Rotary
from engine.model.rope import rope_tables
from engine.model.weights import gather


class AttentionContext(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               spec: AttentionSpec) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] (RoPE applied) -> [T, H, D], as layer `layer`'s spec says."""
        ...


class RMSNorm(nn.Module):
    """Holds the weight; the arithmetic is the model's ops (torch, or a fused Triton kernel on CUDA).
    `unit_offset`: Gemma's (1 + weight) in float32."""

    def __init__(self, dim: int, eps: float, norm: Norm = Norm.RMS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = norm == Norm.RMS_UNIT_OFFSET
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps, residual, self.unit_offset)[0]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); with no residual yet, (norm(x), x)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual, self.unit_offset)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, index: int) -> None:
        super().__init__()
        self.index = index
        spec = arch.layer(index)
        self.attention = AttentionSpec(arch.scale, spec.sliding_window, arch.attn_softcap)
        self.rope_key = spec.rope
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self.split = (q_size, kv_size, kv_size)

        def norm(dim: int) -> RMSNorm:
            return RMSNorm(dim, arch.rms_norm_eps, arch.norm)

        self.input_norm = norm(arch.hidden_size)
        self.qkv_proj = nn.Linear(arch.hidden_size, q_size + 2 * kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=arch.o_proj_bias)
        # q/k norm per head (Qwen3, Gemma 3: rows of head_dim) or over the whole projection (OLMoE)
        self.qk_norm_whole, self.clip_qkv = arch.qk_norm_whole, arch.clip_qkv
        norm_q, norm_k = (q_size, kv_size) if arch.qk_norm_whole else (arch.head_dim, arch.head_dim)
        self.q_norm = norm(norm_q) if arch.qk_norm or arch.qk_norm_whole else None
        self.k_norm = norm(norm_k) if arch.qk_norm or arch.qk_norm_whole else None
        self.attn_out_norm = norm(arch.hidden_size) if arch.sandwich_norms else None
        self.mlp_norm = norm(arch.hidden_size)
        self.mlp = build_mlp(arch, index)
        self.mlp_out_norm = norm(arch.hidden_size) if arch.sandwich_norms else None
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rotary: dict[str, Rotary],
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        # x: the previous layer's output [T, hidden]; residual: the stream before it (None at layer 0).
        # Returns (this layer's MLP output, the residual stream before it): the add is fused into the next norm.
        t = x.shape[0]
        h, residual = self.input_norm.add_norm(x, residual)
        q, k, v = self.qkv_proj(h).split(self.split, dim=-1)
        if self.qk_norm_whole:  # OLMoE: all heads at once, then clipped
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (x.clamp(-self.clip_qkv, self.clip_qkv) for x in (q, k, v))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_whole:  # per head: rows of head_dim
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = self.ops.rope(q, k, rotary[self.rope_key])
        attn = ctx.attend(self.index, q, k, v, self.attention)  # [T, H, D]
        out = self.o_proj(attn.reshape(t, -1))
        if self.attn_out_norm is not None:
            out = self.attn_out_norm(out)
        h, residual = self.mlp_norm.add_norm(out, residual)
        out = self.mlp(h)
        if self.mlp_out_norm is not None:
            out = self.mlp_out_norm(out)
        return out, residual


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch, hf_config: Any) -> None:
        super().__init__()
        self.arch = arch
        # No random init: the weights are loaded next, and normal_ on the meta device (load_model) pulls
        # in torch._dynamo, 4-9 s of a worker's start-up here.
        self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size,
                                  _weight=torch.empty(arch.vocab_size, arch.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.norm)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> cos, sin [max_pos, rotary_dim]
        self.hf_config = hf_config

    def use_ops(self, ops: ModelOps) -> None:
        """Set the elementwise ops of every layer (at load, once the device is known)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, DecoderLayer, GatedMLP)):
                module.ops = ops

    def init_rope(self, dtype: torch.dtype) -> None:
        """(Re)build the RoPE tables on the model's device, one per key the layers use; call after moving
        the model."""
        device = self.embed.weight.device
        keys = sorted({layer.rope_key for layer in self.layers})
        rotary_dim = self.arch.rotary_dim or self.arch.head_dim
        self.rope = {key: tuple(t.to(device) for t in rope_tables(
            self.hf_config, self.arch.max_position_embeddings, dtype, key, rotary_dim)) for key in keys}

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
        if self.arch.embed_scale is not None:  # Gemma: the factor rounded to the model dtype, as HF does
            x = x * torch.tensor(self.arch.embed_scale, dtype=x.dtype)
        rotary = {key: Rotary(cos, sin, positions) for key, (cos, sin) in self.rope.items()}
        residual = None
        for layer in self.layers[:num_layers]:
            x, residual = layer(x, residual, rotary, ctx)
        if logits_index is not None:
            x, residual = x[logits_index], residual[logits_index]
        logits = self.lm_head(self.norm(x, residual))
        if self.arch.final_softcap is not None:
            cap = self.arch.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def load_hf_weights(self, state: dict[str, torch.Tensor],
                        shard: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Take an HF state dict's tensors as this model's parameters, fused where ours are
        (engine/model/weights.py names them per family).

        The model may be on the meta device: tensors are assigned, not copied into preallocated ones
        (in the parameters' dtype, so as a copy would convert them). Unfused weights of a float32
        checkpoint stay views of the file's mapping, shared with other workers through the page cache;
        copying 538 MB into fresh pages took 2-6 s of a worker's start here. `shard(name, tensor)`: this
        tensor-parallel rank's slice of each (engine/parallel/shard.py); None: whole tensors."""
        own = self.state_dict()
        names = [n for n in own if not (n == "lm_head.weight" and self.arch.tie_word_embeddings)]
        loaded = {}
        for name, tensor in gather(self.arch.model_type, names, state).items():
            tensor = shard(name, tensor) if shard is not None else tensor
            target = own[name]
            if target.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
            loaded[name] = tensor.to(target.dtype)
        self.load_state_dict(loaded, strict=False, assign=True)
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
