"""int8 KV over the transports: values and scales arrive bit-exact through shared memory and gRPC, and a
peer with another KV dtype is refused before any byte moves, with the field named."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import BlockManager, KVLayout, as_stored
from kvtransfer.base import IncompatiblePeer, IntegrityError, KVEndpoint, connect
from kvtransfer.grpc_transport import GrpcConnection, KVServer
from kvtransfer.inbox import KVInbox
from kvtransfer.shm import SharedKVPool
from kvtransfer.wire import decode_chunk, decode_rows, encode_frames, encode_layer, parse_frame

TOKEN, FINGERPRINT = "t", "model-abc"


def layout(kv_cache_dtype: str = "int8", num_blocks: int = 128) -> KVLayout:
    return KVLayout(num_layers=4, num_blocks=num_blocks, block_size=16, num_kv_heads=3, head_dim=64,
                    dtype="bfloat16", kv_cache_dtype=kv_cache_dtype)


class Receiver:
    """A decode side without the model: a shared-memory pool, its inbox and its gRPC server."""

    def __init__(self, lay: KVLayout) -> None:
        self.shared = SharedKVPool(lay)
        self.pool = self.shared.pool
        self.blocks = BlockManager(lay.num_blocks, lay.block_size)
        self.inbox = KVInbox(self.pool)
        self.server = KVServer(self.inbox, receiver_id="d", model_fingerprint=FINGERPRINT, auth_token=TOKEN)
        self.endpoint = KVEndpoint("d", "node", lay, FINGERPRINT, grpc_address=self.server.address,
                                   shm_name=self.shared.name)

    def read(self, table: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Data [L, 2, tokens, KVH, D] and scales [L, 2, tokens, KVH] read back through the block table."""
        bs = self.pool.layout.block_size
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(tokens)])
        pool = self.pool
        return pool.tensor.flatten(2, 3).index_select(2, slots), pool.scales.flatten(2, 3).index_select(2, slots)

    def close(self) -> None:
        self.server.stop()
        self.pool = self.inbox.pool = None
        self.shared.close()


@pytest.fixture
def receiver():
    r = Receiver(layout())
    yield r
    r.close()


def quantized_kv(lay: KVLayout, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(lay.num_layers, 2, tokens, lay.num_kv_heads, lay.head_dim, generator=g).to(torch.bfloat16)
    return [as_stored(lay, kv[i, 0], kv[i, 1]) for i in range(lay.num_layers)]  # per layer: k, v, k_scale, v_scale


@pytest.mark.parametrize("transport", ["shm", "grpc"])
@pytest.mark.parametrize("tokens,first_block", [(37, 0), (1000, 0), (50, 2)])  # from block 2: a prefix hit
def test_int8_blocks_and_scales_arrive_bit_exact(receiver, transport, tokens, first_block):
    lay = receiver.pool.layout
    conn = connect(receiver.endpoint, transport, sender_id="p", auth_token=TOKEN, sender_layout=lay,
                   model_fingerprint=FINGERPRINT)
    try:
        receiver.blocks.allocate("other", 40)
        table = receiver.blocks.allocate("req", tokens)
        receiver.inbox.expect("req", table, tokens, first_block)
        layers = quantized_kv(lay, tokens)
        start = first_block * lay.block_size
        handle = conn.begin("req", table, tokens, first_block)
        for i, rows in enumerate(layers):
            conn.write_layer(handle, i, *(x[start:] for x in rows))
        stats = conn.finish(handle, timeout=30)
        sent = (tokens - start) * lay.bytes_per_token
        assert stats.bytes == sent  # int8 values + float32 scales: 68 bytes per token-head instead of 128
        assert receiver.inbox.is_complete("req") or transport == "shm"
        data, scales = receiver.read(table, tokens)
        for i, (k, v, ks, vs) in enumerate(layers):
            assert torch.equal(data[i, 0, start:], k[start:]) and torch.equal(data[i, 1, start:], v[start:])
            assert torch.equal(scales[i, 0, start:], ks[start:]) and torch.equal(scales[i, 1, start:], vs[start:])
        assert data[:, :, :start].count_nonzero() == 0 and scales[:, :, :start].count_nonzero() == 0
        other = receiver.read(receiver.blocks.table("other"), 40)
        assert other[0].count_nonzero() == 0 and other[1].count_nonzero() == 0  # neighbours untouched
    finally:
        conn.close()
        receiver.inbox.forget("req")
        for rid in ("other", "req"):
            receiver.blocks.free(rid)
    receiver.blocks.assert_empty()


def test_wire_frames_carry_the_scales_under_the_checksum():
    lay = layout()
    k, v, ks, vs = quantized_kv(lay, 40)[0]
    frames = [parse_frame(f) for f in encode_frames("r", 0, k, v, 16, max_chunk_bytes=4096, k_scale=ks, v_scale=vs)]
    assert len(frames) == 3 and all(f.header.dtype == "int8" for f in frames)
    got = [decode_rows(f.header, lay, f.data) for f in frames]
    for j, x in enumerate((k, v, ks, vs)):
        assert torch.equal(torch.cat([g[j] for g in got]), x)
    bad = bytearray(frames[0].data)
    bad[-1] ^= 1  # flip a bit of the last V scale
    with pytest.raises(IntegrityError, match="checksum"):
        decode_rows(frames[0].header, lay, bytes(bad))
    with pytest.raises(IntegrityError, match="kv_cache_dtype int8"):  # float rows at an int8 pool
        fk, fv = torch.zeros(16, 3, 64, dtype=torch.bfloat16), torch.zeros(16, 3, 64, dtype=torch.bfloat16)
        f = parse_frame(next(encode_frames("r", 0, fk, fv, 16)))
        decode_chunk(f.header, lay, f.data)
    with pytest.raises(ValueError, match="scales"):
        next(encode_frames("r", 0, k, v, 16))
    # the protobuf form (tools and tests that edit a chunk) carries the scales and the first block too
    chunks = list(encode_layer("r", 0, k, v, 16, max_chunk_bytes=4096, first_block=2, k_scale=ks, v_scale=vs))
    assert [c.block_start for c in chunks] == [2, 3, 4] and all(c.dtype == "int8" for c in chunks)
    for j, x in enumerate((k, v, ks, vs)):
        assert torch.equal(torch.cat([decode_rows(c, lay)[j] for c in chunks]), x)


@pytest.mark.parametrize("sender_kv,receiver_kv", [("auto", "int8"), ("int8", "auto")])
def test_a_peer_with_another_kv_dtype_is_refused_naming_the_field(sender_kv, receiver_kv):
    r = Receiver(layout(receiver_kv, num_blocks=8))
    try:
        theirs = layout(sender_kv)
        for transport in ("shm", "grpc"):
            with pytest.raises(IncompatiblePeer, match=f"kv_cache_dtype: {receiver_kv} != {sender_kv}"):
                connect(r.endpoint, transport, sender_id="p", auth_token=TOKEN, sender_layout=theirs,
                        model_fingerprint=FINGERPRINT)
        # The gRPC server refuses too, for a sender that skipped the local check.
        with pytest.raises(IncompatiblePeer, match=f"kv_cache_dtype: {receiver_kv} != {sender_kv}"):
            GrpcConnection(r.endpoint, sender_id="p", auth_token=TOKEN, sender_layout=theirs,
                           model_fingerprint=FINGERPRINT, timeout=10)
    finally:
        r.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA GPU; this machine has none")
def test_cuda_ipc_ships_int8_blocks_and_scales_bit_exact():
    import torch.multiprocessing as tmp

    from engine.kv_cache import KVPool
    from kvtransfer.cuda_ipc import export_pool

    lay = layout(num_blocks=32)
    pool = KVPool.allocate(lay, "cuda")
    endpoint = KVEndpoint("d", "n", lay, FINGERPRINT, cuda_ipc=export_pool(pool))
    layers = quantized_kv(lay, 100)
    table = list(range(10, 17))
    proc = tmp.get_context("spawn").Process(target=_cuda_sender, args=(endpoint, table, layers))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    bs = lay.block_size
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(100)], device="cuda")
    data, scales = pool.tensor.flatten(2, 3).index_select(2, slots), pool.scales.flatten(2, 3).index_select(2, slots)
    for i, (k, v, ks, vs) in enumerate(layers):
        assert torch.equal(data[i, 0].cpu(), k) and torch.equal(data[i, 1].cpu(), v)
        assert torch.equal(scales[i, 0].cpu(), ks) and torch.equal(scales[i, 1].cpu(), vs)


def _cuda_sender(endpoint, table, layers):
    conn = connect(endpoint, "cuda_ipc", sender_id="p", auth_token="", sender_layout=endpoint.layout,
                   model_fingerprint=FINGERPRINT)
    handle = conn.begin("r", table, layers[0][0].shape[0])
    for i, rows in enumerate(layers):
        conn.write_layer(handle, i, *(x.cuda() for x in rows))
    conn.finish(handle, timeout=30)
