"""KV frames: protobuf-compatible both ways, payload checked and viewed in place."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVLayout
from kvtransfer.base import IntegrityError
from kvtransfer.wire import decode_chunk, encode_frames, encode_layer, parse_frame
from proto import kv_transfer_pb2 as pb

LAYOUT = KVLayout(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=3, head_dim=8, dtype="bfloat16")


def _kv(tokens: int):
    g = torch.Generator().manual_seed(tokens)
    return (torch.randn(tokens, 3, 8, generator=g).to(torch.bfloat16),
            torch.randn(tokens, 3, 8, generator=g).to(torch.bfloat16))


@pytest.mark.parametrize("tokens,chunk_bytes", [(1, 1 << 20), (37, 1 << 20), (200, 1600)])
def test_frames_are_kvchunk_messages_and_parse_back_without_copying(tokens, chunk_bytes):
    k, v = _kv(tokens)
    frames = list(encode_frames("r", 1, k, v, LAYOUT.block_size, chunk_bytes))
    got_k, got_v = [], []
    for raw in frames:
        frame = parse_frame(raw)
        standard = pb.KVChunk.FromString(raw)  # any protobuf peer reads the same message
        assert bytes(frame.data) == standard.data and frame.header.crc32 == standard.crc32
        assert frame.data.obj is raw  # a view into the received bytes
        fk, fv = decode_chunk(frame.header, LAYOUT, frame.data)
        got_k.append(fk)
        got_v.append(fv)
    assert torch.equal(torch.cat(got_k), k) and torch.equal(torch.cat(got_v), v)
    assert len(frames) == (1 if chunk_bytes > 1 << 16 else -(-tokens // 16))


def test_a_standard_protobuf_chunk_parses_too_and_damage_is_refused():
    k, v = _kv(20)
    chunk = next(encode_layer("r", 0, k, v, LAYOUT.block_size))
    raw = chunk.SerializeToString()
    frame = parse_frame(raw)
    assert bytes(frame.data) == chunk.data and frame.header.num_tokens == 20
    damaged = bytearray(raw)
    damaged[-1] ^= 0x10
    bad = parse_frame(bytes(damaged))
    with pytest.raises(IntegrityError, match="checksum"):
        decode_chunk(bad.header, LAYOUT, bad.data)
    with pytest.raises(IntegrityError, match="truncated"):
        parse_frame(raw[:-5])
    other = KVLayout(2, 64, 16, 3, 8, "float32")
    with pytest.raises(IntegrityError, match="dtype"):
        decode_chunk(frame.header, other, frame.data)
