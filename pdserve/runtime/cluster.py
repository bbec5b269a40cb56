"""Start (or join) a Ray cluster and the prefill/decode worker actors, placed where the user asks.

`mode="colocated"` starts `num_colocated` workers that each prefill and decode instead
(decode_worker/colocated.py); they take the decode role's resources and threads.

The worker classes know nothing of Ray; they become actors in pdserve/runtime/actors.py, each told
the node it landed on so the transport between a pair is chosen from
placement (same node: shared memory or CUDA IPC; otherwise gRPC). Workers ask
for the CPUs, GPUs, custom resources (e.g. `prefill`, `decode`) and node
labels of their role; when any is set, all workers are reserved together in
one placement group, so a deployment either fits the cluster or fails fast.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from engine.config import EngineConfig
from proto.kinds import TRANSPORT_NAMES, Mode, Transport
from proto.messages import TensorParallelSpec, TLSFiles, WorkerConfig
from proto.workers import WorkerSet

log = logging.getLogger("pdserve.cluster")

NAMESPACE = "pdserve"
ROLE_RESOURCES = ("prefill", "decode")  # the custom resource names deploy/ gives each node pool


@dataclass(frozen=True)
class WorkerResources:
    """What one worker of a role asks Ray for."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0
    custom: tuple[tuple[str, float], ...] = ()  # e.g. (("prefill", 1.0),)
    labels: tuple[tuple[str, str], ...] = ()  # node labels, e.g. (("pdserve-role", "prefill"),)

    @classmethod
    def parse(cls, num_cpus: float = 0.0, num_gpus: float = 0.0, resources: str = "",
              labels: str = "") -> WorkerResources:
        """From CLI strings: resources 'prefill=1,ssd=1', labels 'pdserve-role=prefill'."""
        def pairs(text: str, what: str) -> list[tuple[str, str]]:
            out = []
            for item in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = item.partition("=")
                if not sep or not key or not value:
                    raise ValueError(f"{what} must look like name=value[,name=value], got {item!r}")
                out.append((key.strip(), value.strip()))
            return out

        custom = tuple((k, float(v)) for k, v in pairs(resources, "--*-resources"))
        return cls(num_cpus, num_gpus, custom, tuple(pairs(labels, "--*-labels")))

    @property
    def requested(self) -> bool:
        return bool(self.num_cpus or self.num_gpus or self.custom or self.labels)

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.num_cpus, "GPU": self.num_gpus, **dict(self.custom)}
        return {k: v for k, v in b.items() if v > 0} or {"CPU": 0.001}  # a bundle may not be empty


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = None  # None: start a local cluster; "auto": join the running one; "ray://...": client
    num_prefill: int = 1
    num_decode: int = 1
    transport: Transport = Transport.AUTO  # the CLI's word is accepted too
    prefill_threads: int = 0  # torch threads per worker; 0: from the worker's CPUs, else this node's cores
    decode_threads: int = 0
    prefill: WorkerResources = field(default_factory=WorkerResources)
    decode: WorkerResources = field(default_factory=WorkerResources)
    placement_strategy: str = "SPREAD"
    deployment: str | None = None  # a name: named, detached actors that outlive this process (`pdserve up`)
    max_restarts: int = 2
    transfer_timeout_s: float = 60.0
    start_timeout_s: float = 300.0
    tls: TLSFiles | None = None
    inject_transfer_failures: int = 0  # fault drills (tests): per prefill worker
    # PD: prefill and decode workers, KV sent between them; COLOCATED: `num_colocated` workers that each
    # prefill (in chunks of at most `max_num_batched_tokens` tokens per step, decode rows included) and decode.
    mode: Mode = Mode.PD  # the CLI's word is accepted too
    num_colocated: int = 1
    max_num_batched_tokens: int = 0  # 0: 512 on a CPU, 2048 on CUDA (and at least max_num_seqs)
    # Tensor parallel size of each prefill / decode worker (colocated workers take decode_tp): its ranks are
    # processes on one node (the driver's), its threads split over them (engine/parallel/, decode_worker/ranks.py).
    prefill_tp: int = 1
    decode_tp: int = 1

    def __post_init__(self) -> None:
        if self.mode not in Mode.words():
            raise ValueError(f"--mode must be one of {', '.join(Mode.words())}, got {self.mode!r}")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("need at least one prefill and one decode worker")
        if self.num_colocated < 1:
            raise ValueError(f"--colocated-workers must be at least 1, got {self.num_colocated}")
        if self.max_num_batched_tokens < 0:
            raise ValueError(f"--max-num-batched-tokens must be positive (0: auto), got {self.max_num_batched_tokens}")
        if self.prefill_tp < 1 or self.decode_tp < 1:
            raise ValueError(f"tensor parallel sizes must be at least 1, got {self.prefill_tp}/{self.decode_tp}")
        if self.transport not in TRANSPORT_NAMES:
            raise ValueError(f"--transport must be one of {TRANSPORT_NAMES}, got {self.transport!r}")
        # Normalized once, here: the rest of the code compares members, whatever the caller passed.
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "transport", Transport(self.transport))


def prefetch_actors() -> threading.Thread:
    """Import the actor module (the workers: torch and the model code) on a thread, so that the driver pays
    for it while Ray starts rather than before; `start_workers` joins it before declaring the actors."""
    thread = threading.Thread(target=importlib.import_module, args=("pdserve.runtime.actors",),
                              name="import-actors", daemon=True)
    thread.start()
    return thread


def use_cluster_token() -> None:
    """Ray 2.60 clusters require a token, but a client given an explicit address only sends the one it
    has when RAY_AUTH_MODE=token. Turn that on when a token is available (RAY_AUTH_TOKEN, or the file
    ~/.ray/auth_token), as Ray itself does for `auto`; RAY_AUTH_MODE set by the user always wins."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class ClusterUnreachable(ConnectionError):
    """The Ray cluster named by --address (or found by `auto`) does not answer."""


def _probe(address: str, timeout_s: float) -> None:
    """Fail in seconds where Ray would sit in GCS connection retries for minutes."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({e}). Start one there (`ray start --head`), fix --address, "
            "or omit --address to run on a fresh local cluster") from e


def _registered_address() -> str:
    """What `auto` joins: RAY_ADDRESS, else the cluster `ray start` registered on this machine."""
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # a Ray that moved it: let ray.init look
        return "auto"
    try:
        return get_ray_address_from_environment("auto", None) or "auto"
    except ConnectionError as e:
        raise ClusterUnreachable(f"--address auto found no running Ray cluster on this machine ({e}); start one "
                                 "with `ray start --head`, or omit --address to run on a fresh local cluster") from e


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise ClusterUnreachable within `timeout_s` when nothing listens at the cluster address (None: local)."""
    if address is None:
        return
    target = _registered_address() if address == "auto" else address
    if target != "auto" and "://" not in target.removeprefix("ray://"):  # host:port or ray://host:port
        _probe(target, timeout_s)


def init_ray(address: str | None, probe_timeout_s: float = 5.0) -> None:
    """Join the cluster at `address`, or start a fresh local one when it is None.

    None never joins a registered cluster (RAY_ADDRESS, or the file `ray start` leaves in Ray's temp dir):
    Ray's own default would, and a dead one hangs start-up for minutes. A given address is probed first.
    """
    if ray.is_initialized():
        return
    if address is None:
        if os.environ.get("RAY_ADDRESS"):
            log.warning("RAY_ADDRESS=%s is not used: without --address pdserve starts a fresh local cluster "
                        "(pass --address auto to join that one)", os.environ["RAY_ADDRESS"])
        os.environ.setdefault("RAY_worker_niceness", "0")  # see _unnice
        # No prestarted workers: our actors set env vars (a runtime env of their own), so Ray could not
        # hand them a prestarted process; those would only take the CPUs the actors' start-up needs.
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                 namespace=NAMESPACE, _system_config={"prestart_worker_first_driver": False})
        return
    check_address(address, probe_timeout_s)
    if address not in (None, "auto") and not address.startswith("ray://"):
        use_cluster_token()
    ray.init(address=address, logging_level=logging.WARNING, namespace=NAMESPACE)


def stop_local_cluster() -> None:
    """Leave Ray at once at the end of a run: the driver disconnects, and the local cluster this process
    started (if any) is SIGKILLed, every process of it (GCS, raylet, monitors, agents, workers) at once.

    For a process about to exit whose results are written: `ray.shutdown()` stops the cluster's processes
    one after another, giving each a second to exit (~1.5 s, more from the atexit hook). Nothing is lost
    here: the workers are stopped, and GCS state dies with a local cluster anyway. A joined cluster only
    loses this driver. Killed processes may stay zombies for a moment until init reaps them."""
    import psutil

    if not ray.is_initialized():
        return
    started = time.time()
    node = ray._private.worker._global_node  # None, or a connect-only node (no processes) when joined
    processes = [info.process for infos in (node.all_processes.values() if node else ()) for info in infos]
    tree = []
    for process in processes:  # the raylet's children: workers and agents
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone: nothing to kill under it
            tree += psutil.Process(process.pid).children(recursive=True)
    ray._private.worker._global_node = None  # ray.shutdown() then only disconnects the driver
    ray.shutdown()
    for victim in [*processes, *tree]:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):  # exited meanwhile: that is the goal
            victim.kill()
    for process in processes:  # our children: reap them
        try:
            process.wait(timeout=5)
        except Exception as e:  # a process stuck in the kernel (D state): do not hang the exit on it
            log.warning("Ray process %d did not exit: %s", process.pid, e)
    log.info("start-up: Ray %s in %.1f s", "stopped" if processes else "left", time.time() - started)


def actor_name(deployment: str, role: str, i: int) -> str:
    return f"{deployment}-{role}-{i}"


def check_mode(engine: EngineConfig, cluster: ClusterConfig) -> None:
    """What --mode colocated or hybrid cannot be combined with, said before any worker starts."""
    if cluster.mode == Mode.PD:
        return
    if engine.speculative not in (None, "", "off"):
        raise ValueError("--speculative runs on PD decode workers only; drop it or use --mode pd")
    if cluster.deployment:
        raise ValueError("a deployment (`pdserve up`) runs --mode pd only for now")
    if 0 < cluster.max_num_batched_tokens < engine.max_num_seqs:
        raise ValueError(f"--max-num-batched-tokens ({cluster.max_num_batched_tokens}) must be at least "
                         f"--max-num-seqs ({engine.max_num_seqs}): each running sequence takes a row of every step")


def start_workers(engine: EngineConfig, cluster: ClusterConfig) -> WorkerSet:
    """Create the actors, wait until every one has loaded the model, and report where they landed."""
    check_mode(engine, cluster)
    started = time.time()
    importing = prefetch_actors()
    init_ray(cluster.address)
    log.info("start-up: Ray %s in %.1f s", "started" if cluster.address is None else "joined", time.time() - started)
    started = time.time()
    colocated = cluster.mode == Mode.COLOCATED
    even = _even_threads(cluster)  # before a placement group takes its CPUs out of the available ones
    share_cores = shares_node_cores(engine, cluster)
    token = secrets.token_hex(16)
    roles = [("prefill", i) for i in range(cluster.num_prefill)] + [("decode", i) for i in range(cluster.num_decode)]
    if colocated:
        roles = [("colocated", i) for i in range(cluster.num_colocated)]
    step_role = {Mode.PD: "decode", Mode.COLOCATED: "colocated", Mode.HYBRID: "hybrid"}[cluster.mode]
    if cluster.mode == Mode.HYBRID:  # decode workers that also chunk-prefill short prompts
        roles = [(step_role if role == "decode" else role, i) for role, i in roles]
    wants = {"prefill": cluster.prefill, "decode": cluster.decode, "colocated": cluster.decode,
             "hybrid": cluster.decode}
    pg = _placement_group(cluster, roles, wants) if any(w.requested for w in wants.values()) else None

    importing.join()
    from pdserve.runtime import actors  # imported by `importing`; a failed import raises here

    handles: dict[str, dict[str, object]] = {"prefill": {}, "decode": {}, "colocated": {}, "hybrid": {}}
    followers: list[object] = []
    for index, (role, i) in enumerate(roles):
        want = wants[role]
        size = cluster.prefill_tp if role == "prefill" else cluster.decode_tp
        threads = (cluster.prefill_threads if role == "prefill" else cluster.decode_threads) \
            or int(want.num_cpus) or even
        threads = max(1, threads // size)  # per rank: the worker's threads split over its ranks
        config = WorkerConfig(engine=replace(engine, num_threads=threads), worker_id=f"{role}-{i}",
                              auth_token=token, transport=cluster.transport.value,
                              transfer_timeout_s=cluster.transfer_timeout_s, tls=cluster.tls,
                              inject_transfer_failures=cluster.inject_transfer_failures if role == "prefill" else 0,
                              max_num_batched_tokens=cluster.max_num_batched_tokens,
                              share_node_cores=share_cores)
        options = _actor_options(cluster, role, i, threads, want, (pg, index))
        if size > 1:
            config, rank_options = _rank_group(config, size, options)
            followers += [actors.RankActor.options(**rank_options).remote(
                replace(config, tensor_parallel=replace(config.tensor_parallel, rank=r)), role) for r in range(1, size)]
        handles[role][config.worker_id] = actors.ACTORS[role].options(**options).remote(config)
    decode = handles[step_role]
    workers = attach_workers(handles["prefill"], decode, engine.max_num_seqs, cluster.start_timeout_s,
                             mode=cluster.mode)
    workers.followers.extend(followers)
    if log.isEnabledFor(logging.INFO):
        log.info("start-up: workers ready in %.1f s", time.time() - started)
        _log_startup({**handles["prefill"], **decode})
    return workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rank_group(config: WorkerConfig, size: int, options: dict) -> tuple[WorkerConfig, dict]:
    """Rank 0's config (the group's meeting address: a free port on this node) and the followers' Ray
    options. Every rank is pinned to the driver's node (one node per worker; gloo meets over its loopback).
    Rank 0's `options` are pinned in place. A follower is not restarted on its own: its group would be broken
    (faults of a rank taking its worker down as one unit are not built yet)."""
    if "scheduling_strategy" in options or options.get("lifetime") == "detached":
        raise ValueError("tensor parallel workers run without placement groups or deployments for now: "
                         "drop --*-cpus/--*-gpus/--*-resources and `pdserve up`, or use tensor parallel size 1")
    node = ray.get_runtime_context().get_node_id()
    options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    spec = TensorParallelSpec(size=size, rank=0, address=f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}")
    followers = {k: v for k, v in options.items() if k not in ("name", "namespace", "lifetime")}
    followers.update(max_restarts=0, max_concurrency=2)
    return replace(config, tensor_parallel=spec), followers


def shares_node_cores(engine: EngineConfig, cluster: ClusterConfig) -> bool:
    """PD with one prefill and one decode worker on the CPU, each given all of its node's cores (no threads or
    CPUs asked per role): where the two land on one node, their forwards take turns (engine/core_lease.py)."""
    per_role = (cluster.prefill_threads or cluster.decode_threads or cluster.prefill.num_cpus
                or cluster.decode.num_cpus)
    return (cluster.mode == Mode.PD and engine.resolved().device == "cpu" and not per_role
            and cluster.num_prefill == 1 and cluster.num_decode == 1)


def _even_threads(cluster: ClusterConfig) -> int:
    """Torch threads per worker when neither its role's threads nor its CPUs say: the cluster's cores shared.
    Prefill workers run at the same time as each other, decode workers too; with batch admissions
    (router) the two roles mostly take turns, so each role gets all the cores of a shared node."""
    cores = max(1, int(ray.available_resources().get("CPU", os.cpu_count() or 1)))
    colocated = cluster.mode == Mode.COLOCATED
    return max(1, cores // (cluster.num_colocated if colocated else max(cluster.num_prefill, cluster.num_decode)))


def _placement_group(cluster: ClusterConfig, roles: list[tuple[str, int]], wants: dict[str, WorkerResources]):
    """All workers reserved together, one bundle each, once the cluster can place them all; or a clear error."""
    pg = ray.util.placement_group(
        [wants[r].bundle() for r, _ in roles], strategy=cluster.placement_strategy,
        bundle_label_selector=[dict(wants[r].labels) for r, _ in roles],
        name=f"{cluster.deployment}-workers" if cluster.deployment else "",
        lifetime="detached" if cluster.deployment else None)
    try:
        ray.get(pg.ready(), timeout=cluster.start_timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        ray.util.remove_placement_group(pg)
        asks = "; ".join(f"{r}: {wants[r].bundle()} on nodes labelled {dict(wants[r].labels)}" for r in wants)
        raise RuntimeError(f"the cluster cannot place the workers within {cluster.start_timeout_s:.0f}s "
                           f"({asks}); add nodes that offer these resources") from e
    return pg


def _actor_options(cluster: ClusterConfig, role: str, i: int, threads: int, want: WorkerResources,
                   bundle: tuple) -> dict:
    """Ray's options for worker `i` of `role`; `bundle`: (placement group or None, its bundle index)."""
    pg, index = bundle
    # Every thread of the worker starts with OMP_NUM_THREADS OpenMP threads (Ray sets 1 by default).
    options: dict = {"max_restarts": cluster.max_restarts, "num_cpus": want.num_cpus, "num_gpus": want.num_gpus,
                     "resources": dict(want.custom),
                     "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
                     "max_concurrency": 4 if role == "prefill" else 32}
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
        if want.num_cpus == 0 and "CPU" in want.bundle():
            options["num_cpus"] = want.bundle()["CPU"]
    elif want.labels:
        options["label_selector"] = dict(want.labels)
    if cluster.deployment:
        options.update(name=actor_name(cluster.deployment, role, i), namespace=NAMESPACE, lifetime="detached")
    return options


def _log_startup(handles: dict[str, object]) -> None:
    """Where each worker's start-up went (`pdserve -v`)."""
    every = dict(zip(handles, ray.get([h.startup.remote() for h in handles.values()], timeout=60)))
    for worker_id, phases in every.items():
        log.info("start-up: %s: %s", worker_id, ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))


def attach_workers(prefill: dict, decode: dict, max_num_seqs: int, timeout_s: float = 300.0,
                   mode: Mode = Mode.PD) -> WorkerSet:
    """A WorkerSet over running actors: waits until each has loaded its model. Mode.COLOCATED: `decode`
    holds colocated workers and `prefill` is empty."""
    endpoints = dict(zip(decode, ray.get([h.endpoint.remote() for h in decode.values()], timeout=timeout_s)))
    where = ray.get([h.where.remote() for h in list(prefill.values()) + list(decode.values())], timeout=timeout_s)
    nodes = {w.node_id for w in where}
    dtypes = {w.worker_id: w.dtype for w in where}
    if len(set(dtypes.values())) > 1:  # `--dtype auto` on nodes of different kinds: KV layouts would not match
        for handle in list(prefill.values()) + list(decode.values()):
            ray.kill(handle, no_restart=True)
        raise RuntimeError(f"workers chose different dtypes ({dtypes}); pass --dtype float32 or --dtype bfloat16")
    for cpu in sorted({w.cpu for w in where if w.cpu}):
        log.info("workers: %s", cpu)
    return WorkerSet(prefill=prefill, decode=decode, endpoints=endpoints, max_num_seqs=max_num_seqs,
                     shared_cores=len(nodes) == 1 and all(w.device == "cpu" for w in where), mode=mode)


def stop_workers(workers: WorkerSet) -> None:
    started = time.time()
    for handle in workers.decode.values():
        try:
            ray.get(handle.shutdown.remote(), timeout=30)
        except Exception as e:  # a dead worker has nothing to shut down
            log.debug("decode shutdown: %s", e)
    for handle in list(workers.prefill.values()) + list(workers.decode.values()) + list(workers.followers):
        ray.kill(handle, no_restart=True)
    from kvtransfer.shm import sweep_orphans  # torch: only now, once the batch is done

    sweep_orphans()  # pools of workers that died for good during the run (this node's)
    log.info("start-up: workers stopped in %.1f s", time.time() - started)
