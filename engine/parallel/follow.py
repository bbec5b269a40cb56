"""Rank 0 drives, the other ranks follow: each forward's inputs are broadcast once, then every rank runs it.

    rank 0 (the worker the router talks to)          ranks 1..P-1 (`follow`)
    DriverRunner.decode(pool, tokens, ...)            call = broadcast()        <- StepCall, pools by name
      broadcast(StepCall("decode", ...)) ------->     runner.decode(own pool, tokens, ...)
      runner.decode(pool, tokens, ...)                (all-reduces inside the forward meet rank 0's)
    DriverRunner.stop()  -- broadcast(None) ---->     return

A KV pool never travels: each rank holds its own pool of its KV heads under the same block ids, and a call
names the pool (`PoolRef`). A prefill's KV sink runs on every rank around an all-gather of the heads
(`gathered_sink`): rank 0 hands the whole head range to its transport, the followers only take part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.attention import KVSink
from engine.kv_cache import KVPool
from engine.parallel.group import TensorParallel
from engine.parallel.shard import ShardPlan


@dataclass(frozen=True)
class PoolRef:
    """A pool by name: each rank substitutes its own pool of that name."""

    name: str


@dataclass(frozen=True)
class StepCall:
    """One ModelRunner call as broadcast to the followers."""

    method: str  # prefill | extend | mixed | decode
    args: tuple
    kwargs: dict
    gather_kv: bool = False  # the call has a KV sink: every rank joins its per-layer all-gather


FORWARDS = ("prefill", "extend", "mixed", "decode")


def gathered_sink(tp: TensorParallel, plan: ShardPlan, sink: KVSink | None) -> KVSink:
    """A KV sink every rank runs: each layer's K/V [T, KVH_rank, D] gathered into all KV heads
    [T, KVH, D] (each head taken from the first rank holding it), passed to `sink` (rank 0's transport)."""
    if tp.size == 1:
        return sink if sink is not None else (lambda layer, k, v: None)
    total = plan.arch.num_kv_heads
    ranges = [ShardPlan.of(plan.arch, r, tp.size).kv_heads for r in range(tp.size)]
    source = [next((r, h - rng.start) for r, rng in enumerate(ranges) if rng.start <= h < rng.stop)
              for h in range(total)]

    widest = max(rng.count for rng in ranges)

    def gather(x: torch.Tensor) -> torch.Tensor:  # ranks may hold unequal head counts: padded to the widest
        if x.shape[1] < widest:
            x = torch.cat([x, x.new_zeros((x.shape[0], widest - x.shape[1], *x.shape[2:]))], dim=1)
        parts = [torch.empty_like(x) for _ in range(tp.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=tp.group)
        return torch.stack([parts[r][:, i] for r, i in source], dim=1)

    def run(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = gather(k), gather(v)
        if sink is not None:
            sink(layer, k, v)

    return run


class DriverRunner:
    """Rank 0's ModelRunner: broadcasts each forward call, then runs it; everything else (arch, folder,
    config, kv_layout...) is the runner's own. `pools`: the pools calls may name, by name."""

    def __init__(self, runner: Any, tp: TensorParallel, pools: dict[str, KVPool] | None = None) -> None:
        self.runner, self.tp = runner, tp
        self.pools = dict(pools or {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def name_pool(self, name: str, pool: KVPool) -> None:
        self.pools[name] = pool

    def _ref(self, value: Any) -> Any:
        if isinstance(value, KVPool):
            name = next((n for n, p in self.pools.items() if p is value), None)
            if name is None:
                raise ValueError("a pool the followers do not know: name it with name_pool() first")
            return PoolRef(name)
        return value

    def _call(self, method: str, *args: Any, kv_sink: KVSink | None = None, **kwargs: Any) -> torch.Tensor:
        call = StepCall(method, tuple(self._ref(a) for a in args), {k: self._ref(v) for k, v in kwargs.items()},
                        kv_sink is not None)
        self.tp.broadcast_object(call)
        if kv_sink is not None:
            kwargs["kv_sink"] = gathered_sink(self.tp, self.runner.shard, kv_sink)
        return getattr(self.runner, method)(*args, **kwargs)

    def prefill(self, prompts: list[list[int]], kv_sink: KVSink | None) -> torch.Tensor:
        return self._call("prefill", prompts, kv_sink=kv_sink)

    def extend(self, pool: KVPool, *args: Any, kv_sink: KVSink | None = None, **kwargs: Any) -> torch.Tensor:
        return self._call("extend", pool, *args, kv_sink=kv_sink, **kwargs)

    def mixed(self, pool: KVPool, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call("mixed", pool, *args, **kwargs)

    def decode(self, pool: KVPool, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call("decode", pool, *args, **kwargs)

    def stop(self) -> None:
        """Release the followers (their `follow` returns)."""
        self.tp.broadcast_object(None)


def follow(runner: Any, tp: TensorParallel, pools: dict[str, KVPool] | None = None) -> int:
    """A follower rank's loop: run each call rank 0 broadcasts, with this rank's own pools, until it says
    stop. Returns the number of calls run."""
    pools = pools or {}
    calls = 0
    while (call := tp.broadcast_object()) is not None:
        if call.method not in FORWARDS:
            raise ValueError(f"rank {tp.rank}: unknown call {call.method!r}")
        args = [pools[a.name] if isinstance(a, PoolRef) else a for a in call.args]
        kwargs = {k: pools[v.name] if isinstance(v, PoolRef) else v for k, v in call.kwargs.items()}
        if call.gather_kv:
            kwargs["kv_sink"] = gathered_sink(tp, runner.shard, None)
        getattr(runner, call.method)(*args, **kwargs)
        calls += 1
    return calls
