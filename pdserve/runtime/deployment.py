"""A long-lived deployment (`pdserve up`): a named, detached router actor over named, detached workers.

Clients (`pdserve run-batch --deployment NAME`, Ray Jobs from `pdserve submit`)
parse and tokenize their batch themselves and hand requests to the router
actor; it runs the same Router loop as a local batch and hands finished
requests back to the client that sent them. `RemoteRouter` is the client's
side: it offers the front ends the router's interface (router.api.RouterAPI).

Restarts. The router actor is restartable (Ray `max_restarts`); its workers
are named, detached actors that outlive it. A restarted router re-attaches
them instead of starting new ones, and since its mirror of the decode
workers' reservations died with the old process, it first waits for the
prefill workers' queued calls (they may still write KV) and then releases
every block the decode workers hold: the slate is clean, nothing leaks.
What was in flight is requeued by the clients, who know their unfinished
requests: each router incarnation has an id, every client call carries the
one the client knows, and a client that sees its call fail or meet a new
incarnation resubmits (as a new attempt) every request it has not received.
A router that does not come back within the client's deadline fails those
requests with a clear error. Only the clients hold the state worth keeping,
so the router needs no journal of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import RayActorError

from engine.config import EngineConfig
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.metrics import SLO
from pdserve.openai.records import metrics_record
from pdserve.runtime.cluster import (
    NAMESPACE,
    ClusterConfig,
    actor_name,
    attach_workers,
    init_ray,
    start_workers,
    stop_workers,
)
from proto.workers import WorkerSet
from router.api import OnFinished, OnTokens
from router.request import Request, State, Timeline
from router.router import Router, RouterConfig

log = logging.getLogger("pdserve.service")


def router_name(deployment: str) -> str:
    return f"{deployment}-router"


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    engine: EngineConfig
    cluster: ClusterConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    slo: SLO = field(default_factory=SLO)
    router_max_restarts: int = 3  # Ray restarts of the router actor (it re-attaches its workers)


@ray.remote
class RouterActor:
    def __init__(self, spec: DeploymentSpec) -> None:
        self.spec = spec
        self.incarnation = uuid.uuid4().hex  # clients compare it to notice a restart
        cluster = replace(spec.cluster, address=None, deployment=spec.name)
        self.reattached = reattach_workers(spec.engine, cluster)
        self.workers = self.reattached or start_workers(spec.engine, cluster)
        self.collector = MetricsCollector(spec.slo, title=f"pdserve deployment {spec.name}")
        self.router = Router(self.workers, spec.router, on_finished=self._finished,
                             on_prefill_batch=self.collector.prefill_batch)
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._aborts: queue.Queue[tuple[str, str]] = queue.Queue()
        self._done: dict[str, list[Request]] = defaultdict(list)
        self._streams: set[str] = set()  # requests whose client wants their tokens as they come
        self._tokens_out: dict[str, list[tuple[str, list[int], Timeline]]] = defaultdict(list)
        self._done_ready = threading.Condition()
        self._stop = threading.Event()
        self.started = time.time()
        self._thread = threading.Thread(target=self._loop, name="router", daemon=True)
        self._thread.start()

    def _finished(self, req: Request) -> None:
        self.collector.record(metrics_record(req))
        self._streams.discard(req.request_id)
        with self._done_ready:
            self._done[req.request_id.split("/", 1)[0]].append(req)
            self._done_ready.notify_all()

    def _tokens(self, req: Request, new: list[int]) -> None:
        if req.request_id in self._streams:
            with self._done_ready:
                self._tokens_out[req.request_id.split("/", 1)[0]].append((req.request_id, new, replace(req.timeline)))
                self._done_ready.notify_all()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Empty):  # the inbox is drained
                while True:
                    self.router.submit(self._inbox.get(timeout=0.05 if not self.router.active else 0))
            while not self._aborts.empty():
                self.router.abort(*self._aborts.get_nowait())
            # Streaming polls return at every decode step: only while a client streams.
            self.router.on_tokens = self._tokens if self._streams else None
            if self.router.active:
                self.router.tick(wait_s=0.2)
            self.collector.refresh(self.router)

    # ---- client API (RemoteRouter) ------------------------------------------------------
    def hello(self) -> str:
        """This incarnation's id; answered once the (re)started actor is up."""
        return self.incarnation

    def submit(self, requests: list[Request], stream: bool, incarnation: str) -> str:
        """Requests whose request_id starts with 'CLIENT/'; their results go back to that client
        (with `stream`, their tokens too). Refused (nothing queued) when the client knows an earlier
        incarnation: it must resubmit all it has in flight. Returns this incarnation."""
        if incarnation != self.incarnation:
            return self.incarnation
        for req in requests:
            if stream:
                self._streams.add(req.request_id)
            self._inbox.put(req)
        return self.incarnation

    def abort(self, request_ids: list[str], reason: str) -> None:
        """Stop these requests; each still comes back through `collect`, failed."""
        for rid in request_ids:
            self._aborts.put((rid, reason))

    def collect(self, client: str, incarnation: str, timeout: float = 0.5,
                stream: bool = False) -> tuple[str, list[Request], list[tuple]]:
        """This incarnation, the client's finished requests, and (with `stream`) the (request_id, new
        tokens, timeline) events of its streaming requests. Nothing when the client knows an earlier one."""
        if incarnation != self.incarnation:
            return self.incarnation, [], []
        with self._done_ready:
            if not self._done.get(client) and not (stream and self._tokens_out.get(client)):
                self._done_ready.wait(timeout)
            return self.incarnation, self._done.pop(client, []), self._tokens_out.pop(client, [])

    def worker_handles(self) -> WorkerSet:
        return self.workers

    def status(self) -> dict[str, Any]:
        placements = ray.get([h.where.remote() for h in list(self.workers.prefill.values())
                              + list(self.workers.decode.values())], timeout=60)
        stats = {s.worker_id: s for s in ray.get([h.stats.remote() for h in self.workers.decode.values()],
                                                 timeout=60)}
        where = []
        for p in placements:
            w = {**dataclasses.asdict(p), "role": p.worker_id.split("-")[0]}
            if (s := stats.get(p.worker_id)) is not None:
                w.update(num_blocks=s.pool.num_blocks, free_blocks=s.pool.free_blocks, running=s.running)
            where.append(w)
        return {"name": self.spec.name, "model": self.spec.engine.model or "default", "dtype": self.spec.engine.dtype,
                "uptime_s": time.time() - self.started, "in_flight": len(self.router.active),
                "reattached": self.reattached is not None,
                "queued": len(self.router.queue), "workers": where}

    def dashboard_state(self) -> dict:
        return self.collector.state()

    def prometheus(self) -> bytes:
        return self.collector.prometheus()

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        stop_workers(self.workers)


def _existing_workers(name: str, num: int, role: str) -> dict[str, Any]:
    found = {}
    for i in range(num):
        with contextlib.suppress(ValueError):  # not there
            found[f"{role}-{i}"] = ray.get_actor(actor_name(name, role, i), namespace=NAMESPACE)
    return found


def reattach_workers(engine: EngineConfig, cluster: ClusterConfig, timeout_s: float = 60.0) -> WorkerSet | None:
    """The deployment's running workers, cleared for a router that knows none of their requests
    (a restarted router actor); None when there are none (a fresh deployment)."""
    name = cluster.deployment
    prefill = _existing_workers(name, cluster.num_prefill, "prefill")
    decode = _existing_workers(name, cluster.num_decode, "decode")
    if not prefill and not decode:
        return None
    if not prefill or not decode:
        raise RuntimeError(f"deployment {name!r} has lost all its {'prefill' if not prefill else 'decode'} "
                           f"workers; `pdserve down --name {name}` and `pdserve up` again")
    log.warning("router of deployment %s restarted: re-attaching workers %s", name, sorted(prefill | decode))
    workers = attach_workers(prefill, decode, engine.max_num_seqs, cluster.start_timeout_s)
    # Prefill calls of the old router may still be writing KV into decode blocks: wait them out first.
    ray.get([h.barrier.remote() for h in prefill.values()], timeout=cluster.start_timeout_s)
    ray.get([h.release_all.remote() for h in decode.values()], timeout=timeout_s)
    deadline = time.time() + timeout_s
    while True:  # running sequences leave at the decode loop's next turn
        stats = ray.get([h.stats.remote() for h in decode.values()], timeout=timeout_s)
        if all(s.pool.reserved_requests == 0 and s.running == 0 and s.waiting == 0 for s in stats):
            return workers
        if time.time() > deadline:
            raise RuntimeError(f"decode workers of {name!r} still hold requests after release: {stats}")
        time.sleep(0.05)


def _remove_orphans(name: str) -> int:
    """Workers of an earlier deployment of this name whose router is gone for good (restarts spent):
    a new router would re-attach them (maybe another model), so they go. Returns how many."""
    removed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE and actor["name"].startswith((f"{name}-prefill-", f"{name}-decode-")):
            log.warning("removing %s, left over from deployment %r whose router is gone", actor["name"], name)
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE), no_restart=True)
                removed += 1
    return removed


def deploy(spec: DeploymentSpec, address: str | None, timeout_s: float = 600) -> Any:
    """Start a deployment on the cluster at `address`; returns the router actor once every worker is up."""
    init_ray(address)
    try:
        ray.get_actor(router_name(spec.name), namespace=NAMESPACE)
    except ValueError:
        pass  # no such deployment yet: good
    else:
        raise ValueError(f"deployment {spec.name!r} is already running; `pdserve down --name {spec.name}` first")
    _remove_orphans(spec.name)
    # max_task_retries 0: a call the dead router never answered fails, and its client resubmits.
    actor = RouterActor.options(name=router_name(spec.name), namespace=NAMESPACE, lifetime="detached",
                                max_concurrency=16, num_cpus=0, max_restarts=spec.router_max_restarts,
                                max_task_retries=0).remote(spec)
    ray.get(actor.status.remote(), timeout=timeout_s)
    return actor


def find(name: str, address: str | None) -> Any:
    init_ray(address)
    try:
        return ray.get_actor(router_name(name), namespace=NAMESPACE)
    except ValueError as e:
        raise ValueError(f"no pdserve deployment named {name!r} on this cluster; start one with `pdserve up`") from e


def teardown(name: str, address: str | None) -> None:
    try:
        actor = find(name, address)
    except ValueError:
        if _remove_orphans(name):  # its router died for good: its workers still go
            return
        raise
    try:
        ray.get(actor.shutdown.remote(), timeout=120)
    finally:
        ray.kill(actor, no_restart=True)


class RemoteRouter:
    """What run_batch drives when it uses a running deployment instead of its own workers.

    A router restart (see the module docstring) shows as a failed call or a new incarnation id; the
    client then waits for the router to answer again and resubmits every request it has not received,
    each as a new attempt. Past `restart_timeout_s` they fail with RouterLost."""

    def __init__(self, actor: Any, on_finished: OnFinished, on_tokens: OnTokens | None = None,
                 restart_timeout_s: float = 120.0) -> None:
        self.actor = actor
        self.on_finished = on_finished
        self.on_tokens = on_tokens
        self.restart_timeout_s = restart_timeout_s
        self.client = uuid.uuid4().hex[:12]
        self.active: dict[str, Request] = {}
        self._pending: list[Request] = []
        self._aborted: dict[str, str] = {}  # abort sent: a restarted router never saw it
        self.restarts = 0  # router restarts this client went through
        self._lost_at: float | None = None  # the router stopped answering
        self._hello: Any = None  # the call that waits for it to answer again
        self.incarnation: str = ray.get(actor.hello.remote(), timeout=120)
        self.workers: WorkerSet = ray.get(actor.worker_handles.remote(), timeout=60)

    def submit(self, req: Request) -> None:
        req.request_id = f"{self.client}/{req.request_id}"
        self.active[req.request_id] = req
        self._pending.append(req)
        if len(self._pending) >= 256 and self._lost_at is None:
            with contextlib.suppress(RayActorError):  # the next tick notices
                self._flush()

    def abort(self, request_id: str, reason: str) -> bool:
        req = self.active.get(request_id)
        if req is None:
            return False
        if req in self._pending:  # never sent: finish it here
            self._pending.remove(req)
            self._finish_here(req, f"aborted: {reason}")
        else:
            self._aborted[request_id] = reason
            if self._lost_at is None:
                self.actor.abort.remote([request_id], reason)
        return True

    def _finish_here(self, req: Request, error: str) -> None:
        self.active.pop(req.request_id, None)
        self._aborted.pop(req.request_id, None)
        req.fail(error)
        self.on_finished(req)

    def _flush(self) -> None:
        if self._pending:
            sent = ray.get(self.actor.submit.remote(self._pending, self.on_tokens is not None, self.incarnation),
                           timeout=120)
            if sent != self.incarnation:  # refused: the router restarted since we last heard from it
                self._restarted(sent)
                return
            self._pending = []

    def tick(self, wait_s: float = 0.5) -> None:
        if self._lost_at is not None:
            self._await_router(wait_s)
            return
        try:
            self._flush()
            if self._lost_at is not None:
                return
            incarnation, finished, events = ray.get(self.actor.collect.remote(
                self.client, self.incarnation, wait_s, self.on_tokens is not None), timeout=wait_s + 120)
        except RayActorError as e:
            log.warning("deployment router lost (%s); waiting for it to restart", e)
            self._lost_at = time.time()
            return
        if incarnation != self.incarnation:
            self._restarted(incarnation)
            return
        for request_id, new, timeline in events:
            req = self.active.get(request_id)
            if req is not None:
                req.timeline = timeline
                req.streamed += len(new)
                self.on_tokens(req, new)
        for req in finished:
            if self.active.pop(req.request_id, None) is not None:
                self._aborted.pop(req.request_id, None)
                self.on_finished(req)

    def _await_router(self, wait_s: float) -> None:
        """Ray queues calls to a restarting actor: `hello` answers once the new incarnation is up."""
        if self._hello is None:
            self._hello = self.actor.hello.remote()
        ready, _ = ray.wait([self._hello], timeout=wait_s)
        error = None
        if ready:
            hello, self._hello = self._hello, None
            try:
                self._restarted(ray.get(hello))
                return
            except RayActorError as e:  # asked the dying incarnation, or the router is gone
                error = e
                time.sleep(min(wait_s, 0.5))
        if time.time() - self._lost_at > self.restart_timeout_s:
            reason = (f"RouterLost: the deployment's router did not come back within {self.restart_timeout_s:.0f}s"
                      + (f" ({_last_line(error)})" if error else ""))
            log.error(reason)
            self._pending = []
            for req in list(self.active.values()):
                self._finish_here(req, reason)
            self._lost_at = None  # the next call tells whether it is back after all

    def _restarted(self, incarnation: str) -> None:
        """The router answers again as a new incarnation: hand it every request not received yet."""
        self._lost_at, self._hello = None, None
        self.incarnation = incarnation
        self.restarts += 1
        log.warning("deployment router restarted; resubmitting %d requests", len(self.active))
        self._pending = []
        for req in list(self.active.values()):
            if req.request_id in self._aborted:
                self._finish_here(req, f"aborted: {self._aborted[req.request_id]}")
                continue
            # A new attempt id even for a request maybe never sent: a result the old router's attempt
            # left in a decode worker's queue must not pass for the new one's.
            req.requeue("RouterRestarted: the deployment's router restarted; resubmitted")
            self._pending.append(req)
        try:
            self._flush()
        except RayActorError:  # down again: the next tick waits for it
            self._lost_at = time.time()

    @property
    def done(self) -> bool:
        return not self.active

    def snapshot(self) -> dict[str, Any]:
        return {"states": {State.QUEUED.value: len(self._pending), "in_flight": len(self.active)},
                "queue_depth": {}, "kv_blocks_held": {}}


def _last_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
