"""The generic path: a decoder-only model run by transformers' own modules over pdserve's paged KV cache.

transformers' attention modules compute q, k, v with their own projections, norms and position encoding
(RoPE, partial rotary, learned positions...) and then call the function registered under their config's
`_attn_implementation` (AttentionInterface). Each loaded model registers its own function, which hands
that call to the forward's AttentionContext: the same contexts the native model uses (packed prefill to
a KV sink, extend over a cached prefix, paged decode, mixed colocated steps), so K/V land in our pool
and transfers, prefix caching and streaming work unchanged. As in vLLM's Transformers backend, all
sequences of a step are packed into one row of batch 1, each token with its own position id, and no
mask is built (no mask function is registered for our implementation): the context knows the layout.

    layers    numbered by the order the modules call attention in one forward (probed at load)
    spec      each call becomes the layer's AttentionSpec: the module's own `scaling`, and the
              `sliding_window` it passes (transformers' window: the query and the W-1 keys before it,
              ours too); the self-check then runs a prompt longer than the narrowest window
    refused   attention that the contexts do not compute: a mask or bias handed in (ALiBi, relative
              positions), logit soft-capping, attention sinks, non-causal modules, a module called
              twice per forward, KV shapes that differ between layers; and any model whose logits
              through our contexts differ from its own attention's (checked at load)
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.attention import PrefillAttention
from engine.attention.base import AttentionSpec
from engine.config import EngineConfig, ModelArch, UnsupportedArchitecture

log = logging.getLogger("pdserve.model")
_ids = itertools.count()
UNSUPPORTED_KWARGS = {"softcap": "soft-caps attention logits", "s_aux": "adds attention sinks",
                      "sinks": "adds attention sinks"}


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    head_dim: int


class ForwardSlot:
    """The context of the forward in progress, for the attention function (transformers hands it only
    the module). One forward at a time per model: nesting is refused."""

    def __init__(self) -> None:
        self.current: Any = None

    @contextmanager
    def bound(self, ctx: Any) -> Iterator[None]:
        if self.current is not None:
            raise RuntimeError("a forward of this model is already running")
        self.current = ctx
        try:
            yield
        finally:
            self.current = None


class PagedAttentionBridge:
    """The attention function of one model: layer numbering, the refusals, the hand-off to the context."""

    def __init__(self, max_positions: int, dtype: torch.dtype) -> None:
        self.name = f"pdserve_paged_{next(_ids)}"
        self.dtype = dtype  # the pool's: a module that hands q/k/v over in float32 (after its RoPE) is cast
        self.slot = ForwardSlot()
        self.layer_of: dict[int, int] = {}  # id(attention module) -> layer
        self.shapes: list[LayerShape] = []
        self.frozen = False  # after the probe, an unknown module is an error
        self.max_positions = max_positions
        self.narrowest_window: int | None = None  # seen on any call; the self-check prompt is longer
        self.calls = 0

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        # query [1, H, T, D]; key, value [1, KVH, T, D] -> ([1, T, H, D], no weights)
        layer = self._layer(module, key, value)
        self._check(module, query, attention_mask, kwargs)
        q, k, v = (x[0].transpose(0, 1).to(self.dtype).contiguous() for x in (query, key, value))
        self.calls += 1
        spec = AttentionSpec(scaling if scaling is not None else query.shape[-1] ** -0.5,
                             self._window(kwargs.get("sliding_window")))
        return self.slot.current.attend(layer, q, k, v, spec).to(query.dtype).unsqueeze(0), None

    def _window(self, window: int | None) -> int | None:
        """The module's window in our terms; None where it never binds (no wider than the context)."""
        if not window or window >= self.max_positions:
            return None
        self.narrowest_window = min(self.narrowest_window or window, window)
        return int(window)

    def _layer(self, module: nn.Module, key: torch.Tensor, value: torch.Tensor) -> int:
        layer = self.layer_of.get(id(module))
        if layer is None:
            if self.frozen:
                raise UnsupportedArchitecture(f"attention module {type(module).__name__} was not seen at load")
            if value.shape[1:2] + value.shape[3:] != key.shape[1:2] + key.shape[3:]:
                raise UnsupportedArchitecture(f"{type(module).__name__}: keys {tuple(key.shape)} and values "
                                              f"{tuple(value.shape)} differ in shape; the KV pool holds one shape")
            layer = self.layer_of[id(module)] = len(self.shapes)
            self.shapes.append(LayerShape(key.shape[1], key.shape[3]))
        return layer

    def _check(self, module: nn.Module, query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> None:
        name = type(module).__name__
        if query.shape[0] != 1:
            raise UnsupportedArchitecture(f"{name} was called with a batch of {query.shape[0]}; pdserve packs one row")
        if mask is not None:
            raise UnsupportedArchitecture(f"{name} hands its attention a mask or bias (ALiBi, relative positions...) "
                                          "that pdserve's attention kernels do not apply")
        if getattr(module, "is_causal", True) is False:
            raise UnsupportedArchitecture(f"{name} attends bidirectionally; pdserve serves causal decoders")
        for key, what in UNSUPPORTED_KWARGS.items():
            value = kwargs.get(key)
            if value is not None:
                raise UnsupportedArchitecture(f"{name} {what} ({key}={value}); the generic path attends to the "
                                              "context with plain softmax")


class GenericCausalLM(nn.Module):
    """A transformers causal LM behind the runner's model interface: forward(ids, positions, ctx, ...)."""

    def __init__(self, hf_model: nn.Module, arch: ModelArch, bridge: PagedAttentionBridge) -> None:
        super().__init__()
        self.hf, self.arch, self.bridge = hf_model, arch, bridge
        self._keeps_logits = "logits_to_keep" in inspect.signature(hf_model.forward).parameters

    def use_ops(self, ops: Any) -> None:
        """The modules' own norms and position encodings run; nothing to choose."""

    def init_rope(self, dtype: torch.dtype) -> None:
        """The modules compute their own position encodings."""

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Any,
                logits_index: torch.Tensor | None = None, num_layers: int | None = None) -> torch.Tensor:
        """input_ids, positions [T] (sequences packed) -> logits [N, vocab] float32 for rows `logits_index`."""
        if num_layers is not None:
            raise ValueError("running only the first layers (--speculative layers:K) needs the native path")
        keep: dict[str, Any] = {}
        if self._keeps_logits:
            keep["logits_to_keep"] = 0 if logits_index is None else logits_index
        with self.bridge.slot.bound(ctx):
            logits = self.hf(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                             **keep).logits[0]
        if logits_index is not None and not self._keeps_logits:
            logits = logits[logits_index]
        return logits.float()


def load_generic(folder: Path, config: EngineConfig, arch: ModelArch) -> GenericCausalLM:
    """Load `folder` with transformers, plug the paged attention in, measure each layer's KV shape, and
    refuse the model unless its logits through our contexts equal those through its own attention."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    if config.quantization != "none":
        raise UnsupportedArchitecture(f"--quantization {config.quantization} runs on the native path only; "
                                      f"{arch.model_type} runs through transformers' modules")
    bridge = PagedAttentionBridge(arch.max_position_embeddings, config.torch_dtype)
    AttentionInterface.register(bridge.name, bridge)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=config.torch_dtype, attn_implementation=bridge.name)
    hf = hf.to(config.device).eval()
    model = GenericCausalLM(hf, arch, bridge)
    try:
        shapes = _probe(model, config.device)
        model.arch = replace(arch, num_layers=len(shapes), num_kv_heads=shapes[0].kv_heads,
                             head_dim=shapes[0].head_dim)
        _self_check(model, config.device)
    except UnsupportedArchitecture:
        raise
    except Exception as e:  # the modules themselves failed under packing or our attention
        raise UnsupportedArchitecture(f"architecture {arch.model_type!r} failed on pdserve's generic path at load "
                                      f"({type(e).__name__}: {e})") from e
    return model


def _probe(model: GenericCausalLM, device: str) -> list[LayerShape]:
    """One small forward numbers the attention modules and reads each layer's K/V shape."""
    bridge = model.bridge
    n = 4
    model(torch.arange(n, device=device) % model.arch.vocab_size, torch.arange(n, device=device),
          PrefillAttention([n], device=device))
    shapes, calls = bridge.shapes, bridge.calls
    if not shapes:
        raise UnsupportedArchitecture(f"{model.arch.model_type}: its modules never called the attention interface")
    if calls != len(shapes):
        raise UnsupportedArchitecture(f"{model.arch.model_type}: {calls} attention calls in one forward over "
                                      f"{len(shapes)} modules (layers sharing attention modules)")
    if len(set(shapes)) != 1:
        raise UnsupportedArchitecture(f"{model.arch.model_type}: K/V shapes differ between layers "
                                      f"({sorted(set(shapes), key=str)}); the KV pool holds one shape")
    bridge.frozen = True
    return shapes


def _self_check(model: GenericCausalLM, device: str) -> None:
    """Two prompts packed through our contexts against the model's own attention (sdpa), one by one; the
    second passes the narrowest sliding window, if any. A model that reads positions, masks or windows
    in a way the packing breaks is refused here, not served wrong."""
    vocab = model.arch.vocab_size
    window = model.bridge.narrowest_window
    longer = 9 if window is None else min(window + 7, model.arch.max_position_embeddings)
    prompts = [[(7 * i + 3) % vocab for i in range(5)], [(11 * i + 5) % vocab for i in range(longer)]]
    lens = [len(p) for p in prompts]
    ids = torch.tensor(sum(prompts, []), device=device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    ours = model(ids, positions, PrefillAttention(lens, device=device))
    own = model.bridge.name
    model.hf.set_attn_implementation("sdpa")
    if model.hf.config._attn_implementation != "sdpa":
        raise UnsupportedArchitecture(f"{model.arch.model_type}: its attention cannot be switched to sdpa to check "
                                      "pdserve's against it")
    try:
        with torch.inference_mode():
            ref = torch.cat([model.hf(input_ids=torch.tensor([p], device=device)).logits[0] for p in prompts]).float()
    finally:
        model.hf.set_attn_implementation(own)
    rel = 1e-3 if ref.dtype == torch.float32 and next(model.hf.parameters()).dtype == torch.float32 else 3e-2
    diff = (ours - ref).abs().max().item()
    if diff > rel * max(1.0, ref.abs().max().item()):
        raise UnsupportedArchitecture(f"{model.arch.model_type}: logits through pdserve's attention differ from the "
                                      f"model's own by {diff:.3g} on packed prompts; refused rather than served wrong")
