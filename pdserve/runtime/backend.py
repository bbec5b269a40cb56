"""Where a front end's requests go: workers it starts, workers it is handed, or a running deployment.

run-batch, the online server and bench serve each open a Backend, make their router over it and close
it at the end:

    backend = Backend.open(engine, cluster, router_config, deployment=name_or_None)
    router = backend.make_router(on_finished, on_tokens=..., on_prefill_batch=...)
    ...
    backend.close()  # stops the workers it started, and only those

The router is a `Router` driving the workers from this process, or, for a deployment (`pdserve up`),
a `RemoteRouter` to the deployment's router actor; both answer router.api.RouterAPI.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.config import EngineConfig
from pdserve.runtime.cluster import ClusterConfig, start_workers, stop_workers
from pdserve.runtime.deployment import RemoteRouter, find
from proto.workers import WorkerSet
from router.api import OnFinished, OnTokens, RouterAPI
from router.router import Router, RouterConfig


class Backend:
    def __init__(self, router_config: RouterConfig, workers: WorkerSet | None = None, owns_workers: bool = False,
                 deployment: str | None = None, address: str | None = None) -> None:
        self.router_config = router_config
        self.workers = workers  # None for a deployment: its router holds them
        self.owns_workers = owns_workers
        self.deployment, self.address = deployment, address

    @classmethod
    def open(cls, engine: EngineConfig, cluster: ClusterConfig, router_config: RouterConfig,
             deployment: str | None = None, workers: WorkerSet | None = None) -> Backend:
        """Start the workers `cluster` describes, unless `workers` (running ones, left running at close) or
        `deployment` (the name of a running deployment, found when the router is made) is given."""
        if deployment:
            return cls(router_config, deployment=deployment, address=cluster.address or "auto")
        if workers is not None:
            return cls(router_config, workers)
        return cls(router_config, start_workers(engine, cluster), owns_workers=True)

    def make_router(self, on_finished: OnFinished, on_tokens: OnTokens | None = None,
                    on_prefill_batch: Callable[[int], None] | None = None) -> RouterAPI:
        """The router over these workers (a deployment's: `on_prefill_batch` is its own router's)."""
        if self.deployment:
            return RemoteRouter(find(self.deployment, self.address), on_finished=on_finished, on_tokens=on_tokens)
        assert self.workers is not None
        return Router(self.workers, self.router_config, on_finished=on_finished, on_prefill_batch=on_prefill_batch,
                      on_tokens=on_tokens)

    def close(self) -> None:
        if self.owns_workers and self.workers is not None:
            stop_workers(self.workers)


def leaked_blocks(workers: WorkerSet, timeout_s: float = 60.0) -> int:
    """KV blocks the decode workers still hold once no request is in flight (each is a leak). A worker
    killed late in the batch may still be restarting when the others have finished it: wait for it."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.time() + timeout_s
    while True:
        try:
            stats = ray.get([h.stats.remote() for h in workers.decode.values()], timeout=timeout_s)
            return sum(s.pool.used_blocks for s in stats)
        except ActorUnavailableError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
