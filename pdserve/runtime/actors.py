"""The worker actors, declared without importing the workers.

The driver (router, run-batch) only creates actors and calls their methods; importing the worker
classes would load torch and the model code there (~1 s of a one-line batch's start-up) and, through
the pickled actor class, every role's modules in every worker process. So each actor here names its
worker class by module path, imports it in `__init__` inside its own process, and forwards the methods
listed in `METHODS` to it (tests/test_startup.py checks the lists against the worker classes).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

import ray

from proto.messages import WorkerConfig

log = logging.getLogger("pdserve.cluster")

# role -> ("module:Class", the worker's public methods that the actor forwards)
WORKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prefill": ("prefill_worker.worker:PrefillWorker", ("connection", "prefill", "shutdown")),
    "decode": ("decode_worker.worker:DecodeWorker",
               ("admit", "endpoint", "poll", "release", "release_all", "reserve", "shutdown", "stall_for", "stats")),
    "colocated": ("decode_worker.colocated:ColocatedWorker",
                  ("endpoint", "poll", "release", "release_all", "shutdown", "stall_for", "stats", "submit")),
}


def process_age_s() -> float:
    """Seconds since this process started (Ray worker boot and imports, for an actor entering __init__)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _unnice() -> None:
    """Ray starts workers at niceness 15, so any driver or raylet activity preempts the model.
    Serving workers are the point of this cluster: run them at 0."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (PermissionError, OSError) as e:
        log.warning("worker stays at niceness %d (%s); start Ray with RAY_worker_niceness=0", os.nice(0), e)


class _WorkerActor:
    """Builds its role's worker in this process, recording where the start-up went (`pdserve -v` prints
    it), and answers what the router and `pdserve status` ask any worker about itself."""

    role: str

    def __init__(self, config: WorkerConfig) -> None:
        _unnice()
        phases = {"process+imports": process_age_s()}
        started = time.time()
        path, _ = WORKERS[self.role]
        module, _, name = path.partition(":")
        worker_class = getattr(importlib.import_module(module), name)
        phases["worker imports"] = time.time() - started
        engine = config.engine.resolved()
        if engine.device == "cpu" and engine.attention_backend in ("auto", "cpu"):
            from engine.kernels import cpu_paged_attention

            started = time.time()
            cpu_paged_attention()  # cached: the runner's decode_kernel() finds it loaded
            phases["kernel"] = time.time() - started
        started = time.time()
        ctx = ray.get_runtime_context()
        node = {"node_id": ctx.get_node_id()}
        if self.role != "prefill":
            node["node_ip"] = ray.util.get_node_ip_address()
        self.worker = worker_class(config, **node)
        phases["model+pool"] = time.time() - started  # weights, KV pool (decode: allocated and prefaulted), servers
        phases["cpu"] = time.process_time()  # CPU seconds of this process so far: load elsewhere does not inflate it
        self.startup_s = phases

    def startup(self) -> dict[str, float]:
        return self.startup_s

    def node(self) -> str:
        return self.worker.node_id

    def where(self) -> dict:
        import torch

        from engine.cpu_features import CpuInfo

        config = self.worker.runner.config  # resolved: concrete device and dtype
        return {"worker_id": self.worker.worker_id, "node_id": self.worker.node_id,
                "node_ip": ray.util.get_node_ip_address(), "device": config.device, "dtype": config.dtype,
                "threads": config.num_threads, "pid": os.getpid(),
                "gpu": torch.cuda.get_device_name() if config.device == "cuda" else None,
                "cpu": CpuInfo.here().describe(config.dtype)}

    def rss_mib(self) -> float:
        """Peak resident memory of this worker process."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _forward(name: str):
    def method(self: _WorkerActor, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.worker, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


def _actor_class(role: str, extra: dict[str, Any] | None = None) -> type:
    body = {"role": role, **{name: _forward(name) for name in WORKERS[role][1]}, **(extra or {})}
    return type(f"{role.capitalize()}Actor", (_WorkerActor,), body)


def _barrier(self: _WorkerActor) -> None:
    """Returns once the prefill calls queued before it have run (their KV writes are over): a
    restarted deployment router frees the blocks they wrote into only after this."""
    self.worker.compute.call(lambda: None)


ACTORS = {"prefill": ray.remote(_actor_class("prefill", {"barrier": _barrier})),
          "decode": ray.remote(_actor_class("decode")),
          "colocated": ray.remote(_actor_class("colocated"))}
