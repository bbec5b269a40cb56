"""KV chunks on the wire: whole blocks of one layer, with a checksum, under a size cap.

A request's K/V for one layer is [num_tokens, KVH, D], token-major. It is cut
at block boundaries into chunks of at most `max_chunk_bytes`; only valid
tokens travel (the last block may be partial), so the receiver rebuilds the
exact bytes the sender computed.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator

import torch

from engine.config import DTYPES
from engine.kv_cache import KVLayout
from kvtransfer.base import IntegrityError
from proto import kv_transfer_pb2 as pb

DEFAULT_MAX_CHUNK_BYTES = 1 << 20


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def encode_layer(request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor, block_size: int,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Iterator[pb.KVChunk]:
    """k, v: [num_tokens, KVH, D] -> chunks covering whole blocks [block_start, block_start + n)."""
    num_tokens, kvh, d = k.shape
    dtype = _dtype_name(k.dtype)
    bytes_per_block = 2 * block_size * kvh * d * k.element_size()
    blocks_per_chunk = max(1, max_chunk_bytes // bytes_per_block)
    num_blocks = -(-num_tokens // block_size)
    for b0 in range(0, num_blocks, blocks_per_chunk):
        nb = min(blocks_per_chunk, num_blocks - b0)
        t0, t1 = b0 * block_size, min((b0 + nb) * block_size, num_tokens)
        data = tensor_bytes(k[t0:t1]) + tensor_bytes(v[t0:t1])
        yield pb.KVChunk(request_id=request_id, layer=layer, block_start=b0, num_blocks=nb,
                         num_tokens=t1 - t0, dtype=dtype, shape=[2, t1 - t0, kvh, d],
                         crc32=zlib.crc32(data), data=data)


def decode_chunk(chunk: pb.KVChunk, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a chunk against the pool layout and its checksum; return k, v [n, KVH, D]."""
    if chunk.dtype != layout.dtype:
        raise IntegrityError(f"chunk dtype {chunk.dtype} != pool dtype {layout.dtype}")
    expect_shape = [2, chunk.num_tokens, layout.num_kv_heads, layout.head_dim]
    if list(chunk.shape) != expect_shape:
        raise IntegrityError(f"chunk shape {list(chunk.shape)} != expected {expect_shape}")
    if len(chunk.data) != 2 * chunk.num_tokens * layout.num_kv_heads * layout.head_dim * layout.itemsize:
        raise IntegrityError(f"chunk carries {len(chunk.data)} bytes, shape {expect_shape} needs more or fewer")
    if zlib.crc32(chunk.data) != chunk.crc32:
        raise IntegrityError(f"checksum mismatch in layer {chunk.layer} blocks {chunk.block_start}+{chunk.num_blocks}"
                             f" of request {chunk.request_id}")
    with warnings.catch_warnings():  # the buffer is read-only; we only copy out of it
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(chunk.data, dtype=torch.uint8)
    kv = raw.view(DTYPES[layout.dtype]).view(expect_shape)
    return kv[0], kv[1]


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")
