"""KV chunks on the wire: whole blocks of one layer, with a checksum, under a size cap.

A request's K/V for one layer is [num_tokens, KVH, D], token-major. It is cut
at block boundaries into chunks of at most `max_chunk_bytes`; only valid
tokens travel (the last block may be partial), so the receiver rebuilds the
exact bytes the sender computed.

Each chunk is a serialized `KVChunk` message, but neither side lets protobuf
hold the payload (it copies it in and out, several times):

    frame = KVChunk(header fields, crc32).SerializeToString() | tag 9 | varint len | K bytes | V bytes
                                                                                   [| K scales | V scales]

An int8 pool's chunk (dtype "int8") carries the int8 values as stored and then each token's per-head
float32 scales ([n, KVH] for K, then for V) under the same checksum: a block travels with its scales.

The sender writes a frame with one copy out of the tensors; the receiver finds
field 9 by walking the few header fields and checks and reads the payload as
a view into the received message. Any protobuf peer can still parse a frame.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.config import DTYPE_NAMES, torch_dtype
from engine.kv_cache import SCALE_BYTES, KVLayout
from kvtransfer.base import IntegrityError
from proto import kv_transfer_pb2 as pb

try:  # ISA-L's CRC-32 (PCLMUL): the same checksum as zlib's, several times faster
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives identical values
    from zlib import crc32

DEFAULT_MAX_CHUNK_BYTES = 1 << 20  # see pdserve/bench/kvtransfer.py --chunk-kib for the measurement
_DATA_FIELD = 9
_DATA_TAG = bytes([_DATA_FIELD << 3 | 2])  # field 9, length-delimited


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _buffer(t: torch.Tensor) -> memoryview:
    """A byte view of a tensor's memory (copied only when it is not contiguous)."""
    return memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy())


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _chunks(k: torch.Tensor, block_size: int, max_chunk_bytes: int,
            scaled: bool = False) -> Iterator[tuple[int, int, int, int]]:
    """(first block, blocks, first token, end token) of each chunk of a layer."""
    num_tokens, kvh, d = k.shape
    bytes_per_block = 2 * block_size * kvh * (d * k.element_size() + (SCALE_BYTES if scaled else 0))
    blocks_per_chunk = max(1, max_chunk_bytes // bytes_per_block)
    num_blocks = -(-num_tokens // block_size)
    for b0 in range(0, num_blocks, blocks_per_chunk):
        nb = min(blocks_per_chunk, num_blocks - b0)
        yield b0, nb, b0 * block_size, min((b0 + nb) * block_size, num_tokens)


def encode_frames(request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor, block_size: int,
                  max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, first_block: int = 0,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> Iterator[bytes]:
    """k, v: [num_tokens, KVH, D] (int8: with scales [num_tokens, KVH] float32) -> serialized KVChunk frames,
    payload copied once, straight from the tensors. The tokens start at block `first_block` of the
    request (the receiver already holds the blocks before)."""
    _, kvh, d = k.shape
    dtype = _dtype_name(k.dtype)
    if (dtype == "int8") != (k_scale is not None):
        raise ValueError("int8 KV travels with its scales, float KV without")
    for b0, nb, t0, t1 in _chunks(k, block_size, max_chunk_bytes, k_scale is not None):
        parts = [_buffer(k[t0:t1]), _buffer(v[t0:t1])]
        if k_scale is not None:
            parts += [_buffer(k_scale[t0:t1].float()), _buffer(v_scale[t0:t1].float())]
        crc = 0
        for part in parts:
            crc = crc32(part, crc)
        head = pb.KVChunk(request_id=request_id, layer=layer, block_start=first_block + b0, num_blocks=nb,
                          num_tokens=t1 - t0, dtype=dtype, shape=[2, t1 - t0, kvh, d], crc32=crc)
        yield b"".join((head.SerializeToString(), _DATA_TAG, _varint(sum(p.nbytes for p in parts)), *parts))


def encode_layer(request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor, block_size: int,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, first_block: int = 0,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> Iterator[pb.KVChunk]:
    """The same chunks as `encode_frames` (same arguments), as protobuf messages (tests and tools that
    edit a chunk)."""
    for frame in encode_frames(request_id, layer, k, v, block_size, max_chunk_bytes, first_block, k_scale, v_scale):
        yield pb.KVChunk.FromString(frame)


@dataclass(frozen=True)
class Frame:
    """A received KVChunk: its header fields parsed, its payload a view into the received bytes."""

    header: pb.KVChunk
    data: memoryview


def _read_varint(raw: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(raw) or shift > 63:
            raise IntegrityError("truncated or malformed KV chunk")
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def parse_frame(raw: bytes) -> Frame:
    """gRPC's request deserializer for PushKV: split off field 9 without copying it."""
    i = 0
    while i < len(raw):
        key, j = _read_varint(raw, i)
        wire_type = key & 7
        if wire_type == 0:
            _, end = _read_varint(raw, j)
        elif wire_type == 2:
            length, start = _read_varint(raw, j)
            end = start + length
            if end > len(raw):
                raise IntegrityError("truncated KV chunk")
            if key >> 3 == _DATA_FIELD:
                return Frame(pb.KVChunk.FromString(raw[:i] + raw[end:]), memoryview(raw)[start:end])
        elif wire_type in (1, 5):
            end = j + (8 if wire_type == 1 else 4)
        else:
            raise IntegrityError(f"malformed KV chunk (wire type {wire_type})")
        i = end
    return Frame(pb.KVChunk.FromString(raw), memoryview(b""))


def decode_chunk(chunk: pb.KVChunk, layout: KVLayout,
                 data: memoryview | bytes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a chunk against the pool layout and its checksum; return k, v [n, KVH, D] viewing its payload
    (an int8 chunk's scales: `decode_rows`)."""
    return decode_rows(chunk, layout, data)[:2]


def decode_rows(chunk: pb.KVChunk, layout: KVLayout, data: memoryview | bytes | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check a chunk against the pool layout and its checksum; return k, v [n, KVH, D] and, for an int8 pool,
    k_scale, v_scale [n, KVH] (else None), all viewing its payload.

    `data`: the payload when it travels apart from the message (a `Frame`); else `chunk.data`."""
    data = chunk.data if data is None else data
    if chunk.dtype != layout.storage_dtype:
        raise IntegrityError(f"chunk dtype {chunk.dtype} != pool dtype {layout.storage_dtype} "
                             f"(kv_cache_dtype {layout.kv_cache_dtype})")
    if not 0 <= chunk.layer < layout.num_layers:
        raise IntegrityError(f"layer {chunk.layer} out of range for {layout.num_layers} layers")
    spec = layout.layer(chunk.layer)
    n, kvh, d = chunk.num_tokens, spec.num_kv_heads, spec.head_dim
    expect_shape = [2, n, kvh, d]
    if list(chunk.shape) != expect_shape:
        raise IntegrityError(f"chunk shape {list(chunk.shape)} != expected {expect_shape}")
    values = 2 * n * kvh * d * layout.itemsize
    scales = 2 * n * kvh * SCALE_BYTES if layout.quantized else 0
    if len(data) != values + scales:
        raise IntegrityError(f"chunk carries {len(data)} bytes, shape {expect_shape} needs more or fewer")
    if crc32(data) != chunk.crc32:
        raise IntegrityError(f"checksum mismatch in layer {chunk.layer} blocks {chunk.block_start}+{chunk.num_blocks}"
                             f" of request {chunk.request_id}")
    if not data:
        empty = torch.empty([0, kvh, d], dtype=layout.torch_dtype)
        no_scales = torch.empty([0, kvh]) if layout.quantized else None
        return empty, empty, no_scales, no_scales
    with warnings.catch_warnings():  # the buffer is read-only; we only copy out of it
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8)
    kv = raw[:values].view(layout.torch_dtype).view(expect_shape)
    if not layout.quantized:
        return kv[0], kv[1], None, None
    sc = raw[values:].view(torch.float32).view(2, n, kvh)
    return kv[0], kv[1], sc[0], sc[1]


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype == torch.int8:
        return "int8"
    for name in DTYPE_NAMES:
        if torch_dtype(name) == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")
