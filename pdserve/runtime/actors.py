"""The worker actors: the worker classes made Ray actors, each told the node it landed on.

Importing this module imports the workers (torch, the model code, ~1-2 s), which the driver needs only
to declare the actors: pdserve.runtime.cluster imports it on a thread while Ray starts (`prefetch_actors`).
"""

from __future__ import annotations

import logging
import os
import time

import ray

from decode_worker.colocated import ColocatedWorker
from decode_worker.hybrid import HybridWorker
from decode_worker.ranks import FollowerRank
from decode_worker.worker import DecodeWorker
from pdserve.runtime.startup import process_age_s
from prefill_worker.worker import PrefillWorker
from proto.messages import WorkerConfig
from proto.stats import WorkerPlacement

log = logging.getLogger("pdserve.cluster")


def _node() -> tuple[str, str]:
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ray.util.get_node_ip_address()


def _unnice() -> None:
    """Ray starts workers at niceness 15, so any driver or raylet activity preempts the model.
    Serving workers are the point of this cluster: run them at 0."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (PermissionError, OSError) as e:
        log.warning("worker stays at niceness %d (%s); start Ray with RAY_worker_niceness=0", os.nice(0), e)


def _timed_init(actor: _ActorInfo, config: WorkerConfig, init) -> None:
    """Run the worker's __init__, recording where its start-up went (`pdserve -v` prints it)."""
    phases = {"process+imports": process_age_s()}
    engine = config.engine.resolved()
    if engine.device == "cpu" and engine.attention_backend in ("auto", "cpu"):
        from engine.kernels import cpu_kernels, cpu_kernels_cached

        key = "kernel (cache hit)" if cpu_kernels_cached() else "kernel (cache miss: built)"
        started = time.time()
        cpu_kernels()  # cached: the runner's backend finds it loaded
        phases[key] = time.time() - started
    started = time.time()
    init()
    phases["model+pool"] = time.time() - started  # weights, KV pool (decode: allocated and prefaulted), servers
    compiled = getattr(getattr(actor, "runner", None), "__dict__", {}).get("compiled_step")  # built by decode only
    if compiled is not None:
        phases["of which compiled step"] = compiled.report.pack_s  # its weights packed (engine/compiled_step.py)
    phases["cpu"] = time.process_time()  # CPU seconds of this process so far: load elsewhere does not inflate it
    actor.startup_s = phases


class _ActorInfo:
    """What the router and `pdserve status` ask any worker actor about itself."""

    node_id: str
    worker_id: str
    runner: object
    startup_s: dict[str, float]

    def startup(self) -> dict[str, float]:
        return self.startup_s

    def node(self) -> str:
        return self.node_id

    def where(self) -> WorkerPlacement:
        import torch

        from engine.cpu_features import CpuInfo

        config = self.runner.config  # type: ignore[attr-defined]  # resolved: concrete device and dtype
        return WorkerPlacement(
            worker_id=self.worker_id, node_id=self.node_id, node_ip=ray.util.get_node_ip_address(),
            device=config.device, dtype=config.dtype, threads=config.num_threads, pid=os.getpid(),
            gpu=torch.cuda.get_device_name() if config.device == "cuda" else None,
            cpu=CpuInfo.here().describe(config.dtype))

    def rss_mib(self) -> float:
        """Peak resident memory of this worker process."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _start(actor: _ActorInfo, config: WorkerConfig, init, with_ip: bool = True) -> None:
    """An actor's __init__: niceness 0, the node it landed on handed to the worker's own __init__, timed."""
    _unnice()
    node_id, node_ip = _node()
    where = {"node_id": node_id, "node_ip": node_ip} if with_ip else {"node_id": node_id}
    _timed_init(actor, config, lambda: init(config, **where))


@ray.remote
class PrefillActor(PrefillWorker, _ActorInfo):
    def __init__(self, config: WorkerConfig) -> None:
        _start(self, config, super().__init__, with_ip=False)


@ray.remote
class DecodeActor(DecodeWorker, _ActorInfo):
    def __init__(self, config: WorkerConfig) -> None:
        _start(self, config, super().__init__)


@ray.remote
class ColocatedActor(ColocatedWorker, _ActorInfo):
    def __init__(self, config: WorkerConfig) -> None:
        _start(self, config, super().__init__)


@ray.remote
class HybridActor(HybridWorker, _ActorInfo):
    def __init__(self, config: WorkerConfig) -> None:
        _start(self, config, super().__init__)


@ray.remote
class RankActor(FollowerRank):
    """Rank r > 0 of a tensor-parallel worker (decode_worker/ranks.py): follows its rank 0, talks to no router."""

    def __init__(self, config: WorkerConfig, role: str) -> None:
        _unnice()
        super().__init__(config, role)


ACTORS = {"prefill": PrefillActor, "decode": DecodeActor, "colocated": ColocatedActor, "hybrid": HybridActor}
