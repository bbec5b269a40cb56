"""The KV layout per layer (issue 26, item 3): a pool, the wire and the handshake carry each layer's KV
heads, head dim and window, so caches whose layers differ move between workers like any other."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import BlockManager, KVLayout, KVPool, LayerKV
from kvtransfer.base import IncompatiblePeer, IntegrityError, KVEndpoint, connect
from kvtransfer.grpc_transport import GrpcConnection, KVServer
from kvtransfer.inbox import KVInbox
from kvtransfer.shm import SharedKVPool
from kvtransfer.wire import decode_rows, encode_layer

TOKEN, FINGERPRINT = "t", "model"
# Three layers that differ: 2 heads of 8 with a window, 1 head of 16 global, 4 heads of 4 with a window.
LAYERS = (LayerKV(2, 8, window=16), LayerKV(1, 16), LayerKV(4, 4, window=16))


def layout(num_blocks: int = 16, kv_cache_dtype: str = "auto", layers=LAYERS) -> KVLayout:
    return KVLayout(3, num_blocks, 4, 2, 8, "float32", kv_cache_dtype, layers)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_pool_regions_per_layer(kv_cache_dtype):
    lay = layout(kv_cache_dtype=kv_cache_dtype)
    pool = KVPool.allocate(lay)
    assert not lay.uniform and pool.tensor is None
    assert [tuple(pool.layer(i).shape) for i in range(3)] == [(2, 16, 4, 2, 8), (2, 16, 4, 1, 16), (2, 16, 4, 4, 4)]
    itemsize, scales = (1, 4) if kv_cache_dtype == "int8" else (4, 0)
    per_token = 2 * sum(s.num_kv_heads * (s.head_dim * itemsize + scales) for s in LAYERS)
    assert lay.bytes_per_token == per_token and lay.nbytes == 16 * 4 * per_token == pool.buffer.numel()
    for i in range(3):  # each layer's region is its own: writing one leaves the others as they were
        pool.layer(i).fill_(i + 1)
        if kv_cache_dtype == "int8":
            pool.layer_scales(i)[0].fill_(10.0 + i)
    for i in range(3):
        assert bool((pool.layer(i) == i + 1).all())
        if kv_cache_dtype == "int8":
            assert bool((pool.layer_scales(i)[0] == 10.0 + i).all())


def test_a_uniform_layout_keeps_its_single_tensor():
    lay = KVLayout(3, 8, 4, 2, 8, "float32", layers=(LayerKV(2, 8, 16), LayerKV(2, 8), LayerKV(2, 8, 16)))
    pool = KVPool.allocate(lay)
    assert lay.uniform and lay.kv_window is None and pool.tensor.shape == (3, 2, 8, 4, 2, 8)
    for i in range(3):
        assert pool.layer(i).data_ptr() == pool.tensor[i].data_ptr()
    assert KVLayout(3, 8, 4, 2, 8, "float32", layers=(LayerKV(2, 8, 16), LayerKV(2, 8, 32),
                                                     LayerKV(2, 8, 16))).kv_window == 32


def test_wire_chunks_carry_their_layers_shape():
    lay = layout()
    k, v = torch.randn(10, 1, 16), torch.randn(10, 1, 16)
    chunk = next(encode_layer("r", 1, k, v, 4))
    got_k, got_v, _, _ = decode_rows(chunk, lay)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    with pytest.raises(IntegrityError, match="shape"):
        decode_rows(next(encode_layer("r", 0, k, v, 4)), lay)  # layer 0 has 2 heads of 8
    with pytest.raises(IntegrityError, match="layer 5"):
        decode_rows(next(encode_layer("r", 5, k, v, 4)), lay)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_round_trip_of_a_layout_whose_layers_differ(transport):
    lay = layout()
    shared = SharedKVPool(lay)
    inbox = KVInbox(shared.pool)
    server = KVServer(inbox, receiver_id="d", model_fingerprint=FINGERPRINT, auth_token=TOKEN)
    try:
        endpoint = KVEndpoint("d", "n", lay, FINGERPRINT, grpc_address=server.address, shm_name=shared.name)
        blocks = BlockManager(lay.num_blocks, lay.block_size)
        table = blocks.allocate("r", 23)
        inbox.expect("r", table, 23, first_block=2)  # blocks 0-1: before the window, not sent
        conn = connect(endpoint, transport, sender_id="p", auth_token=TOKEN, sender_layout=layout(1),
                       model_fingerprint=FINGERPRINT)
        gen = torch.Generator().manual_seed(0)
        sent = [(torch.randn(15, s.num_kv_heads, s.head_dim, generator=gen),
                 torch.randn(15, s.num_kv_heads, s.head_dim, generator=gen)) for s in LAYERS]
        handle = conn.begin("r", table, 23, first_block=2)
        for i, (k, v) in enumerate(sent):
            conn.write_layer(handle, i, k, v)
        stats = conn.finish(handle, timeout=30)
        conn.close()
        assert stats.bytes == 15 * lay.bytes_per_token
        assert transport == "shm" or inbox.is_complete("r")
        for i, (k, v) in enumerate(sent):
            s = LAYERS[i]
            flat = shared.pool.layer(i).view(2, -1, s.num_kv_heads, s.head_dim)
            slots = torch.tensor([table[p // 4] * 4 + p % 4 for p in range(8, 23)])
            assert torch.equal(flat[0, slots], k) and torch.equal(flat[1, slots], v)
        inbox.forget("r")
        blocks.free("r")
        blocks.assert_empty()
    finally:
        server.stop()
        inbox.pool = None
        shared.close()


def test_handshake_refuses_a_peer_whose_layers_differ():
    lay = layout()
    shared = SharedKVPool(lay)
    inbox = KVInbox(shared.pool)
    server = KVServer(inbox, receiver_id="d", model_fingerprint=FINGERPRINT, auth_token=TOKEN)
    try:
        endpoint = KVEndpoint("d", "n", lay, FINGERPRINT, grpc_address=server.address, shm_name=shared.name)
        other = layout(1, layers=(LayerKV(2, 8), LayerKV(1, 16), LayerKV(4, 4, window=16)))  # layer 0 global
        with pytest.raises(IncompatiblePeer, match="layer 0"):
            connect(endpoint, "shm", sender_id="p", auth_token=TOKEN, sender_layout=other,
                    model_fingerprint=FINGERPRINT)
        # The server refuses too, for a sender that skipped the local check; it names the field that differs.
        with pytest.raises(IncompatiblePeer, match="layer 0: window 16 != 0"):
            GrpcConnection(endpoint, sender_id="p", auth_token=TOKEN, sender_layout=other,
                           model_fingerprint=FINGERPRINT, timeout=10)
        uniform = KVLayout(3, 1, 4, 2, 8, "float32")  # a peer from before per-layer specs: no layers sent
        with pytest.raises(IncompatiblePeer, match="layer 0: window 16 != 0"):
            GrpcConnection(endpoint, sender_id="p", auth_token=TOKEN, sender_layout=uniform,
                           model_fingerprint=FINGERPRINT, timeout=10)
        GrpcConnection(endpoint, sender_id="p", auth_token=TOKEN, sender_layout=layout(1),
                       model_fingerprint=FINGERPRINT, timeout=10).close()
    finally:
        server.stop()
        inbox.pool = None
        shared.close()
