"""A long-lived deployment (`pdserve up`): a named, detached router actor over named, detached workers.

Clients (`pdserve run-batch --deployment NAME`, Ray Jobs from `pdserve submit`)
parse and tokenize their batch themselves and hand requests to the router
actor; it runs the same Router loop as a local batch and hands finished
requests back to the client that sent them. `RemoteRouter` is the client's
side: it offers the front ends the router's interface (router.api.RouterAPI).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from engine.config import EngineConfig
from pdserve.batch.format import metrics_record
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.metrics import SLO
from pdserve.runtime.cluster import NAMESPACE, ClusterConfig, init_ray, start_workers, stop_workers
from router.api import OnFinished, OnTokens
from router.request import Request, State
from router.router import Router, RouterConfig, WorkerSet

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


@ray.remote
class RouterActor:
    def __init__(self, spec: DeploymentSpec) -> None:
        self.spec = spec
        self.workers = start_workers(spec.engine, replace(spec.cluster, address=None, deployment=spec.name))
        self.collector = MetricsCollector(spec.slo, title=f"pdserve deployment {spec.name}")
        self.router = Router(self.workers, spec.router, on_finished=self._finished,
                             on_prefill_batch=self.collector.prefill_batch)
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._aborts: queue.Queue[tuple[str, str]] = queue.Queue()
        self._done: dict[str, list[Request]] = defaultdict(list)
        self._streams: set[str] = set()  # requests whose client wants their tokens as they come
        self._tokens_out: dict[str, list[tuple[str, list[int], dict[str, float]]]] = defaultdict(list)
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
                self._tokens_out[req.request_id.split("/", 1)[0]].append((req.request_id, new, dict(req.timeline)))
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

    # ---- client API ------------------------------------------------------------------------
    def submit(self, requests: list[Request], stream: bool = False) -> int:
        """Requests whose request_id starts with 'CLIENT/'; their results go back to that client
        (with `stream`, their tokens too, through `collect_stream`)."""
        for req in requests:
            if stream:
                self._streams.add(req.request_id)
            self._inbox.put(req)
        return self._inbox.qsize()

    def abort(self, request_ids: list[str], reason: str) -> None:
        """Stop these requests; each still comes back through `collect`, failed."""
        for rid in request_ids:
            self._aborts.put((rid, reason))

    def collect(self, client: str, timeout: float = 0.5) -> list[Request]:
        with self._done_ready:
            if not self._done.get(client):
                self._done_ready.wait(timeout)
            return self._done.pop(client, [])

    def collect_stream(self, client: str, timeout: float = 0.5) -> tuple[list[Request], list[tuple]]:
        """Finished requests and (request_id, new tokens, timeline) events of streaming requests."""
        with self._done_ready:
            if not self._done.get(client) and not self._tokens_out.get(client):
                self._done_ready.wait(timeout)
            return self._done.pop(client, []), self._tokens_out.pop(client, [])

    def worker_handles(self) -> WorkerSet:
        return self.workers

    def status(self) -> dict[str, Any]:
        where = ray.get([h.where.remote() for h in list(self.workers.prefill.values())
                         + list(self.workers.decode.values())], timeout=60)
        stats = {s["worker_id"]: s for s in ray.get([h.stats.remote() for h in self.workers.decode.values()],
                                                    timeout=60)}
        for w in where:
            w["role"] = w["worker_id"].split("-")[0]
            w.update({k: stats[w["worker_id"]][k] for k in ("num_blocks", "free_blocks", "running")}
                     if w["worker_id"] in stats else {})
        return {"name": self.spec.name, "model": self.spec.engine.model or "default", "dtype": self.spec.engine.dtype,
                "uptime_s": time.time() - self.started, "in_flight": len(self.router.active),
                "queued": len(self.router.queue), "workers": where}

    def dashboard_state(self) -> dict:
        return self.collector.state()

    def prometheus(self) -> bytes:
        return self.collector.prometheus()

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        stop_workers(self.workers)


def deploy(spec: DeploymentSpec, address: str | None, timeout_s: float = 600) -> Any:
    """Start a deployment on the cluster at `address`; returns the router actor once every worker is up."""
    init_ray(address)
    try:
        ray.get_actor(router_name(spec.name), namespace=NAMESPACE)
    except ValueError:
        pass  # no such deployment yet: good
    else:
        raise ValueError(f"deployment {spec.name!r} is already running; `pdserve down --name {spec.name}` first")
    actor = RouterActor.options(name=router_name(spec.name), namespace=NAMESPACE, lifetime="detached",
                                max_concurrency=16, num_cpus=0).remote(spec)
    ray.get(actor.status.remote(), timeout=timeout_s)
    return actor


def find(name: str, address: str | None) -> Any:
    init_ray(address)
    try:
        return ray.get_actor(router_name(name), namespace=NAMESPACE)
    except ValueError as e:
        raise ValueError(f"no pdserve deployment named {name!r} on this cluster; start one with `pdserve up`") from e


def teardown(name: str, address: str | None) -> None:
    actor = find(name, address)
    try:
        ray.get(actor.shutdown.remote(), timeout=120)
    finally:
        ray.kill(actor, no_restart=True)


class RemoteRouter:
    """What run_batch drives when it uses a running deployment instead of its own workers."""

    def __init__(self, actor: Any, on_finished: OnFinished, on_tokens: OnTokens | None = None) -> None:
        self.actor = actor
        self.on_finished = on_finished
        self.on_tokens = on_tokens
        self.client = uuid.uuid4().hex[:12]
        self.active: dict[str, Request] = {}
        self._pending: list[Request] = []
        self.workers: WorkerSet = ray.get(actor.worker_handles.remote(), timeout=60)

    def submit(self, req: Request) -> None:
        req.request_id = f"{self.client}/{req.request_id}"
        self.active[req.request_id] = req
        self._pending.append(req)
        if len(self._pending) >= 256:
            self._flush()

    def abort(self, request_id: str, reason: str) -> bool:
        req = self.active.get(request_id)
        if req is None:
            return False
        if req in self._pending:  # never sent: finish it here
            self._pending.remove(req)
            self.active.pop(request_id)
            req.fail(f"aborted: {reason}")
            self.on_finished(req)
        else:
            self.actor.abort.remote([request_id], reason)
        return True

    def _flush(self) -> None:
        if self._pending:
            ray.get(self.actor.submit.remote(self._pending, self.on_tokens is not None), timeout=120)
            self._pending = []

    def tick(self, wait_s: float = 0.5) -> None:
        self._flush()
        if self.on_tokens is None:
            finished, events = ray.get(self.actor.collect.remote(self.client, wait_s), timeout=wait_s + 120), []
        else:
            finished, events = ray.get(self.actor.collect_stream.remote(self.client, wait_s), timeout=wait_s + 120)
        for request_id, new, timeline in events:
            req = self.active.get(request_id)
            if req is not None:
                req.timeline.update(timeline)
                req.streamed += len(new)
                self.on_tokens(req, new)
        for req in finished:
            if self.active.pop(req.request_id, None) is not None:
                self.on_finished(req)

    @property
    def done(self) -> bool:
        return not self.active

    def snapshot(self) -> dict[str, Any]:
        return {"states": {State.QUEUED.value: len(self._pending), "in_flight": len(self.active)},
                "queue_depth": {}, "kv_blocks_held": {}}
