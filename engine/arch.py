"""What the forward needs to know about a checkpoint: `ModelArch` and its parts.

`engine/families.py` reads a family's HF config into one (`read_arch`); the model (engine/model/)
builds itself from it. Plain data, no torch: the driver reads it before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# The HF `model_type`s our own forward runs (engine/families.py reads each one's config into a ModelArch,
# engine/model/weights.py maps its checkpoint's tensor names). Anything else is refused at start.
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


class UnsupportedArchitecture(ValueError):
    """A checkpoint whose architecture pdserve does not run; raised before any worker starts."""



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

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        per_layer = attn + 3 * h * i + (4 if self.sandwich_norms else 2) * h
        embed = self.vocab_size * h
        return self.num_layers * per_layer + embed + h + (0 if self.tie_word_embeddings else embed)
