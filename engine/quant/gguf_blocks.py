"""`--quantization gguf`: a GGUF's own Q4_0 / Q4_1 / Q8_0 blocks, without a float round trip.

Every such block is 32 weights along K with fp16 constants, and maps exactly onto
the canonical form of engine.quant.scheme with group_size 32:

    Q8_0  [d:f16][q:i8 x32]            w = d * q            -> int8, scale d
    Q4_1  [d:f16][m:f16][16 bytes]     w = d * q + m        -> int4, scale d, offset m
    Q4_0  [d:f16][16 bytes]            w = d * (q - 8)      -> int4, scale d, offset -8d

In the 16 bytes, byte j holds element j (low nibble) and element j + 16 (high
nibble). llama.cpp stores attn_q / attn_k rows permuted for its RoPE layout;
the rows are put back as transformers' GGUF loader does, so the result equals the
converted checkpoint's weights bit for bit after dequantization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.quant.scheme import QuantizedWeight

BLOCK = 32
SUPPORTED = ("Q4_0", "Q4_1", "Q8_0")


def block_weight(tensor) -> QuantizedWeight:
    """One gguf.ReaderTensor of a supported type -> QuantizedWeight [N, K] (rows in file order)."""
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED:
        raise ValueError(f"{tensor.name} is {kind}: --quantization gguf reads {', '.join(SUPPORTED)} tensors")
    raw = np.asarray(tensor.data, dtype=np.uint8)
    n = raw.shape[0]
    head = {"Q8_0": 2, "Q4_1": 4, "Q4_0": 2}[kind]
    blocks = raw.reshape(n, -1, head + (BLOCK if kind == "Q8_0" else BLOCK // 2))  # [N, G, bytes]
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))  # [N, G]
    body = blocks[..., head:]
    if kind == "Q8_0":
        q = torch.from_numpy(body.copy().view(np.int8)).reshape(n, -1)
        return QuantizedWeight("int8", BLOCK, q, d, None)
    nib = np.concatenate([body & 0xF, body >> 4], axis=-1).reshape(n, -1)  # element order within each block
    packed = torch.from_numpy(np.ascontiguousarray(nib[:, 0::2] | (nib[:, 1::2] << 4)))
    if kind == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    else:
        m = -8 * d
    return QuantizedWeight("int4", BLOCK, packed, d, m.contiguous())


def _unpermute_rows(qw: QuantizedWeight, heads: int) -> QuantizedWeight:
    """Undo llama.cpp's q/k row order (transformers' `reverse_permute_weights`) on every row-indexed tensor."""
    def fix(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        return t.reshape(heads, n // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()

    z = None if qw.zeros is None else fix(qw.zeros)
    return QuantizedWeight(qw.scheme, qw.group_size, fix(qw.qweight), fix(qw.scales), z)


def _cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    if len({(p.scheme, p.group_size) for p in parts}) != 1:
        raise ValueError("fused projections mix GGUF block types; --quantization gguf needs them alike")
    z = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])
    return QuantizedWeight(parts[0].scheme, BLOCK, torch.cat([p.qweight for p in parts]),
                           torch.cat([p.scales for p in parts]), z)


def read_gguf_linears(path: Path, arch, lm_head: bool) -> dict[str, QuantizedWeight]:
    """The model's fused linear layers by module name (as in engine.model.llama), straight from the blocks."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}

    def get(name: str) -> QuantizedWeight:
        if name not in tensors:
            raise KeyError(f"{path.name} lacks {name}")
        return block_weight(tensors[name])

    out: dict[str, QuantizedWeight] = {}
    for i in range(arch.num_layers):
        b = f"blk.{i}."
        q = _unpermute_rows(get(b + "attn_q.weight"), arch.num_heads)
        k = _unpermute_rows(get(b + "attn_k.weight"), arch.num_kv_heads)
        out[f"layers.{i}.qkv_proj"] = _cat_rows([q, k, get(b + "attn_v.weight")])
        out[f"layers.{i}.o_proj"] = get(b + "attn_output.weight")
        out[f"layers.{i}.mlp.gate_up_proj"] = _cat_rows([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
        out[f"layers.{i}.mlp.down_proj"] = get(b + "ffn_down.weight")
    if lm_head:
        out["lm_head"] = get("output.weight" if "output.weight" in tensors else "token_embd.weight")
    return out
