"""KV transports: bit-exact delivery into reserved blocks, large caches, integrity, auth, compatibility."""

from __future__ import annotations

import subprocess

import grpc
import pytest
import torch

from engine.kv_cache import BlockManager, KVLayout
from kvtransfer.base import IncompatiblePeer, IntegrityError, KVEndpoint, Unauthenticated, connect
from kvtransfer.grpc_transport import AUTH_HEADER, GrpcConnection, KVServer
from kvtransfer.inbox import KVInbox
from kvtransfer.shm import SHM_DIR, SharedKVPool, segment_name, sweep_orphans
from kvtransfer.wire import encode_layer
from proto import kv_transfer_pb2 as pb
from proto import kv_transfer_pb2_grpc as pb_grpc

TOKEN = "secret-token"
FINGERPRINT = "model-abc"


def smollm_layout(num_blocks: int, dtype: str = "bfloat16") -> KVLayout:
    """The default model's KV shape: 30 layers, 3 KV heads, head_dim 64."""
    return KVLayout(num_layers=30, num_blocks=num_blocks, block_size=16, num_kv_heads=3, head_dim=64, dtype=dtype)


class Receiver:
    """A decode side without the model: a pool (in shared memory), its inbox and its gRPC server."""

    def __init__(self, layout: KVLayout) -> None:
        self.shared = SharedKVPool(layout)
        self.pool = self.shared.pool
        self.blocks = BlockManager(layout.num_blocks, layout.block_size)
        self.inbox = KVInbox(self.pool)
        self.server = KVServer(self.inbox, receiver_id="decode-test", model_fingerprint=FINGERPRINT,
                               auth_token=TOKEN, host="127.0.0.1")
        self.endpoint = KVEndpoint("decode-test", "node-a", layout, FINGERPRINT, grpc_address=self.server.address,
                                   shm_name=self.shared.name)

    def reserve(self, rid: str, tokens: int) -> list[int]:
        table = self.blocks.allocate(rid, tokens)
        self.inbox.expect(rid, table, tokens)
        return table

    def read(self, table: list[int], tokens: int) -> torch.Tensor:
        """[L, 2, tokens, KVH, D] gathered back from the pool through the block table."""
        bs = self.pool.layout.block_size
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(tokens)])
        flat = self.pool.tensor.flatten(2, 3)  # [L, 2, NB*BS, KVH, D]
        return flat.index_select(2, slots)

    def close(self) -> None:
        self.server.stop()
        self.pool = None
        self.inbox.pool = None
        self.shared.close()


@pytest.fixture
def receiver():
    r = Receiver(smollm_layout(num_blocks=256))
    yield r
    r.close()


def random_kv(layout: KVLayout, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.num_layers, 2, tokens, layout.num_kv_heads, layout.head_dim,
                       generator=g).to(layout.torch_dtype)


def send(conn, rid, table, kv):
    handle = conn.begin(rid, table, kv.shape[2])
    for layer in range(kv.shape[0]):
        conn.write_layer(handle, layer, kv[layer, 0], kv[layer, 1])
    return conn.finish(handle, timeout=30)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
@pytest.mark.parametrize("tokens", [1, 37, 1000])  # 1000 tokens of this shape: 23 MB > 4 MiB
def test_round_trip_is_bit_exact(receiver, transport, tokens):
    layout = receiver.pool.layout
    conn = connect(receiver.endpoint, transport, sender_id="prefill-test", auth_token=TOKEN,
                   sender_layout=layout, model_fingerprint=FINGERPRINT)
    try:
        # Occupy some blocks first, so the request's table does not start at block 0.
        receiver.reserve("other", 40)
        table = receiver.reserve("req", tokens)
        kv = random_kv(layout, tokens)
        stats = send(conn, "req", table, kv)
        assert stats.bytes == kv.numel() * kv.element_size()
        if transport == "grpc":
            assert receiver.inbox.is_complete("req")
        assert torch.equal(receiver.read(table, tokens).view(torch.int16), kv.view(torch.int16))
        assert receiver.read(receiver.blocks.table("other"), 40).abs().sum() == 0  # neighbours untouched
    finally:
        conn.close()
        for rid in ("other", "req"):
            receiver.inbox.forget(rid)
            receiver.blocks.free(rid)
    receiver.blocks.assert_empty()


def test_grpc_small_chunks_and_duplicates_are_harmless(receiver):
    layout = receiver.pool.layout
    conn = GrpcConnection(receiver.endpoint, sender_id="p", auth_token=TOKEN, sender_layout=layout,
                          model_fingerprint=FINGERPRINT, timeout=30, max_chunk_bytes=8 << 10)
    tokens = 300
    table = receiver.reserve("dup", tokens)
    kv = random_kv(layout, tokens, seed=4)
    handle = conn.begin("dup", table, tokens)
    for layer in range(layout.num_layers):
        conn.write_layer(handle, layer, kv[layer, 0], kv[layer, 1])
        if layer % 7 == 0:  # the same layer again: rewrites identical bytes
            conn.write_layer(handle, layer, kv[layer, 0], kv[layer, 1])
    conn.finish(handle, timeout=30)
    assert receiver.inbox.is_complete("dup")
    assert torch.equal(receiver.read(table, tokens), kv)
    conn.close()
    receiver.inbox.forget("dup")
    receiver.blocks.free("dup")
    receiver.blocks.assert_empty()


def _raw_push(endpoint, chunks, token=TOKEN):
    channel = grpc.insecure_channel(endpoint.grpc_address)
    try:
        return pb_grpc.KVTransferStub(channel).PushKV(iter(chunks), metadata=[(AUTH_HEADER, token)], timeout=10)
    finally:
        channel.close()


def test_corrupted_chunk_is_detected(receiver):
    layout = receiver.pool.layout
    table = receiver.reserve("bad", 20)
    kv = random_kv(layout, 20)
    chunk = next(encode_layer("bad", 0, kv[0, 0], kv[0, 1], layout.block_size))
    corrupted = pb.KVChunk()
    corrupted.CopyFrom(chunk)
    corrupted.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
    with pytest.raises(grpc.RpcError) as err:
        _raw_push(receiver.endpoint, [corrupted])
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "checksum" in err.value.details()
    assert receiver.read(table, 20).abs().sum() == 0  # nothing written
    # A chunk aimed outside the reservation is refused too.
    outside = pb.KVChunk()
    outside.CopyFrom(chunk)
    outside.block_start = 5
    with pytest.raises(grpc.RpcError) as err:
        _raw_push(receiver.endpoint, [outside])
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "outside" in err.value.details()
    receiver.inbox.forget("bad")
    receiver.blocks.free("bad")
    receiver.blocks.assert_empty()


def test_corruption_surfaces_as_a_typed_error_on_the_sender(receiver, monkeypatch):
    import kvtransfer.grpc_transport as gt

    real = gt.encode_frames

    def flip(*args, **kwargs):
        for frame in real(*args, **kwargs):
            yield frame[:-1] + bytes([frame[-1] ^ 1])  # one bit of the payload's last byte

    monkeypatch.setattr(gt, "encode_frames", flip)
    layout = receiver.pool.layout
    conn = GrpcConnection(receiver.endpoint, sender_id="p", auth_token=TOKEN, sender_layout=layout,
                          model_fingerprint=FINGERPRINT, timeout=10)
    table = receiver.reserve("r", 20)
    with pytest.raises(IntegrityError):
        send(conn, "r", table, random_kv(layout, 20))
    conn.close()
    receiver.inbox.forget("r")
    receiver.blocks.free("r")


def test_unauthenticated_sender_is_refused(receiver):
    layout = receiver.pool.layout
    with pytest.raises(Unauthenticated):
        GrpcConnection(receiver.endpoint, sender_id="intruder", auth_token="wrong", sender_layout=layout,
                       model_fingerprint=FINGERPRINT, timeout=10)
    receiver.reserve("x", 16)
    kv = random_kv(layout, 16)
    with pytest.raises(grpc.RpcError) as err:
        _raw_push(receiver.endpoint, list(encode_layer("x", 0, kv[0, 0], kv[0, 1], 16)), token="wrong")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert receiver.read(receiver.blocks.table("x"), 16).abs().sum() == 0
    receiver.inbox.forget("x")
    receiver.blocks.free("x")


@pytest.mark.parametrize("change", [{"block_size": 32}, {"dtype": "float32"}, {"head_dim": 32}])
def test_mismatched_pair_is_refused_at_connection(receiver, change):
    theirs = KVLayout(**{**receiver.pool.layout.__dict__, **change})
    with pytest.raises(IncompatiblePeer, match=next(iter(change))):
        connect(receiver.endpoint, "grpc", sender_id="p", auth_token=TOKEN, sender_layout=theirs,
                model_fingerprint=FINGERPRINT)
    # The server refuses too, for a sender that skipped the local check.
    with pytest.raises(IncompatiblePeer, match=next(iter(change))):
        GrpcConnection(receiver.endpoint, sender_id="p", auth_token=TOKEN, sender_layout=theirs,
                       model_fingerprint=FINGERPRINT, timeout=10)


def test_different_model_is_refused(receiver):
    with pytest.raises(IncompatiblePeer, match="model"):
        GrpcConnection(receiver.endpoint, sender_id="p", auth_token=TOKEN, sender_layout=receiver.pool.layout,
                       model_fingerprint="another-model", timeout=10)


def test_shared_pool_survives_an_attacher_closing():
    layout = smollm_layout(num_blocks=4, dtype="float32")
    owner = SharedKVPool(layout)
    owner.pool.tensor.fill_(1.5)
    peer = SharedKVPool(layout, owner.name)
    assert torch.equal(peer.pool.tensor, owner.pool.tensor)
    peer.pool.tensor[0, 0, 0].fill_(7.0)
    assert float(owner.pool.tensor[0, 0, 0, 0, 0, 0]) == 7.0  # one memory, two views
    peer.close()
    again = SharedKVPool(layout, owner.name)  # still there after the attacher left
    assert float(again.pool.tensor[0, 0, 0, 0, 0, 0]) == 7.0
    again.close()
    owner.close()


def test_owner_close_unlinks_even_while_a_view_is_alive():
    owner = SharedKVPool(smollm_layout(num_blocks=4, dtype="float32"))
    view = owner.pool.tensor[0]  # keeps the mapping alive: close() cannot unmap
    owner.close()
    assert not (SHM_DIR / owner.name).exists(), "the name must go even when the mapping cannot"
    assert view.numel() > 0  # the memory stays valid for whoever still holds it


def test_orphaned_pool_of_a_dead_worker_is_swept():
    """A decode worker killed outright never closes its pool; the next pool on the node unlinks it."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    orphan = SHM_DIR / segment_name(dead.pid)
    orphan.write_bytes(b"\0" * 4096)  # /dev/shm is where POSIX shared memory lives
    live = SharedKVPool(smollm_layout(num_blocks=4, dtype="float32"))
    try:
        assert not orphan.exists(), "a pool whose owner is dead must be unlinked"
        assert (SHM_DIR / live.name).exists()
        assert sweep_orphans() == []  # the live pool (this process) is left alone
        assert (SHM_DIR / live.name).exists()
    finally:
        live.close()
        orphan.unlink(missing_ok=True)
