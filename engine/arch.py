"""What the forward needs to know about a checkpoint: `ModelArch` and its parts.

`engine/families.py` reads a family's HF config into one (`read_arch`); the model (engine/model/)
builds itself from it. Plain data, no torch: the driver reads it before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# The HF `model_type`s our own forward runs (engine/families.py reads each one's config into a ModelArch,
# engine/model/weights.py maps its checkpoint's tensor names). Any other decoder-only model runs through
# transformers' modules or is refused (engine/model/registry.py decides, before any worker starts).
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")  # engine/model/moe.py
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", *MOE_MODEL_TYPES)


class UnsupportedArchitecture(ValueError):
    """A checkpoint pdserve cannot serve (on the path asked for); the message names the architecture and why.
    Raised before any worker starts, and by a worker before it reads weights."""


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


class Norm(str, Enum):
    """How an RMSNorm applies its weight."""

    RMS = "rms"  # weight * norm(x), norm rounded to the model dtype first (Llama, Qwen, Mistral, Phi-3)
    RMS_UNIT_OFFSET = "rms_unit_offset"  # (1 + weight) * norm(x) in float32, then rounded (Gemma 2/3)


class Activation(str, Enum):
    """The gate's activation of a gated MLP: down(act(gate) * up)."""

    SILU = "silu"  # SwiGLU
    GELU_TANH = "gelu_pytorch_tanh"  # GeGLU with the tanh approximation (Gemma)


@dataclass(frozen=True)
class LayerSpec:
    """What may differ from one decoder layer to the next."""

    sliding_window: int | None = None  # sees the last `sliding_window` positions, its own included; None: all
    rope: str = "default"  # which RoPE table (Gemma 3: its local and global layers have their own bases)


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

    def mlp_params(self, hidden: int, active: bool) -> int:
        """Weights of one sparse layer's MLP; `active`: those one token uses (its top-k experts)."""
        experts = self.top_k if active else self.num_experts
        shared = self.shared_expert_intermediate_size
        return (experts * 3 * hidden * self.expert_intermediate_size + self.num_experts * hidden
                + shared * 3 * hidden + (hidden if shared else 0))


@dataclass(frozen=True)
class ModelArch:
    """The shape of a decoder checkpoint, read from its HF config (engine/families.py)."""

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
    qk_norm: bool  # Qwen3, Gemma 3 normalize q and k per head before RoPE
    eos_token_ids: tuple[int, ...]
    layers: tuple[LayerSpec, ...] = ()  # one per layer; () = every layer LayerSpec()
    norm: Norm = Norm.RMS
    activation: Activation = Activation.SILU
    sandwich_norms: bool = False  # Gemma 2/3: also a norm on the attention's and the MLP's output
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden), the factor in the model dtype
    query_scale: float | None = None  # attention's softmax scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None  # Gemma 2 (3 optional): the same on the logits
    rotary_dim: int = 0  # leading dims of each head that RoPE rotates (Phi partial rotary); 0: all
    qk_norm_whole: bool = False  # OLMoE normalizes the whole q and k projections (all heads at once)
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip] after the norms
    o_proj_bias: bool = False  # OLMoE with attention_bias
    moe: MoEArch | None = None  # None: every layer's MLP is dense
    impl: ModelImpl = ModelImpl.NATIVE  # which forward runs it (engine/model/registry.py)

    def layer(self, index: int) -> LayerSpec:
        return self.layers[index] if self.layers else LayerSpec()

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

    @property
    def kv_window(self) -> int | None:
        """The widest window when every layer has one (older KV is never read again: engine/kv_window.py);
        None when any layer attends to all positions."""
        windows = [self.layer(i).sliding_window for i in range(self.num_layers)]
        return None if any(w is None for w in windows) else max(windows)

    @property
    def kv_elements_per_token(self) -> int:
        """K and V values stored per token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def num_params(self, active: bool = False) -> int:
        """Every weight; with `active`, only those one token uses (its top-k experts, not all of them)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        norms = (4 if self.sandwich_norms else 2) * h
        sparse = self.moe.sparse_layers if self.moe is not None else ()
        mlp = sum(self.moe.mlp_params(h, active) if layer in sparse else 3 * h * i for layer in range(self.num_layers))
        embed = self.vocab_size * h
        return self.num_layers * (attn + norms) + mlp + embed + h + (0 if self.tie_word_embeddings else embed)
