"""The router: the homework's two loops (3.2) driven from one event loop over Ray futures.

Prefill side: while requests wait, give every prefill worker with room a
batch drawn from one length bucket (`constrained_get`) up to a token budget;
each request first gets a decode worker with room for prompt + max_tokens
(`does_fit`), which reserves the blocks before prefill starts.
Decode side: when a prefill batch returns, admit its requests on their decode
workers; poll each decode worker for finished requests.
A worker that dies or a transfer that fails sends its requests back to the
queue (a fresh attempt id each time), up to `max_attempts`.
`abort` stops a request wherever it is (a client gone, a deadline passed) and
frees its KV blocks. With `on_tokens`, decode polls also bring the tokens of
running requests, so a front end can stream them (router.api).
`--mode colocated` (workers that prefill and decode): router/colocated.py.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from proto.messages import (
    Admission,
    DecodeResult,
    Grant,
    KVEndpoint,
    PrefillResult,
    PrefillTask,
    Reservation,
    TokenProgress,
)
from router.api import OnFinished, OnTokens
from router.colocated import ColocatedDispatch
from router.placement import DecodeCapacity, Placement, PrefixRouting
from router.queue import DEFAULT_BUCKET_EDGES, LengthBucketQueue
from router.request import Request, State

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


@dataclass
class WorkerSet:
    """Handles to the running workers and the decode workers' KV endpoints."""

    prefill: dict[str, Any]
    decode: dict[str, Any]
    endpoints: dict[str, KVEndpoint] = field(default_factory=dict)
    max_num_seqs: int = 128
    shared_cores: bool = False  # prefill and decode workers compete for the same CPU cores
    colocated: bool = False  # --mode colocated: `decode` holds workers that prefill and decode; `prefill` is empty


@dataclass
class _Call:
    kind: str  # prefill | admit | poll | probe_prefill | probe_decode
    worker_id: str
    requests: list[Request] = field(default_factory=list)
    started: float = field(default_factory=time.time)


class Router(ColocatedDispatch):
    def __init__(self, workers: WorkerSet, config: RouterConfig, on_finished: OnFinished,
                 on_prefill_batch: Callable[[int], None] | None = None, on_tokens: OnTokens | None = None) -> None:
        self.workers = workers
        self.on_prefill_batch = on_prefill_batch
        self.config = config
        self.on_finished = on_finished
        self.on_tokens = on_tokens
        self.queue: LengthBucketQueue[Request] = LengthBucketQueue(config.bucket_edges, config.aging_s)
        self.placement = Placement()
        self.routing = PrefixRouting()  # KV-aware: where each prompt's prefix is cached
        for wid, ep in workers.endpoints.items():
            self._add_decode_capacity(wid, ep)
        self.active: dict[str, Request] = {}  # request_id -> unfinished request
        self._by_attempt: dict[str, Request] = {}
        self._calls: dict[ray.ObjectRef, _Call] = {}
        self._prefill_load: dict[str, int] = {wid: 0 for wid in workers.prefill}
        self._polling: set[str] = set()
        self._down: set[str] = set()  # workers being restarted by Ray
        self._lost_at: dict[str, float] = {}
        self._probe_later: dict[str, tuple[str, float]] = {}  # worker -> (probe kind, when)
        self._killed_endpoints: dict[str, Any] = {}  # decode workers killed as hung -> their old endpoint
        self._held: dict[str, list[tuple[Request, Admission]]] = defaultdict(list)  # see batch_admissions
        self._releases: list[ray.ObjectRef] = []  # block releases sent, maybe not yet applied
        # Aborted mid-prefill: the prefill worker may still write KV into their blocks, so the blocks
        # are freed only once its call has returned (or failed).
        self._aborted_in_prefill: set[str] = set()
        self.batch_admissions = (workers.shared_cores if config.batch_admissions is None
                                 else config.batch_admissions)

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
        """Stop a request wherever it is (queue, prefill, transfer, decode) and free its KV blocks."""
        req = self.active.get(request_id)
        if req is None:
            return False
        if req.state == State.QUEUED:
            self.queue.remove_if(lambda r: r is req)
        elif req.state == State.PREFILL and not self.workers.colocated:
            self._aborted_in_prefill.add(req.attempt_id)
        else:  # TRANSFER or DECODE (or colocated): the worker drops the sequence and frees its blocks
            self._release(req)
        req.fail(f"aborted: {reason}")
        self._finish(req)
        return True

    @property
    def done(self) -> bool:
        return not self.active

    # ---- the loop: the caller calls tick() until done ---------------------------------------
    def tick(self, wait_s: float = 0.5) -> None:
        self._send_due_probes()
        if self.workers.colocated:
            self._dispatch_colocated()
        else:
            self._dispatch_prefill()
        self._flush_admissions()
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
            try:
                value = ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                self._call_failed(call, e)
                continue
            self._handle(call, value)
        self._expire_calls()

    def _handle(self, call: _Call, value: Any) -> None:
        if call.kind == "prefill":
            self._prefill_load[call.worker_id] -= 1
            self._settle_aborted(call)
            self._on_prefill(call, value)
        elif call.kind == "admit":
            self._on_admit(call, value)
        elif call.kind == "submit":
            self._on_submitted(call, value)
        elif call.kind == "poll":
            self._polling.discard(call.worker_id)
            self._on_colocated_prefill(value.prefilled)
            self.placement.shrink(call.worker_id, value.released_blocks)
            self._on_progress(value.progress)
            if self.routing.decode_index is not None:
                self.routing.decode_index.apply(call.worker_id, value.kv_events)
            self._on_decoded(value.results)
            if value.loop_stalled_s > self.config.stall_timeout_s:
                self._hung("decode", call.worker_id, f"DecodeStalled: decode worker {call.worker_id} made no "
                                                     f"step for {value.loop_stalled_s:.0f}s")
        elif call.kind.startswith("probe_"):
            self._on_worker_back(call, value)

    # ---- prefill dispatch --------------------------------------------------------------
    def _dispatch_prefill(self) -> None:
        for wid, handle in self.workers.prefill.items():
            while (wid not in self._down and len(self.queue)
                   and self._prefill_load[wid] < self.config.prefill_batches_in_flight):
                if not self._send_prefill_batch(wid, handle):
                    break  # nothing fits on a decode worker, or the head request is cheaper elsewhere

    def _send_prefill_batch(self, wid: str, handle: Any) -> bool:
        chosen: dict[str, str] = {}
        ready = [w for w in self.workers.prefill if w not in self._down
                 and self._prefill_load[w] < self.config.prefill_batches_in_flight]

        def fits(req: Request) -> bool:  # the cheapest prefill worker is this one; does_fit + reserve in the mirror
            keys = self.routing.keys(req.prompt_token_ids)
            if self.routing.prefill_worker(ready, keys, req.prompt_len) != wid:
                return False
            where = self.placement.place(req.attempt_id, req.prompt_len + req.params.max_tokens,
                                         self.routing.decode_overlap(keys), prompt_tokens=req.prompt_len)
            if where is not None:
                chosen[req.attempt_id] = where
            return where is not None

        batch = self.queue.constrained_get(fits, self.config.max_prefill_tokens, self.config.max_prefill_batch)
        if not batch:
            return False
        by_decode: dict[str, list[Request]] = defaultdict(list)
        for req in batch:
            req.decode_worker = chosen[req.attempt_id]
            req.kv_blocks = self.placement.workers[req.decode_worker].holds[req.attempt_id]
            by_decode[req.decode_worker].append(req)
        tasks: list[PrefillTask] = []
        for did, reqs in by_decode.items():
            tables = self._reserve(did, reqs)
            for req in reqs:
                grant = tables.get(req.attempt_id) if tables is not None else None
                if grant is None:
                    self.placement.release(did, req.attempt_id)
                    if tables is not None:  # the worker had less room than the mirror: a bug, but recoverable
                        log.warning("decode worker %s refused a reservation the router expected to fit", did)
                    self._retry(req, f"decode worker {did} could not reserve KV blocks")
                    continue
                req.prefill_worker = wid
                layout = self.workers.endpoints[did].layout
                req.kv_bytes_saved = grant.cached_blocks * layout.bytes_per_block
                req.move(State.PREFILL)
                self.routing.prefill_sent(wid, req.attempt_id, self.routing.keys(req.prompt_token_ids), req.prompt_len)
                tasks.append(PrefillTask(req.attempt_id, tuple(req.prompt_token_ids), req.params,
                                         self.workers.endpoints[did], grant.block_table, grant.first_block))
        sent = [self._by_attempt[t.request_id] for t in tasks]
        if tasks:
            if self.on_prefill_batch:
                self.on_prefill_batch(len(tasks))
            self._prefill_load[wid] += 1
            self._calls[handle.prefill.remote(tasks)] = _Call("prefill", wid, sent)
        return True

    def _reserve(self, did: str, reqs: list[Request]) -> dict[str, Grant] | None:
        handle = self.workers.decode[did]
        ask = [Reservation(r.attempt_id, r.prompt_len, r.params.max_tokens, tuple(r.prompt_token_ids)) for r in reqs]
        arrived = [a for _, a in self._held.get(did, ())]  # KV in place, admission held: shareable now
        try:
            return ray.get(handle.reserve.remote(ask, arrived), timeout=self.config.call_timeout_s)
        except GetTimeoutError:
            self._hung("decode", did, f"CallTimeout: reserve call to {did} exceeded {self.config.call_timeout_s:.0f}s")
            return None
        except (RayActorError, RayTaskError) as e:
            self._decode_lost(did, f"reserve failed: {e}")
            return None

    # ---- results -----------------------------------------------------------------------
    def _on_prefill(self, call: _Call, results: list[PrefillResult]) -> None:
        self.routing.prefill_done(call.worker_id, [r.request_id for r in results])
        for res in results:
            if self.routing.prefill_index is not None:
                self.routing.prefill_index.apply(call.worker_id, res.kv_events)
            req = self._current(res.request_id)
            if req is None:
                continue
            if res.error:
                self._release(req)
                self._retry(req, res.error)
                continue
            req.timeline.update(prefill_start=res.prefill_start, prefill_end=res.prefill_end,
                                transfer_start=res.transfer_start, transfer_end=res.transfer_end,
                                first_token=res.prefill_end)
            req.transport, req.kv_bytes, req.kv_busy_s = res.transport, res.kv_bytes, res.transfer_busy_s
            req.cached_tokens = res.cached_tokens
            req.output_token_ids = [res.first_token]
            self._stream(req)
            req.move(State.TRANSFER, at=res.prefill_end)
            self._held[req.decode_worker].append((req, Admission(
                req.attempt_id, req.prompt_len, res.first_token, res.prefill_end, req.params, res.transport)))

    def _flush_admissions(self) -> None:
        if self.batch_admissions and any(self._prefill_load.values()):
            return  # prefill still running: admit later, all at once
        held, self._held = self._held, defaultdict(list)
        for did, items in held.items():
            items = [(r, a) for r, a in items if r.attempt_id == a.request_id and not r.finished]
            if not items:
                continue
            if did in self._down or did not in self.workers.decode:
                for req, _ in items:
                    self._retry(req, f"decode worker {did} was lost before admission")
                continue
            ref = self.workers.decode[did].admit.remote([a for _, a in items])
            self._calls[ref] = _Call("admit", did, [r for r, _ in items])

    def _on_admit(self, call: _Call, refused: list[str]) -> None:
        refused_set = set(refused)
        for req in call.requests:
            if self._by_attempt.get(req.attempt_id) is not req or req.state != State.TRANSFER:
                continue
            if req.attempt_id in refused_set:
                self._release(req)
                self._retry(req, f"decode worker {call.worker_id} did not receive the whole KV cache")
            else:
                req.move(State.DECODE)

    def _on_progress(self, progress: tuple[TokenProgress, ...]) -> None:
        for p in progress:
            req = self._current(p.request_id)
            if req is not None and p.start <= len(req.output_token_ids):
                req.output_token_ids[p.start:] = p.token_ids
                self._stream(req)

    def _stream(self, req: Request) -> None:
        """Hand on_tokens what this attempt's output holds beyond what was streamed already. A retry
        regenerates the same tokens (sampling is keyed on seed and step), so nothing is sent twice."""
        if self.on_tokens is not None and len(req.output_token_ids) > req.streamed:
            new = req.output_token_ids[req.streamed:]
            req.streamed = len(req.output_token_ids)
            self.on_tokens(req, new)

    def _on_decoded(self, results: list[DecodeResult]) -> None:
        for res in results:
            req = self._current(res.request_id)
            if req is None:
                continue
            self.placement.release(req.decode_worker, req.attempt_id)
            if res.error:
                self._retry(req, res.error)
                continue
            req.output_token_ids = list(res.token_ids)
            self._stream(req)
            req.token_times = list(res.token_times)
            req.finish_reason = res.finish_reason
            req.speculative = res.speculative
            req.timeline.update(decode_admit=res.admitted_at, finish=res.finished_at)
            if req.state in (State.PREFILL, State.TRANSFER):  # finished before the admit reply (or prefill
                req.move(State.DECODE)                         # record, colocated) was handled
            req.move(State.DONE, at=res.finished_at)
            self._finish(req)

    def _ensure_polls(self) -> None:
        for did, handle in self.workers.decode.items():
            if did not in self._polling and did not in self._down:
                self._polling.add(did)
                ref = (handle.poll.remote(self.config.poll_timeout_s, True) if self.on_tokens
                       else handle.poll.remote(self.config.poll_timeout_s))
                self._calls[ref] = _Call("poll", did)

    # ---- faults ------------------------------------------------------------------------
    # A failed call marks its worker down and requeues the requests it held; a probe call then
    # waits for Ray to restart the actor (max_restarts). If the probe fails too, the worker is
    # gone for good and is retired; with no worker of a role left, every request fails.
    def _call_failed(self, call: _Call, error: Exception) -> None:
        role = "prefill" if call.kind in ("prefill", "probe_prefill") else "decode"
        kind = "colocated" if self.workers.colocated else role
        reason = f"{kind} worker {call.worker_id} failed: {_short(error)}"
        if call.kind == "prefill":
            self._prefill_load[call.worker_id] -= 1
            self._settle_aborted(call)
        if call.kind == "poll":
            self._polling.discard(call.worker_id)
        if call.kind.startswith("probe_"):
            lost_at = self._lost_at.get(call.worker_id, call.started)
            if isinstance(error, ActorUnavailableError) and time.time() - lost_at < self.config.restart_timeout_s:
                self._probe_later[call.worker_id] = (call.kind, time.time() + 0.5)  # still restarting
            else:
                self._retire(role, call.worker_id, reason)
        elif role == "prefill":
            self._prefill_lost(call.worker_id, reason)
        else:
            self._decode_lost(call.worker_id, reason)

    def _prefill_lost(self, wid: str, reason: str, probe_in_s: float = 0.0) -> None:
        if wid in self._down or wid not in self.workers.prefill:
            return
        log.warning("%s; requeueing its requests", reason)
        self._down.add(wid)
        self.routing.worker_lost(wid)
        self._lost_at[wid] = time.time()
        for req in list(self.active.values()):
            if req.prefill_worker == wid and req.state == State.PREFILL:
                self._release(req)
                self._retry(req, reason)
        self._probe_later[wid] = ("probe_prefill", time.time() + probe_in_s)

    def _decode_lost(self, did: str, reason: str, probe_in_s: float = 0.0) -> None:
        if did in self._down or did not in self.workers.decode:
            return
        log.warning("%s; requeueing its requests", reason)
        self._down.add(did)
        self.routing.worker_lost(did)
        self._lost_at[did] = time.time()
        self._polling.discard(did)
        self.placement.remove_worker(did)  # its reservations died with it
        for req in list(self.active.values()):
            if req.decode_worker == did and req.state in (State.PREFILL, State.TRANSFER, State.DECODE):
                self._retry(req, reason)
        self._probe_later[did] = ("probe_decode", time.time() + probe_in_s)

    def _hung(self, role: str, wid: str, reason: str) -> None:
        """A worker that stopped answering or stepping: kill it so Ray restarts it fresh, then treat it
        as lost. The probe waits a moment, so that it reaches the new process, not the old one."""
        handle = self._handles(role).get(wid)
        if handle is None or wid in self._down:
            return
        log.error("%s; restarting it", reason)
        if role == "decode":
            self._killed_endpoints[wid] = self.workers.endpoints.get(wid)
        ray.kill(handle, no_restart=False)
        (self._prefill_lost if role == "prefill" else self._decode_lost)(wid, reason, probe_in_s=2.0)

    def _probe(self, kind: str, wid: str) -> None:
        """Ask a lost worker who it is; the answer comes once Ray has restarted it."""
        handle = self._handles(kind.removeprefix("probe_")).get(wid)
        if handle is not None:
            ref = handle.node.remote() if kind == "probe_prefill" else handle.endpoint.remote()
            self._calls[ref] = _Call(kind, wid)

    def _send_due_probes(self) -> None:
        now = time.time()
        for wid, (kind, due) in list(self._probe_later.items()):
            if due <= now:
                del self._probe_later[wid]
                self._probe(kind, wid)

    def _on_worker_back(self, call: _Call, value: Any) -> None:
        if value is not None and value == self._killed_endpoints.get(call.worker_id):
            # The killed process answered: it is not gone yet. Ask again, within the restart deadline.
            if time.time() - self._lost_at[call.worker_id] > self.config.restart_timeout_s:
                self._retire("decode", call.worker_id, f"decode worker {call.worker_id} did not restart")
            else:
                self._probe_later[call.worker_id] = (call.kind, time.time() + 0.5)
            return
        self._killed_endpoints.pop(call.worker_id, None)
        self._down.discard(call.worker_id)
        if call.kind == "probe_decode":  # a restarted decode worker: fresh pool, fresh endpoint
            self.workers.endpoints[call.worker_id] = value
            self._add_decode_capacity(call.worker_id, value)
        else:
            self._prefill_load[call.worker_id] = 0
        log.warning("%s worker %s is back", call.kind.removeprefix("probe_"), call.worker_id)

    def _retire(self, role: str, wid: str, reason: str) -> None:
        log.error("%s; it will not come back", reason)
        self._down.discard(wid)
        self.routing.worker_lost(wid)
        if role == "prefill":
            self.workers.prefill.pop(wid, None)
            self._prefill_load.pop(wid, None)
        else:
            self.workers.decode.pop(wid, None)
            self.workers.endpoints.pop(wid, None)
            self.placement.remove_worker(wid)
        if not self.workers.decode or (not self.workers.prefill and not self.workers.colocated):
            for req in list(self.active.values()):
                self._by_attempt.pop(req.attempt_id, None)
                req.errors.append(reason)
                req.fail(f"WorkerLost: no {role} workers left ({reason})")
                self._finish(req)
            self.queue.remove_if(lambda _: True)

    def _expire_calls(self) -> None:
        """A call past its deadline means its worker is wedged (a probe: it never came back)."""
        now = time.time()
        for ref, call in list(self._calls.items()):
            deadline = (self.config.poll_timeout_s + self.config.stall_timeout_s if call.kind == "poll"
                        else self.config.call_timeout_s)
            if now - call.started <= deadline:
                continue
            del self._calls[ref]
            ray.cancel(ref, force=False)
            reason = f"CallTimeout: {call.kind} call to {call.worker_id} exceeded {deadline:.0f}s"
            if call.kind.startswith("probe_"):
                self._retire(call.kind.removeprefix("probe_"), call.worker_id, reason)
                continue
            if call.kind == "prefill":
                self._prefill_load[call.worker_id] -= 1
                self._settle_aborted(call)
            if call.kind == "poll":
                self._polling.discard(call.worker_id)
            self._hung("prefill" if call.kind == "prefill" else "decode", call.worker_id, reason)

    # ---- helpers -----------------------------------------------------------------------
    def _handles(self, role: str) -> dict[str, Any]:
        return self.workers.prefill if role == "prefill" else self.workers.decode

    def _add_decode_capacity(self, did: str, ep: KVEndpoint) -> None:
        self.routing.configure(ep.layout.block_size, ep.model_fingerprint)
        most = self.workers.max_num_seqs + self.config.colocated_backlog if self.workers.colocated else None
        self.placement.add_worker(DecodeCapacity(did, ep.layout.num_blocks, ep.layout.block_size,
                                                 self.workers.max_num_seqs, max_requests=most,
                                                 kv_window=ep.layout.kv_window))

    def _track(self, ref: ray.ObjectRef, kind: str, worker_id: str, requests: list[Request]) -> None:
        self._calls[ref] = _Call(kind, worker_id, requests)

    def _current(self, attempt_id: str) -> Request | None:
        """The request this attempt belongs to, unless the attempt is stale (already retried or finished)."""
        req = self._by_attempt.get(attempt_id)
        return None if req is None or req.finished or req.attempt_id != attempt_id else req

    def _settle_aborted(self, call: _Call) -> None:
        """A prefill call is over: free the blocks of its requests that were aborted meanwhile."""
        for req in call.requests:
            if req.attempt_id in self._aborted_in_prefill:
                self._aborted_in_prefill.discard(req.attempt_id)
                self._release(req)

    def _release(self, req: Request) -> None:
        did = req.decode_worker
        self.placement.release(did, req.attempt_id)
        if did and did in self.workers.decode and did not in self._down:
            # Fire and forget; the ref is kept so the end of a batch can wait for it (drain).
            self._releases.append(self.workers.decode[did].release.remote([req.attempt_id]))
            if len(self._releases) > 64:  # forget the ones already applied
                _, self._releases = ray.wait(self._releases, num_returns=len(self._releases), timeout=0)

    def _retry(self, req: Request, reason: str) -> None:
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
