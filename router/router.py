"""The router: the homework's two loops (3.2) driven from one event loop over Ray futures.

Every turn (`tick`): the dispatch strategy sends what the queue holds to workers with room (PD:
router/pd.py; colocated: router/colocated.py), every decode worker has a poll in flight, and the
replies that came in are handled — each call first settled (router/calls.py), then its outcome.
Decode polls bring finished requests, streamed tokens (with `on_tokens`) and prefix-cache events.
A worker that dies or a transfer that fails sends its requests back to the queue (a fresh attempt id
each time), up to `max_attempts`; a worker that stops answering is killed so Ray restarts it, and a
probe finds it when it is back (router/health.py). `abort` stops a request wherever it is (a client
gone, a deadline passed) and frees its KV blocks.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from proto.kinds import Mode
from proto.messages import DecodePoll, DecodeResult, KVEndpoint, TokenProgress
from proto.workers import WorkerSet
from router.api import OnFinished, OnTokens
from router.calls import Call, CallKind, Role
from router.colocated import ColocatedDispatch
from router.health import WorkerHealth
from router.pd import PDDispatch
from router.placement import DecodeCapacity, Placement, PrefixRouting
from router.queue import DEFAULT_BUCKET_EDGES, LengthBucketQueue
from router.request import Request, State
from router.strategy import Dispatch

log = logging.getLogger("pdserve.router")


@dataclass(frozen=True)
class RouterConfig:
    max_prefill_tokens: int = 2048
    max_prefill_batch: int = 64
    prefill_batches_in_flight: int = 2  # per prefill worker: the next batch waits in its mailbox
    bucket_edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES
    aging_s: float = 10.0
    max_attempts: int = 3
    # Hold prefilled requests until the prefill pipeline is idle, then admit them together. Pays when
    # prefill and decode share CPU cores: decode then runs fewer, fuller steps instead of competing
    # with prefill at small batch sizes. None: on when the workers share cores (WorkerSet.shared_cores).
    batch_admissions: bool | None = None
    poll_timeout_s: float = 0.2
    call_timeout_s: float = 120.0  # deadline for any single worker call
    # A decode loop that has not turned for this long, or a poll unanswered this long, is wedged:
    # the worker is killed so Ray restarts it, and its requests are served again elsewhere.
    stall_timeout_s: float = 60.0
    restart_timeout_s: float = 300.0  # how long a lost worker may take to come back before it is retired
    colocated_backlog: int = 8  # --mode colocated: requests a worker may hold beyond max_num_seqs (waiting)


STRATEGIES: dict[Mode, type[Dispatch]] = {Mode.PD: PDDispatch, Mode.COLOCATED: ColocatedDispatch}


class Router:
    def __init__(self, workers: WorkerSet, config: RouterConfig, on_finished: OnFinished,
                 on_prefill_batch: Callable[[int], None] | None = None, on_tokens: OnTokens | None = None) -> None:
        self.workers = workers
        self.config = config
        self.on_finished = on_finished
        self.on_prefill_batch = on_prefill_batch
        self.on_tokens = on_tokens
        self.queue: LengthBucketQueue[Request] = LengthBucketQueue(config.bucket_edges, config.aging_s)
        self.placement = Placement()
        self.routing = PrefixRouting()  # KV-aware: where each prompt's prefix is cached
        for wid, ep in workers.endpoints.items():
            self._add_decode_capacity(wid, ep)
        self.active: dict[str, Request] = {}  # request_id -> unfinished request
        self._by_attempt: dict[str, Request] = {}
        self._calls: dict[ray.ObjectRef, Call] = {}
        self._polling: set[str] = set()  # decode workers with a poll in flight
        self.health = WorkerHealth(config.restart_timeout_s)
        self._releases: list[ray.ObjectRef] = []  # block releases sent, maybe not yet applied
        self.dispatch: Dispatch = STRATEGIES[workers.mode](self)

    # ---- intake ------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        tokens = req.prompt_len + req.params.max_tokens
        if not self.placement.fits_anywhere_when_empty(tokens):
            req.fail(f"prompt + max_tokens = {tokens} tokens exceeds every decode worker's KV pool")
            self.on_finished(req)
            return
        self.active[req.request_id] = req
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        self._by_attempt[req.attempt_id] = req
        self.queue.put(req, req.prompt_len, req.priority, tiebreak=-req.params.max_tokens)

    def abort(self, request_id: str, reason: str) -> bool:
        """Stop a request wherever it is (queue, prefill, admission, decode) and free its KV blocks."""
        req = self.active.get(request_id)
        if req is None:
            return False
        if req.state == State.QUEUED:
            self.queue.remove_if(lambda r: r is req)
        else:
            self.dispatch.abort(req)
        req.fail(f"aborted: {reason}")
        self._finish(req)
        return True

    @property
    def done(self) -> bool:
        return not self.active

    # ---- the loop: the caller calls tick() until done ---------------------------------------
    def tick(self, wait_s: float = 0.5) -> None:
        for role, wid in self.health.due_probes():
            self._probe(role, wid)
        self.dispatch.dispatch()
        self._ensure_polls()
        if not self._calls:
            time.sleep(0.01)
            return
        refs = list(self._calls)
        ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            call = self._calls.pop(ref)
            self._settle(call)
            try:
                value = ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                self._call_failed(call, e)
                continue
            self._handle(call, value)
        self._expire_calls()

    def _settle(self, call: Call) -> None:
        """A call is over, whatever its outcome: free what it held in the router's books."""
        if call.kind == CallKind.POLL:
            self._polling.discard(call.worker_id)
        elif call.kind in self.dispatch.kinds:
            self.dispatch.settle(call)

    def _handle(self, call: Call, value: Any) -> None:
        if call.kind == CallKind.POLL:
            self._on_poll(call.worker_id, value)
        elif call.kind == CallKind.PROBE:
            self._on_worker_back(call, value)
        else:
            self.dispatch.on_reply(call, value)

    def _on_poll(self, did: str, poll: DecodePoll) -> None:
        self.dispatch.on_poll(did, poll)
        self.placement.shrink(did, poll.released_blocks)
        self._on_progress(poll.progress)
        if self.routing.decode_index is not None:
            self.routing.decode_index.apply(did, poll.kv_events)
        self._on_decoded(poll.results)
        if poll.loop_stalled_s > self.config.stall_timeout_s:
            self.hung(Role.DECODE, did, f"DecodeStalled: decode worker {did} made no step for "
                                        f"{poll.loop_stalled_s:.0f}s")

    def _on_progress(self, progress: tuple[TokenProgress, ...]) -> None:
        for p in progress:
            req = self.current(p.request_id)
            if req is not None and p.start <= len(req.output_token_ids):
                req.output_token_ids[p.start:] = p.token_ids
                self.stream(req)

    def _on_decoded(self, results: tuple[DecodeResult, ...]) -> None:
        for res in results:
            req = self.current(res.request_id)
            if req is None:
                continue
            self.placement.release(req.decode_worker, req.attempt_id)
            if res.error:
                self.retry(req, res.error)
                continue
            req.output_token_ids = list(res.token_ids)
            self.stream(req)
            req.token_times = list(res.token_times)
            req.finish_reason = res.finish_reason
            req.speculative = res.speculative
            req.timeline.decode_admit, req.timeline.finish = res.admitted_at, res.finished_at
            if req.state in (State.PREFILL, State.ADMITTING):  # finished before the admit reply (or prefill
                req.move(State.DECODE)                          # record, colocated) was handled
            req.move(State.DONE, at=res.finished_at)
            self._finish(req)

    def _ensure_polls(self) -> None:
        for did, handle in self.workers.decode.items():
            if did not in self._polling and not self.health.is_down(did):
                self._polling.add(did)
                ref = (handle.poll.remote(self.config.poll_timeout_s, True) if self.on_tokens
                       else handle.poll.remote(self.config.poll_timeout_s))
                self.track(ref, Call(CallKind.POLL, Role.DECODE, did))

    # ---- services the dispatch strategy uses (router/strategy.py RouterServices) -------------
    def track(self, ref: ray.ObjectRef, call: Call) -> None:
        self._calls[ref] = call

    def current(self, attempt_id: str) -> Request | None:
        """The request this attempt belongs to, unless the attempt is stale (already retried or finished)."""
        req = self._by_attempt.get(attempt_id)
        return None if req is None or req.finished or req.attempt_id != attempt_id else req

    def is_down(self, worker_id: str) -> bool:
        return self.health.is_down(worker_id)

    def stream(self, req: Request) -> None:
        """Hand on_tokens what this attempt's output holds beyond what was streamed already. A retry
        regenerates the same tokens (sampling is keyed on seed and step), so nothing is sent twice."""
        if self.on_tokens is not None and len(req.output_token_ids) > req.streamed:
            new = req.output_token_ids[req.streamed:]
            req.streamed = len(req.output_token_ids)
            self.on_tokens(req, new)

    def release(self, req: Request) -> None:
        did = req.decode_worker
        self.placement.release(did, req.attempt_id)
        if did and did in self.workers.decode and not self.health.is_down(did):
            # Fire and forget; the ref is kept so the end of a batch can wait for it (drain).
            self._releases.append(self.workers.decode[did].release.remote([req.attempt_id]))
            if len(self._releases) > 64:  # forget the ones already applied
                _, self._releases = ray.wait(self._releases, num_returns=len(self._releases), timeout=0)

    def retry(self, req: Request, reason: str) -> None:
        self._by_attempt.pop(req.attempt_id, None)
        self.placement.release(req.decode_worker, req.attempt_id)
        if req.attempts + 1 >= self.config.max_attempts:
            req.errors.append(reason)
            req.fail(f"gave up after {req.attempts + 1} attempts; last error: {reason}")
            self._finish(req)
            return
        req.requeue(reason)
        self._enqueue(req)

    def _finish(self, req: Request) -> None:
        self._by_attempt.pop(req.attempt_id, None)
        self.active.pop(req.request_id, None)
        self.on_finished(req)

    # ---- faults ------------------------------------------------------------------------
    # A failed call marks its worker down and requeues the requests it held; a probe call then
    # waits for Ray to restart the actor (max_restarts). If the probe fails too, the worker is
    # gone for good and is retired; with no worker of a role left, every request fails.
    def _call_failed(self, call: Call, error: Exception) -> None:
        reason = f"{self.dispatch.describe_role(call.role)} worker {call.worker_id} failed: {_short(error)}"
        if call.kind != CallKind.PROBE:
            self.worker_lost(call.role, call.worker_id, reason)
        elif isinstance(error, ActorUnavailableError) and not self.health.overdue(call.worker_id, call.started):
            self.health.probe_later(call.role, call.worker_id, 0.5)  # still restarting
        else:
            self._retire(call.role, call.worker_id, reason)

    def worker_lost(self, role: Role, wid: str, reason: str, probe_in_s: float = 0.0) -> None:
        if self.health.is_down(wid) or wid not in self._handles(role):
            return
        log.warning("%s; requeueing its requests", reason)
        self.health.lost(role, wid, probe_in_s)
        self.routing.worker_lost(wid)
        if role == Role.PREFILL:
            for req in list(self.active.values()):
                if req.prefill_worker == wid and req.state == State.PREFILL:
                    self.release(req)
                    self.retry(req, reason)
            return
        self._polling.discard(wid)
        self.placement.remove_worker(wid)  # its reservations died with it
        for req in list(self.active.values()):
            if req.decode_worker == wid and req.state in (State.PREFILL, State.ADMITTING, State.DECODE):
                self.retry(req, reason)

    def hung(self, role: Role, wid: str, reason: str) -> None:
        """A worker that stopped answering or stepping: kill it so Ray restarts it fresh, then treat it
        as lost. The probe waits a moment, so that it reaches the new process, not the old one."""
        handle = self._handles(role).get(wid)
        if handle is None or self.health.is_down(wid):
            return
        log.error("%s; restarting it", reason)
        if role == Role.DECODE:
            self.health.killed(wid, self.workers.endpoints.get(wid))
        ray.kill(handle, no_restart=False)
        self.worker_lost(role, wid, reason, probe_in_s=2.0)

    def _probe(self, role: Role, wid: str) -> None:
        """Ask a lost worker who it is; the answer comes once Ray has restarted it."""
        handle = self._handles(role).get(wid)
        if handle is not None:
            ref = handle.node.remote() if role == Role.PREFILL else handle.endpoint.remote()
            self.track(ref, Call(CallKind.PROBE, role, wid))

    def _on_worker_back(self, call: Call, value: Any) -> None:
        wid = call.worker_id
        if self.health.is_old_process(wid, value):
            # The killed process answered: it is not gone yet. Ask again, within the restart deadline.
            if self.health.overdue(wid):
                self._retire(Role.DECODE, wid, f"decode worker {wid} did not restart")
            else:
                self.health.probe_later(call.role, wid, 0.5)
            return
        self.health.back(wid)
        if call.role == Role.DECODE:  # a restarted decode worker: fresh pool, fresh endpoint
            self.workers.endpoints[wid] = value
            self._add_decode_capacity(wid, value)
        self.dispatch.worker_back(call.role, wid)
        log.warning("%s worker %s is back", call.role.value, wid)

    def _retire(self, role: Role, wid: str, reason: str) -> None:
        log.error("%s; it will not come back", reason)
        self.health.back(wid)
        self.routing.worker_lost(wid)
        self._handles(role).pop(wid, None)
        if role == Role.DECODE:
            self.workers.endpoints.pop(wid, None)
            self.placement.remove_worker(wid)
        self.dispatch.worker_retired(role, wid)
        if not self.dispatch.can_serve():
            for req in list(self.active.values()):
                self._by_attempt.pop(req.attempt_id, None)
                req.errors.append(reason)
                req.fail(f"WorkerLost: no {role.value} workers left ({reason})")
                self._finish(req)
            self.queue.remove_if(lambda _: True)

    def _expire_calls(self) -> None:
        """A call past its deadline means its worker is wedged (a probe: it never came back)."""
        now = time.time()
        c = self.config
        for ref, call in list(self._calls.items()):
            deadline = call.deadline_s(c.call_timeout_s, c.poll_timeout_s, c.stall_timeout_s)
            if now - call.started <= deadline:
                continue
            del self._calls[ref]
            ray.cancel(ref, force=False)
            self._settle(call)
            reason = f"CallTimeout: {call.describe()} exceeded {deadline:.0f}s"
            if call.kind == CallKind.PROBE:
                self._retire(call.role, call.worker_id, reason)
            else:
                self.hung(call.role, call.worker_id, reason)

    # ---- helpers -----------------------------------------------------------------------
    def _handles(self, role: Role) -> dict[str, Any]:
        return self.workers.prefill if role == Role.PREFILL else self.workers.decode

    def _add_decode_capacity(self, did: str, ep: KVEndpoint) -> None:
        self.routing.configure(ep.layout.block_size, ep.model_fingerprint)
        colocated = self.workers.mode == Mode.COLOCATED
        most = self.workers.max_num_seqs + self.config.colocated_backlog if colocated else None
        self.placement.add_worker(DecodeCapacity(did, ep.layout.num_blocks, ep.layout.block_size,
                                                 self.workers.max_num_seqs, max_requests=most,
                                                 kv_window=ep.layout.kv_window))

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every block release sent has been applied (before checking for leaks)."""
        if self._releases:
            ray.wait(self._releases, num_returns=len(self._releases), timeout=timeout_s)
            self._releases = []

    def snapshot(self) -> dict[str, Any]:
        """Live state for progress bars and dashboards."""
        states: dict[str, int] = defaultdict(int)
        for req in self.active.values():
            states[req.state.value] += 1
        return {"states": dict(states), "queue_depth": self.queue.depth_by_bucket(),
                "kv_blocks_held": {w.worker_id: w.num_blocks - w.free_blocks for w in self.placement.workers.values()}}


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
