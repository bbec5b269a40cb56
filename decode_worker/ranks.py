"""A worker that spans tensor-parallel ranks (engine/parallel/): how each rank starts, and the followers.

    rank 0: the PrefillWorker / DecodeWorker / ColocatedWorker the router talks to (one endpoint per worker);
            its ModelRunner is a DriverRunner that broadcasts each forward call before running it
    rank r: a FollowerRank: the same model share loading, its own KV pool (decode roles), then `follow`

Start-up order is the same on every rank, so the collectives meet: join the group, load this rank's share,
exchange each rank's pool (`exchange_pools`), then one forward per broadcast call. A decode worker's ranks
each own a shared-memory pool of their KV heads; rank 0 maps its followers' pools so that its gRPC inbox can
write every head (kvtransfer/reshard.py), and its endpoint lists them all for shared-memory senders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.compute_thread import ComputeThread
from engine.kv_cache import KVLayout, KVPool
from engine.parallel import TensorParallel, init_tensor_parallel
from engine.parallel.follow import follow
from engine.runner import ModelRunner
from kvtransfer.reshard import HeadShardedPool, heads_of, rank_layout, shard_of, whole_layout
from proto.messages import KVShard, WorkerConfig

log = logging.getLogger("pdserve.ranks")

POOL = "kv"  # the name a decode-side pool goes by in broadcast calls


class TensorParallelRefused(ValueError):
    """A setting tensor parallelism does not run with yet; said at start-up."""


def start_rank(compute: ComputeThread, config: WorkerConfig, role: str) -> tuple[TensorParallel, ModelRunner]:
    """Join this worker's group (degree 1: nothing to join) and load this rank's share of the model, both
    on the compute thread (every collective of this process runs there)."""
    spec, engine = config.tensor_parallel, config.engine
    if spec.size > 1:
        device = engine.resolved().device
        if role != "prefill" and device != "cpu":
            raise TensorParallelRefused(f"a {role} worker of tensor parallel size {spec.size} runs on a CPU only "
                                        f"for now (its ranks' pools are shared memory); got device {device}")
        if role != "prefill" and engine.speculative not in ("", "off"):
            raise TensorParallelRefused(f"--speculative {engine.speculative} with decode tensor parallel size "
                                        f"{spec.size}: speculative decoding runs at size 1 only for now")
    tp = compute.call(init_tensor_parallel, spec.rank, spec.size, spec.address, engine.resolved().device)
    return tp, compute.call(ModelRunner, engine, None, tp)


@dataclass
class RankPools:
    """Rank 0's view of a decode worker's pools: what senders see (`layout` of every head, `shards`) and
    where arriving KV goes (`inbox_pool`: every rank's pool, by head)."""

    layout: KVLayout
    shards: tuple[KVShard, ...]
    inbox_pool: KVPool | HeadShardedPool
    mapped: list  # the followers' SharedKVPools, mapped here (closed at shutdown)

    def close(self) -> None:
        for m in self.mapped:
            m.close()


def exchange_pools(tp: TensorParallel, runner: ModelRunner, shm_name: str | None,
                   own: KVPool | None = None) -> RankPools | None:
    """Every rank says which KV heads its pool holds and where it lives; rank 0 (with `own`, its pool)
    maps the others' and returns the worker's RankPools. Called once per rank, at start, on its compute thread."""
    shards = tp.gather_objects(shard_of(runner.shard.kv_heads, shm_name))
    if not tp.is_driver or own is None:
        return None
    layout = whole_layout(own.layout, runner.shard.arch.num_kv_heads)
    if tp.size == 1:
        return RankPools(own.layout, (), own, [])
    from kvtransfer.shm import SharedKVPool

    mapped = [SharedKVPool(rank_layout(layout, heads_of(s)), s.shm_name) for s in shards[1:]]
    parts = [(own, heads_of(shards[0]))] + [(m.pool, heads_of(s)) for m, s in zip(mapped, shards[1:])]
    return RankPools(layout, tuple(shards), HeadShardedPool(parts), mapped)


class FollowerRank:
    """Rank r > 0 of a worker: loads its share, holds its own pool (decode roles), runs rank 0's calls."""

    def __init__(self, config: WorkerConfig, role: str) -> None:
        self.worker_id = f"{config.worker_id}/rank{config.tensor_parallel.rank}"
        self.compute = ComputeThread(config.engine.num_threads, name=self.worker_id)
        tp, self.runner = start_rank(self.compute, config, role)
        self._shared = None
        pools = {}
        if role != "prefill":
            from kvtransfer.shm import SharedKVPool

            self._shared = self.compute.call(SharedKVPool, self.runner.kv_layout())
            pools[POOL] = self._shared.pool
        self.compute.call(exchange_pools, tp, self.runner, self._shared.name if self._shared else None)
        self._following = self.compute.submit(follow, self.runner, tp, pools)

    def calls(self) -> int | None:
        """Forward calls run, once rank 0 has stopped the group; None while it runs."""
        return self._following.result() if self._following.done() else None

    def shutdown(self) -> None:
        if self._shared is not None and self._following.done():
            self._shared.close()
        self.compute.shutdown()
