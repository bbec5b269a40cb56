"""KV into a tensor-parallel decode worker (kvtransfer/reshard.py): each rank's pool receives exactly its KV
heads, bit for bit (int8 scales with their heads), over shared memory (the sender maps every rank's pool) and
gRPC (rank 0's inbox writes through the same split); untiled head ranges and other layouts are refused at
once, naming both sides' layouts."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from engine.kv_cache import BlockManager, KVLayout, KVPool, as_stored
from engine.parallel import HeadRange
from kvtransfer.base import IncompatiblePeer, KVEndpoint, connect
from kvtransfer.grpc_transport import KVServer
from kvtransfer.inbox import KVInbox
from kvtransfer.reshard import HeadShardedPool, rank_layout, shard_of
from kvtransfer.shm import SharedKVPool
from proto.kinds import Transport
from proto.messages import KVShard
from tests.kvtransfer.test_transport import FINGERPRINT, TOKEN, random_kv, send, smollm_layout

SPLITS = {  # ranks' KV heads of the default model's 3
    "1+2": [HeadRange(0, 1, 3), HeadRange(1, 2, 3)],
    "1+1+1": [HeadRange(0, 1, 3), HeadRange(1, 1, 3), HeadRange(2, 1, 3)],
    "whole": [HeadRange(0, 3, 3)],
}


class RankedReceiver:
    """A decode worker of several ranks without the model: one shared-memory pool per rank, rank 0's inbox
    and gRPC server writing through a HeadShardedPool."""

    def __init__(self, layout: KVLayout, heads: list[HeadRange]) -> None:
        self.layout, self.heads = layout, heads
        self.shared = [SharedKVPool(rank_layout(layout, h)) for h in heads]
        self.sharded = HeadShardedPool([(s.pool, h) for s, h in zip(self.shared, heads)])
        self.blocks = BlockManager(layout.num_blocks, layout.block_size)
        self.inbox = KVInbox(self.sharded)
        self.server = KVServer(self.inbox, receiver_id="decode-tp", model_fingerprint=FINGERPRINT,
                               auth_token=TOKEN, host="127.0.0.1")
        self.endpoint = KVEndpoint("decode-tp", "node-a", layout, FINGERPRINT, grpc_address=self.server.address,
                                   shm_name=self.shared[0].name,
                                   shards=tuple(shard_of(h, s.name) for h, s in zip(heads, self.shared)))

    def reserve(self, rid: str, tokens: int) -> list[int]:
        table = self.blocks.allocate(rid, tokens)
        self.inbox.expect(rid, table, tokens)
        return table

    def read(self, rank: int, table: list[int], tokens: int) -> torch.Tensor:
        """[L, 2, tokens, KVH_rank, D] of rank `rank`'s pool."""
        pool = self.shared[rank].pool
        bs = pool.layout.block_size
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(tokens)])
        return pool.tensor.flatten(2, 3).index_select(2, slots)

    def close(self) -> None:
        self.server.stop()
        self.inbox.pool = self.sharded = None
        for s in self.shared:
            s.close()


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("transport", [Transport.SHM, Transport.GRPC])
def test_each_rank_receives_exactly_its_heads(split, transport):
    layout = smollm_layout(num_blocks=64)
    recv = RankedReceiver(layout, SPLITS[split])
    try:
        conn = connect(recv.endpoint, transport, sender_id="prefill-0", auth_token=TOKEN, sender_layout=layout,
                       model_fingerprint=FINGERPRINT)
        kv = random_kv(layout, 37, seed=3)
        table = recv.reserve("r1", 37)
        send(conn, "r1", table, kv)
        assert transport == Transport.SHM or recv.inbox.is_complete("r1")
        for rank, h in enumerate(recv.heads):
            assert torch.equal(recv.read(rank, table, 37), kv[:, :, :, h.start:h.stop]), f"rank {rank} heads {h}"
        conn.close()
    finally:
        recv.close()


def test_int8_scales_travel_with_their_heads():
    layout = replace(smollm_layout(num_blocks=16, dtype="float32"), kv_cache_dtype="int8")
    heads = SPLITS["1+2"]
    parts = [KVPool.allocate(rank_layout(layout, h)) for h in heads]
    whole = KVPool.allocate(layout)
    sharded = HeadShardedPool(list(zip(parts, heads)))
    kv = random_kv(replace(layout, kv_cache_dtype="auto"), 20, seed=4)
    runs = [(5 * 16, 0, 20)]  # blocks 5.. of the pool
    for layer in range(layout.num_layers):
        stored = as_stored(layout, kv[layer, 0], kv[layer, 1])
        sharded.write_runs(layer, runs, *stored)
        whole.write_runs(layer, runs, *stored)
    for pool, h in zip(parts, heads):
        for layer in (0, 29):
            assert torch.equal(pool.layer(layer), whole.layer(layer)[..., h.start:h.stop, :])
            for mine, ref in zip(pool.layer_scales(layer), whole.layer_scales(layer)):
                assert torch.equal(mine, ref[..., h.start:h.stop])


@pytest.mark.parametrize(("shards", "what"), [
    ((KVShard(0, 1, 3, "a"), KVShard(0, 1, 3, "b")), r"KV heads \[1, 2\] are held by no rank"),
    ((KVShard(0, 2, 3, "a"), KVShard(2, 2, 3, "b")), "holds KV heads 2..4 of 3"),
])
def test_untiled_ranks_are_refused_at_once_naming_both_layouts(shards, what):
    layout = smollm_layout(num_blocks=8)
    endpoint = KVEndpoint("decode-tp", "node-a", layout, FINGERPRINT, shards=shards)
    started = time.monotonic()
    with pytest.raises(IncompatiblePeer, match=what) as refused:
        connect(endpoint, Transport.SHM, sender_id="prefill-0", auth_token=TOKEN, sender_layout=layout,
                model_fingerprint=FINGERPRINT)
    assert time.monotonic() - started < 10
    assert "sender: 30 layers x 3 KV heads" in str(refused.value)
    ranges = " ".join(f"[{s.head_start},{s.head_start + s.head_count})" for s in shards)
    assert f"receiver: 30 layers x 3 KV heads x 64, block 16, bfloat16/auto, ranks hold heads {ranges}" in str(
        refused.value)


def test_a_sender_of_another_head_count_is_refused_naming_both():
    """A sender whose layout has one rank's heads (not gathered) cannot be resharded: refused, both named."""
    layout = smollm_layout(num_blocks=8)
    endpoint = KVEndpoint("decode-tp", "node-a", layout, FINGERPRINT,
                          shards=(KVShard(0, 1, 3, "a"), KVShard(1, 2, 3, "b")))
    with pytest.raises(IncompatiblePeer, match="num_kv_heads: 3 != 1") as refused:
        connect(endpoint, Transport.GRPC, sender_id="prefill-0", auth_token=TOKEN,
                sender_layout=replace(layout, num_kv_heads=1), model_fingerprint=FINGERPRINT)
    assert "sender: 30 layers x 1 KV heads" in str(refused.value)
    assert "ranks hold heads [0,1) [1,3)" in str(refused.value)
