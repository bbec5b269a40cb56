"""Our native int4 GEMV (engine/kernels/int4_gemv_cpu.cpp): the weight packed once for it, and its reference.

The kernel multiplies the int4 weight by activations it quantizes to int8 per block of 32 inputs
(llama.cpp's Q4 x Q8 dot), so its result is exactly `reference(x)`: the dequantized weight, with scale
and min rounded to float16 as the packed layout stores them, times the int8-quantized activations; only
float32 summation order differs. The activation rounding (|x - xq * d| <= d / 2, d = max|x_block| / 127)
is the error it adds over dequantize-then-matmul.
"""

from __future__ import annotations

import threading

import torch

from engine.quant.scheme import QuantizedWeight, unpack_int4

TILE = 16  # output rows per tile, as in the C++ source
BLOCK = 32  # activation block
FP16_MAX = 65504.0
ARENA_CHUNK = 16 << 20  # bytes of huge-page memory the packed weights are placed in, a chunk at a time


def supports(qw: QuantizedWeight) -> bool:
    """int4 with groups of a multiple of 32 and scales/mins that fit float16. float16 holds a GGUF's
    Q4_1 scales and mins exactly; for weights quantized here their rounding (2^-11 relative) can exceed
    a near-constant group's own step, still finer than the bfloat16 torch's packed op keeps."""
    if qw.scheme != "int4" or qw.group_size % BLOCK:
        return False
    return bool(qw.scales.abs().max() <= FP16_MAX and qw.zeros.abs().max() <= FP16_MAX)


def pack(qw: QuantizedWeight) -> torch.Tensor:
    """uint8 [tiles, groups, 64 + group_size * 8]: per tile of 16 rows and group, 16 fp16 scales, 16 fp16 mins,
    then group_size / 8 steps of [16 rows x 4 bytes]; byte j of a row holds inputs 8s + j (low nibble)
    and 8s + 4 + j (high nibble)."""
    if not supports(qw):
        raise ValueError(f"the int4 GEMV takes int4 groups of a multiple of {BLOCK} with float16-range scales; "
                         f"got {qw.scheme} groups of {qw.group_size}")
    n, k = qw.shape
    gs, g = qw.group_size, k // qw.group_size
    tiles = -(-n // TILE)
    pad = tiles * TILE - n
    q = unpack_int4(qw.qweight)
    scales, mins = qw.scales.float(), qw.zeros.float()
    if pad:  # zero rows: scale and min 0, their outputs are never written
        q = torch.cat([q, q.new_zeros(pad, k)])
        scales, mins = (torch.cat([t, t.new_zeros(pad, g)]) for t in (scales, mins))
    q = q.reshape(tiles, TILE, g, gs // 8, 2, 4)
    body = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(tiles, g, gs * 8)

    def head(t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [tiles, G, 32 bytes]
        return t.to(torch.float16).reshape(tiles, TILE, g).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([head(scales), head(mins), body], dim=-1).contiguous()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's rounding in torch: x [M, K] float32 -> (int8 [M, K], d [M, K / 32])."""
    m, k = x.shape
    xb = x.float().reshape(m, k // BLOCK, BLOCK)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return torch.round(xb * inv[..., None]).to(torch.int8).reshape(m, k), d


def reference(qw: QuantizedWeight, xq: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: dequant(W, fp16 scale/min) @ (xq * d)^T."""
    n, k = qw.shape
    gs = qw.group_size
    s, m = (t.to(torch.float16).double() for t in (qw.scales, qw.zeros))
    w = (unpack_int4(qw.qweight).double().reshape(n, -1, gs) * s[..., None] + m[..., None]).reshape(n, k)
    xd = (xq.double().reshape(xq.shape[0], -1, BLOCK) * d.double()[..., None]).reshape(xq.shape)
    return xd @ w.T


class HugePageArena:
    """Packed weights placed one after another in chunks of huge-page memory (module.hugepage_buffer).

    One 2 MiB page per small weight would waste most of it; in shared chunks a model's weights take
    their own bytes plus the unused tail of the chunk being filled (which the arena keeps for the next
    weight); a full chunk is freed with its last weight.
    """

    def __init__(self, module, chunk: int = ARENA_CHUNK) -> None:
        self.module, self.chunk_bytes = module, chunk
        self.chunk: torch.Tensor | None = None
        self.used = 0
        self._lock = threading.Lock()  # two models loading at once must not be handed the same bytes

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of the contiguous uint8 tensor `t` in huge-page memory (64-byte aligned)."""
        n = t.numel()
        if n > self.chunk_bytes:
            return self.module.hugepage_buffer(n).copy_(t.reshape(-1)).view(t.shape)
        with self._lock:
            if self.chunk is None or self.used + n > self.chunk_bytes:
                self.chunk, self.used = self.module.hugepage_buffer(self.chunk_bytes), 0
            out = self.chunk[self.used:self.used + n]
            self.used += -(-n // 64) * 64
        return out.copy_(t.reshape(-1)).view(t.shape)


_arenas: dict[int, HugePageArena] = {}


def _arena(module) -> HugePageArena:
    return _arenas.setdefault(id(module), HugePageArena(module))


class Int4Gemv:
    """x [M, K] @ W^T through the native kernel, for an int4 weight packed once at construction."""

    def __init__(self, qw: QuantizedWeight, module) -> None:
        self.n, self.k = qw.shape
        self.group_size = qw.group_size
        self.packed = _arena(module).place(pack(qw))
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        y = self.module.int4_gemv(xf, self.packed, self.n, self.k, self.group_size)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
