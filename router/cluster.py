"""Start (or join) a Ray cluster and the prefill/decode worker actors.

The worker classes know nothing of Ray; here they become actors, each told
the node it landed on so the transport between a pair can be chosen from
placement (same node: shared memory; otherwise gRPC).
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, replace

import ray

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from kvtransfer.base import TRANSPORTS
from prefill_worker.worker import PrefillWorker
from proto.messages import TLSFiles, WorkerConfig
from router.router import WorkerSet

log = logging.getLogger("pdserve.cluster")


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = None  # None: start a local cluster; "auto": join the running one; "ray://...": client
    num_prefill: int = 1
    num_decode: int = 1
    transport: str = "auto"
    prefill_threads: int = 0  # torch threads per worker; 0: split this machine's cores evenly
    decode_threads: int = 0
    max_restarts: int = 2
    transfer_timeout_s: float = 60.0
    start_timeout_s: float = 300.0
    tls: TLSFiles | None = None
    inject_transfer_failures: int = 0  # fault drills (tests): per prefill worker

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("need at least one prefill and one decode worker")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--transport must be one of {TRANSPORTS}, got {self.transport!r}")


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


class _ActorInfo:
    """What the router asks any worker actor about itself."""

    node_id: str

    def node(self) -> str:
        return self.node_id

    def rss_mib(self) -> float:
        """Peak resident memory of this worker process."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@ray.remote
class PrefillActor(PrefillWorker, _ActorInfo):
    def __init__(self, config: WorkerConfig) -> None:
        _unnice()
        super().__init__(config, node_id=_node()[0])


@ray.remote
class DecodeActor(DecodeWorker, _ActorInfo):
    def __init__(self, config: WorkerConfig) -> None:
        _unnice()
        node_id, node_ip = _node()
        super().__init__(config, node_id=node_id, node_ip=node_ip)


def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address is None:
        os.environ.setdefault("RAY_worker_niceness", "0")  # see _unnice
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(address=address, logging_level=logging.WARNING)


def start_workers(engine: EngineConfig, cluster: ClusterConfig) -> WorkerSet:
    """Create the actors, wait until every one has loaded the model, wire prefill to decode."""
    init_ray(cluster.address)
    cores = max(1, int(ray.available_resources().get("CPU", os.cpu_count() or 1)))
    # Prefill workers run at the same time as each other, decode workers too; with batch admissions
    # (router) the two roles mostly take turns, so each role gets all the cores.
    even = max(1, cores // max(cluster.num_prefill, cluster.num_decode))
    token = secrets.token_hex(16)

    def worker_config(role: str, i: int, threads: int) -> WorkerConfig:
        return WorkerConfig(engine=replace(engine, num_threads=threads or even), worker_id=f"{role}-{i}",
                            auth_token=token, transport=cluster.transport,
                            transfer_timeout_s=cluster.transfer_timeout_s, tls=cluster.tls,
                            inject_transfer_failures=cluster.inject_transfer_failures if role == "prefill" else 0)

    def options(threads: int) -> dict:
        # Every thread of the worker starts with OMP_NUM_THREADS OpenMP threads (Ray sets 1 by default).
        return {"max_restarts": cluster.max_restarts, "num_cpus": 0,
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads or even)}}}

    decode = {f"decode-{i}": DecodeActor.options(max_concurrency=32, **options(cluster.decode_threads)).remote(
        worker_config("decode", i, cluster.decode_threads)) for i in range(cluster.num_decode)}
    prefill = {f"prefill-{i}": PrefillActor.options(max_concurrency=4, **options(cluster.prefill_threads)).remote(
        worker_config("prefill", i, cluster.prefill_threads)) for i in range(cluster.num_prefill)}
    endpoints = dict(zip(decode, ray.get([h.endpoint.remote() for h in decode.values()],
                                         timeout=cluster.start_timeout_s)))
    prefill_nodes = ray.get([h.node.remote() for h in prefill.values()], timeout=cluster.start_timeout_s)
    nodes = set(prefill_nodes) | {ep.node_id for ep in endpoints.values()}
    return WorkerSet(prefill=prefill, decode=decode, endpoints=endpoints, max_num_seqs=engine.max_num_seqs,
                     shared_cores=engine.device == "cpu" and len(nodes) == 1)


def stop_workers(workers: WorkerSet) -> None:
    for handle in workers.decode.values():
        try:
            ray.get(handle.shutdown.remote(), timeout=30)
        except Exception as e:  # a dead worker has nothing to shut down
            log.debug("decode shutdown: %s", e)
    for handle in list(workers.prefill.values()) + list(workers.decode.values()):
        ray.kill(handle, no_restart=True)
