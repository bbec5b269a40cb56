"""Swap a loaded model's linear layers for QuantLinear, through the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.quant.linear import QuantLinear
from engine.quant.scheme import QuantizedWeight, check_group_size, quantize

# The GGUF Q4_0/Q4_1 block size: the default model's weights come as such blocks. torch's int4 CPU op takes it.
INT4_DEFAULT_GROUP = 32
FORMAT_VERSION = 2  # part of the cache key: bump when scheme.py's layout or module names change (2: layers.i.mlp.*)


def resolve_group_size(scheme: str, group_size: int, in_features: int) -> int:
    """0 means the scheme's default: int8 one group per output channel, int4 groups of 32."""
    if group_size:
        return group_size
    return in_features if scheme == "int8" else INT4_DEFAULT_GROUP


def linear_targets(model: nn.Module, lm_head: bool) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by qualified name; the LM head only if asked."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (lm_head or name != "lm_head")}


def quantize_linears(targets: dict[str, nn.Linear], scheme: str, group_size: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, m in targets.items():
        gs = resolve_group_size(scheme, group_size, m.in_features)
        check_group_size(m.in_features, gs, scheme)
        out.update(quantize(m.weight, scheme, gs).tensors(name))
    return out


def quantize_model(model: nn.Module, config, folder: Path | None = None, kernel: str = "auto") -> None:
    """Replace the linear layers in place, per `config.quantization` (a no-op for 'none'; 'gguf' reads the
    GGUF's own blocks; 'w8a8' is SmoothQuant-scaled per-channel int8 weights run with int8 activations).

    Call it on the float32 CPU model right after its weights load: quantization reads the exact
    source weights, and the new modules are placed on `config.device` directly. With `folder`
    the quantized tensors are cached under `config.cache_dir`.
    """
    scheme = config.quantization
    if scheme == "none":
        return
    if scheme == "gguf":
        _load_gguf_blocks(model, config)
        return
    if scheme == "w8a8":
        _quantize_w8a8(model, config, folder, kernel)
        return
    lm_head = config.quantize_lm_head
    targets = linear_targets(model, lm_head)
    tag = f"{scheme}-v{FORMAT_VERSION}-g{config.quant_group_size or 'default'}{'-lmhead' if lm_head else ''}"

    def build() -> dict[str, torch.Tensor]:
        return quantize_linears(targets, scheme, config.quant_group_size)

    if folder is not None:
        from engine.loader import cached_tensors

        state = cached_tensors(folder, config.cache_dir, tag, build)
    else:
        state = build()
    device = torch.device(config.resolved().device)
    for name, m in targets.items():
        gs = resolve_group_size(scheme, config.quant_group_size, m.in_features)
        qw = QuantizedWeight.from_tensors(scheme, gs, state, name).to(device)
        bias = None if m.bias is None else m.bias.to(device=device, dtype=config.torch_dtype)
        _set_module(model, name, QuantLinear(qw, bias, kernel))


def _quantize_w8a8(model: nn.Module, config, folder: Path | None, kernel: str) -> None:
    """SmoothQuant-scaled per-channel int8 weights run with int8 activations; FLOAT_LAYERS stay float.
    The factors come from one calibration forward of the float model (smooth.py), cached with the weights."""
    from engine.quant.smooth import FLOAT_LAYERS, activation_maxima, calibration_ids, calibration_tag, smoothing_factors

    if config.quant_group_size:
        raise ValueError("--quantization w8a8 takes one weight scale per output channel: "
                         f"leave --quant-group-size at 0 (got {config.quant_group_size})")
    if folder is None:
        raise ValueError("--quantization w8a8 calibrates on text: it needs the model's folder (tokenizer)")
    targets = {name: m for name, m in linear_targets(model, config.quantize_lm_head).items()
               if name.rpartition(".")[2] not in FLOAT_LAYERS}
    tag = f"w8a8-v{FORMAT_VERSION}-{calibration_tag()}{'-lmhead' if config.quantize_lm_head else ''}"

    def build() -> dict[str, torch.Tensor]:
        maxima = activation_maxima(model, targets, calibration_ids(folder, model.embed.num_embeddings))
        out: dict[str, torch.Tensor] = {}
        for name, m in targets.items():
            smooth = smoothing_factors(maxima[name], m.weight)
            out.update(quantize(m.weight, "int8", m.in_features, smooth).tensors(name))
        return out

    from engine.loader import cached_tensors

    state = cached_tensors(folder, config.cache_dir, tag, build)
    device = torch.device(config.resolved().device)
    for name, m in targets.items():
        qw = QuantizedWeight.from_tensors("int8", m.in_features, state, name).to(device)
        bias = None if m.bias is None else m.bias.to(device=device, dtype=config.torch_dtype)
        _set_module(model, name, QuantLinear(qw, bias, kernel, int8_activations=True))


def _load_gguf_blocks(model: nn.Module, config, kernel: str = "auto") -> None:
    """--quantization gguf: the file's own blocks, read directly (fast: no quantization, no cache needed)."""
    from engine.loader import gguf_source
    from engine.quant.gguf_blocks import read_gguf_linears

    device = torch.device(config.resolved().device)
    targets = linear_targets(model, config.quantize_lm_head)
    weights = read_gguf_linears(gguf_source(config.model), model.arch, config.quantize_lm_head)
    for name, m in targets.items():
        if name not in weights:
            raise KeyError(f"--quantization gguf: no GGUF tensor for {name}")
        bias = None if m.bias is None else m.bias.to(device=device, dtype=config.torch_dtype)
        _set_module(model, name, QuantLinear(weights[name].to(device), bias, kernel))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds (each shared tensor once), quantized ones as stored."""
    seen: set[int] = set()
    total = 0
    for t in model.parameters():
        if t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.qw.nbytes()
    return total
