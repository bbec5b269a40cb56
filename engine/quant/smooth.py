"""SmoothQuant for `--quantization w8a8`: move activation outliers into the weights before int8.

Per-token int8 activations lose the small channels of a token whose scale is set
by one huge channel. SmoothQuant (Xiao et al. 2023) divides each input channel j
of a linear layer's activations by s_j and multiplies the weight's column j by
it, which leaves x @ W^T unchanged:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),   alpha = 0.5

max|X_j| is measured once at quantization time on `calibration.txt` (English prose,
a recipe, code, a little arithmetic; not the held-out perplexity text), and the
factors are cached with the int8 weights. The MLP's down projection stays in
float: its input, SiLU(gate) * up, has outliers that neither per-token int8 nor
smoothing holds. Measured once with a throwaway script that swapped each layer kind's
kernel (not kept; the shipped setting's figure is `pdserve bench quant --settings
float32,w8a8`) on SmolLM2-135M (fp32 activations elsewhere,
perplexity on pdserve/bench/heldout.txt, fp32 = 15.942): per-token int8 on every
layer 17.230 (+8.1%); down_proj alone +1.8%, the others +0.5% or less each;
smoothed qkv / o / gate_up with a float down_proj 16.058 (+0.7%) calibrated on
calibration.txt as shipped (15.964, +0.14%, calibrated on the benchmark corpus in
an experiment); smoothing the down_proj too 16.697, keeping its 32 largest input
channels in float 16.151.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

CALIBRATION = Path(__file__).with_name("calibration.txt")
ALPHA = 0.5
FLOAT_LAYERS = ("down_proj",)  # left unquantized by w8a8 (see above)
MIN_FACTOR = 1e-5


def calibration_tag() -> str:
    """Part of the cache key: other text or alpha, other factors."""
    return f"a{ALPHA}-{hashlib.blake2b(CALIBRATION.read_bytes(), digest_size=4).hexdigest()}"


def calibration_ids(folder: Path, vocab_size: int) -> list[int]:
    """The calibration text's token ids. Ids the model's embedding lacks are dropped (a test model with a
    real tokenizer); a real model keeps every one."""
    from engine.loader import load_tokenizer

    ids = [i for i in load_tokenizer(folder)(CALIBRATION.read_text())["input_ids"] if i < vocab_size]
    if len(ids) < 16:
        raise ValueError(f"w8a8 calibration: the tokenizer in {folder} gives {len(ids)} usable tokens")
    return ids


@torch.inference_mode()
def activation_maxima(model: nn.Module, targets: dict[str, nn.Linear], token_ids: list[int]) -> dict[str, torch.Tensor]:
    """max |x_j| over the calibration tokens for every input channel of every target layer (one fp32 forward)."""
    from engine.attention import PrefillAttention

    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in targets.items()]
    try:
        model.init_rope(torch.float32)
        x = torch.tensor(token_ids)
        model(x, torch.arange(len(x)), PrefillAttention([len(x)]))
    finally:
        for h in hooks:
            h.remove()
    return maxima


def smoothing_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s [K] for a weight [N, K]; channels never active (or all-zero weight columns) get 1."""
    w_max = weight.detach().float().abs().amax(0)
    s = act_max.clamp(min=MIN_FACTOR) ** alpha / w_max.clamp(min=MIN_FACTOR) ** (1 - alpha)
    dead = (act_max <= 0) | (w_max <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=MIN_FACTOR))
