"""Disaggregated dispatch (`--mode pd`): the homework's prefill loop (3.2) and the hand-off to decode.

While requests wait, each prefill worker with a free mailbox slot (`prefill_batches_in_flight`) gets a
batch drawn from one length bucket (`constrained_get`) up to a token budget; each request first gets a
decode worker with room for prompt + max_tokens (`does_fit` on the router's mirror), which reserves
the blocks before prefill starts, and the prefill worker streams its KV into them layer by layer.
When the batch returns, its requests are ADMITTING: their decode workers are asked to `admit` them —
at once, or, with batch admissions, all together once the prefill pipeline is idle.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from proto.messages import Admission, Grant, PrefillResult, PrefillTask, Reservation
from router.calls import Call, CallKind, Role
from router.request import Request, State
from router.strategy import Dispatch, RouterServices

log = logging.getLogger("pdserve.router")


class PDDispatch(Dispatch):
    kinds = frozenset({CallKind.PREFILL, CallKind.ADMIT})

    def __init__(self, router: RouterServices) -> None:
        super().__init__(router)
        self.prefill_load: dict[str, int] = {wid: 0 for wid in router.workers.prefill}  # batches in flight
        # Prefilled requests waiting for their admit call, per decode worker (see batch_admissions).
        self.held: dict[str, list[tuple[Request, Admission]]] = defaultdict(list)
        # Aborted mid-prefill: the prefill worker may still write KV into their blocks, so the blocks
        # are freed only once its call has returned (or failed).
        self.aborted_in_prefill: set[str] = set()
        config = router.config
        self.batch_admissions = (router.workers.shared_cores if config.batch_admissions is None
                                 else config.batch_admissions)

    # ---- sending -----------------------------------------------------------------------------
    def dispatch(self) -> None:
        r = self.router
        for wid, handle in r.workers.prefill.items():
            while not r.is_down(wid) and len(r.queue) and self._has_slot(wid):
                if not self._send_batch(wid, handle):
                    break  # nothing fits on a decode worker, or the head request is cheaper elsewhere
        self._flush_admissions()

    def _has_slot(self, wid: str) -> bool:
        return self.prefill_load[wid] < self.router.config.prefill_batches_in_flight

    def _send_batch(self, wid: str, handle: Any) -> bool:
        """One batch for prefill worker `wid`; False when the queue holds nothing for it now."""
        r = self.router
        chosen: dict[str, str] = {}  # attempt id -> decode worker
        ready = [w for w in r.workers.prefill if not r.is_down(w) and self._has_slot(w)]

        def fits(req: Request) -> bool:  # the cheapest prefill worker is this one; does_fit + reserve in the mirror
            keys = r.routing.keys(req.prompt_token_ids)
            if r.routing.prefill_worker(ready, keys, req.prompt_len) != wid:
                return False
            where = r.placement.place(req.attempt_id, req.prompt_len + req.params.max_tokens,
                                      r.routing.decode_overlap(keys), prompt_tokens=req.prompt_len)
            if where is not None:
                chosen[req.attempt_id] = where
            return where is not None

        batch = r.queue.constrained_get(fits, r.config.max_prefill_tokens, r.config.max_prefill_batch)
        if not batch:
            return False
        by_decode: dict[str, list[Request]] = defaultdict(list)
        for req in batch:
            req.decode_worker = chosen[req.attempt_id]
            req.kv_blocks = r.placement.workers[req.decode_worker].holds[req.attempt_id]
            by_decode[req.decode_worker].append(req)
        tasks = [task for did, reqs in by_decode.items() for task in self._reserve_tasks(wid, did, reqs)]
        if tasks:
            if r.on_prefill_batch:
                r.on_prefill_batch(len(tasks))
            self.prefill_load[wid] += 1
            sent = [r.current(t.request_id) for t in tasks]
            r.track(handle.prefill.remote(tasks), Call(CallKind.PREFILL, Role.PREFILL, wid, sent))
        return True

    def _reserve_tasks(self, wid: str, did: str, reqs: list[Request]) -> list[PrefillTask]:
        """Reserve `reqs` on decode worker `did` and build their prefill tasks; those it refuses are retried."""
        r = self.router
        grants = self._reserve(did, reqs)
        endpoint = r.workers.endpoints.get(did)
        tasks = []
        for req in reqs:
            grant = grants.get(req.attempt_id) if grants is not None else None
            if grant is None or endpoint is None:
                r.placement.release(did, req.attempt_id)
                if grants is not None:  # the worker had less room than the mirror: a bug, but recoverable
                    log.warning("decode worker %s refused a reservation the router expected to fit", did)
                r.retry(req, f"decode worker {did} could not reserve KV blocks")
                continue
            req.prefill_worker = wid
            req.kv_bytes_saved = grant.cached_blocks * endpoint.layout.bytes_per_block
            req.move(State.PREFILL)
            keys = r.routing.keys(req.prompt_token_ids)
            r.routing.prefill_sent(wid, req.attempt_id, keys, req.prompt_len)
            tasks.append(PrefillTask(req.attempt_id, tuple(req.prompt_token_ids), req.params, endpoint,
                                     grant.block_table, grant.first_block))
        return tasks

    def _reserve(self, did: str, reqs: list[Request]) -> dict[str, Grant] | None:
        r = self.router
        handle = r.workers.decode[did]
        ask = [Reservation(q.attempt_id, q.prompt_len, q.params.max_tokens, tuple(q.prompt_token_ids)) for q in reqs]
        arrived = [a for _, a in self.held.get(did, ())]  # KV in place, admission held: shareable now
        try:
            return ray.get(handle.reserve.remote(ask, arrived), timeout=r.config.call_timeout_s)
        except GetTimeoutError:
            r.hung(Role.DECODE, did, f"CallTimeout: reserve call to {did} exceeded {r.config.call_timeout_s:.0f}s")
        except (RayActorError, RayTaskError) as e:
            r.worker_lost(Role.DECODE, did, f"reserve failed: {e}")
        return None

    def _flush_admissions(self) -> None:
        if self.batch_admissions and any(self.prefill_load.values()):
            return  # prefill still running: admit later, all at once
        r = self.router
        held, self.held = self.held, defaultdict(list)
        for did, items in held.items():
            items = [(q, a) for q, a in items if q.attempt_id == a.request_id and not q.finished]
            if not items:
                continue
            if r.is_down(did) or did not in r.workers.decode:
                for req, _ in items:
                    r.retry(req, f"decode worker {did} was lost before admission")
                continue
            ref = r.workers.decode[did].admit.remote([a for _, a in items])
            r.track(ref, Call(CallKind.ADMIT, Role.DECODE, did, [q for q, _ in items]))

    # ---- replies -----------------------------------------------------------------------------
    def settle(self, call: Call) -> None:
        if call.kind != CallKind.PREFILL:
            return
        self.prefill_load[call.worker_id] -= 1
        for req in call.requests:
            if req.attempt_id in self.aborted_in_prefill:
                self.aborted_in_prefill.discard(req.attempt_id)
                self.router.release(req)

    def on_reply(self, call: Call, value: Any) -> None:
        if call.kind == CallKind.PREFILL:
            self._on_prefill(call, value)
        else:
            self._on_admit(call, value)

    def _on_prefill(self, call: Call, results: list[PrefillResult]) -> None:
        r = self.router
        r.routing.prefill_done(call.worker_id, [res.request_id for res in results])
        for res in results:
            if r.routing.prefill_index is not None:
                r.routing.prefill_index.apply(call.worker_id, res.kv_events)
            req = r.current(res.request_id)
            if req is None:
                continue
            if res.error:
                r.release(req)
                r.retry(req, res.error)
                continue
            t = req.timeline
            t.prefill_start, t.prefill_end = res.prefill_start, res.prefill_end
            t.transfer_start, t.transfer_end, t.first_token = res.transfer_start, res.transfer_end, res.prefill_end
            req.transport, req.kv_bytes, req.kv_busy_s = res.transport, res.kv_bytes, res.transfer_busy_s
            req.cached_tokens = res.cached_tokens
            req.output_token_ids = [res.first_token]
            r.stream(req)
            req.move(State.ADMITTING, at=res.prefill_end)
            self.held[req.decode_worker].append((req, Admission(
                req.attempt_id, req.prompt_len, res.first_token, res.prefill_end, req.params, res.transport)))

    def _on_admit(self, call: Call, refused: list[str]) -> None:
        r = self.router
        refused_set = set(refused)
        for req in call.requests:
            if r.current(req.attempt_id) is not req or req.state != State.ADMITTING:
                continue
            if req.attempt_id in refused_set:
                r.release(req)
                r.retry(req, f"decode worker {call.worker_id} did not receive the whole KV cache")
            else:
                req.move(State.DECODE)

    # ---- aborts and faults -------------------------------------------------------------------
    def abort(self, req: Request) -> None:
        if req.state == State.PREFILL:
            self.aborted_in_prefill.add(req.attempt_id)  # freed once the prefill call is over
        else:
            self.router.release(req)

    def worker_back(self, role: Role, worker_id: str) -> None:
        if role == Role.PREFILL:
            self.prefill_load[worker_id] = 0

    def worker_retired(self, role: Role, worker_id: str) -> None:
        if role == Role.PREFILL:
            self.prefill_load.pop(worker_id, None)

    def can_serve(self) -> bool:
        return bool(self.router.workers.prefill) and bool(self.router.workers.decode)
