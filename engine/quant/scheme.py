"""Group-wise weight quantization: the canonical (on-disk) form and its exact inverse.

A weight W [N, K] (N output channels, K inputs) is cut into groups of `group_size`
consecutive inputs per output channel; each group has its own scale.

    int8 (symmetric):   q in [-127, 127],  w ~ q * s,      s = max|w_g| / 127
    int4 (asymmetric):  q in [0, 15],      w ~ q * s + m,  s = (max(w_g) - min(w_g)) / 15,  m = min(w_g)

Both round to nearest, so |w - dequant(w)| <= s / 2 in every group. The int4 zero
point is kept as a float offset m (the group minimum), as llama.cpp's Q4_1 and
torch's int4 CPU layout do, rather than an integer z with m = -z * s: that spends
the 16 levels on the group's own range, and groups of 32 then hold a Q4_1
checkpoint (the default model) almost exactly. int4 values are packed two per
byte along K: byte[n, k // 2] = q[n, k] | q[n, k + 1] << 4 (k even). Scales and
int4 offsets are float32 [N, G].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("int8", "int4")


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight in canonical form; `shape` is the float weight's [N, K]."""

    scheme: str
    group_size: int
    qweight: torch.Tensor  # int8 [N, K] | uint8 [N, K // 2]
    scales: torch.Tensor  # float32 [N, G]
    zeros: torch.Tensor | None  # float32 [N, G] offsets m for int4, else None
    smooth: torch.Tensor | None = None  # float32 [K]: w8a8 stores W * diag(smooth) (engine/quant/smooth.py)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.qweight.shape[0]
        return n, self.scales.shape[1] * self.group_size

    def nbytes(self) -> int:
        ts = [t for t in (self.qweight, self.scales, self.zeros, self.smooth) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat name -> tensor, for safetensors."""
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        if self.smooth is not None:
            out[f"{prefix}.smooth"] = self.smooth
        return out

    @classmethod
    def from_tensors(cls, scheme: str, group_size: int, state: dict[str, torch.Tensor], prefix: str):
        return cls(scheme, group_size, state[f"{prefix}.qweight"], state[f"{prefix}.scales"],
                   state.get(f"{prefix}.zeros"), state.get(f"{prefix}.smooth"))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        z, sm = (None if t is None else t.to(device) for t in (self.zeros, self.smooth))
        return QuantizedWeight(self.scheme, self.group_size, self.qweight.to(device), self.scales.to(device), z, sm)


def check_group_size(k: int, group_size: int, scheme: str) -> None:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"quant_group_size {group_size} must divide every linear layer's input size (got {k})")
    if scheme == "int4" and group_size % 2:
        raise ValueError(f"int4 packs two values per byte: quant_group_size must be even, got {group_size}")


def quantize(w: torch.Tensor, scheme: str, group_size: int, smooth: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a float weight [N, K] (computed in float32); with `smooth` [K] (int8 only), W * diag(smooth)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; one of {SCHEMES}")
    n, k = w.shape
    check_group_size(k, group_size, scheme)
    if smooth is not None and scheme != "int8":
        raise ValueError("smoothing factors go with int8 weights (w8a8)")
    wf = w.detach().float() if smooth is None else w.detach().float() * smooth.float()
    g = wf.reshape(n, k // group_size, group_size)
    if scheme == "int8":
        s = g.abs().amax(-1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(g / s[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
        sm = None if smooth is None else smooth.float().contiguous()
        return QuantizedWeight(scheme, group_size, q.contiguous(), s.contiguous(), None, sm)
    lo, hi = g.amin(-1), g.amax(-1)
    s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantizedWeight(scheme, group_size, packed.contiguous(), s.contiguous(), lo.contiguous())


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] of values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] the quantized one stands for (computed in float32)."""
    n, k = qw.shape
    gs = qw.group_size
    if qw.scheme == "int8":
        w = (qw.qweight.float().reshape(n, -1, gs) * qw.scales[..., None].float()).reshape(n, k)
        return (w if qw.smooth is None else w / qw.smooth.float()).to(dtype)
    q = unpack_int4(qw.qweight).float().reshape(n, -1, gs)
    w = q * qw.scales[..., None].float() + qw.zeros[..., None].float()
    return w.reshape(n, k).to(dtype)


# The GGUF Q4_0/Q4_1 block size: the default model's weights come as such blocks. torch's int4 CPU op takes it.
INT4_DEFAULT_GROUP = 32


def resolve_group_size(scheme: str, group_size: int, in_features: int) -> int:
    """0 means the scheme's default: int8 one group per output channel, int4 groups of 32."""
    if group_size:
        return group_size
    return in_features if scheme == "int8" else INT4_DEFAULT_GROUP
