"""Colocated dispatch (`--mode colocated`): requests go straight to a worker that prefills and decodes.

Placement is PD's (`does_fit` on the mirror of each worker's pool, prefix overlap against load);
what changes is the hand-off: the queue's head requests that fit are sent with their prompts to the
chosen worker (`submit`), which chunks their prefill into its decode steps. No prefill dispatch, no
transfer. A worker holds at most max_num_seqs + `RouterConfig.colocated_backlog` requests, so the
queue's priorities still decide who runs next and a freed row is refilled without a round trip.
Its polls report each prompt's first token and prefill stamps (`DecodePoll.prefilled`); the rest
(results, streaming, faults, retries) is the router's, as for PD.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from proto.messages import ColocatedTask, DecodePoll
from router.calls import Call, CallKind, Role
from router.request import Request, State
from router.strategy import Dispatch


class ColocatedDispatch(Dispatch):
    kinds = frozenset({CallKind.SUBMIT})

    def dispatch(self) -> None:
        r = self.router
        chosen: dict[str, str] = {}  # attempt id -> worker

        def fits(req: Request) -> bool:  # does_fit + reserve in the mirror, prefix overlap against load
            keys = r.routing.keys(req.prompt_token_ids)
            where = r.placement.place(req.attempt_id, req.prompt_len + req.params.max_tokens,
                                      r.routing.decode_overlap(keys))
            if where is not None:
                chosen[req.attempt_id] = where
            return where is not None

        by_worker: dict[str, list[Request]] = defaultdict(list)
        while batch := (r.queue.constrained_get(fits) if len(r.queue) else []):
            for req in batch:
                by_worker[chosen[req.attempt_id]].append(req)
        for wid, reqs in by_worker.items():
            for req in reqs:
                req.decode_worker = req.prefill_worker = wid
                req.kv_blocks = r.placement.workers[wid].holds[req.attempt_id]
                req.move(State.PREFILL)
            tasks = [ColocatedTask(q.attempt_id, tuple(q.prompt_token_ids), q.params) for q in reqs]
            if r.on_prefill_batch:
                r.on_prefill_batch(len(tasks))
            r.track(r.workers.decode[wid].submit.remote(tasks), Call(CallKind.SUBMIT, Role.DECODE, wid, reqs))

    def on_reply(self, call: Call, refused: Any) -> None:
        """The worker had less room than the mirror said (a bug, but recoverable): serve those again."""
        r = self.router
        for req in call.requests:
            if req.attempt_id in refused and r.current(req.attempt_id) is req:
                r.retry(req, f"colocated worker {call.worker_id} could not reserve KV blocks")

    def on_poll(self, worker_id: str, poll: DecodePoll) -> None:
        """First tokens: the prompt's last chunk ran. Prefill stamps are its first and last chunk's steps;
        the (absent) transfer is stamped as taking no time, so every stage metric keeps its meaning."""
        r = self.router
        for res in poll.prefilled:
            req = r.current(res.request_id)
            if req is None or req.state != State.PREFILL:
                continue
            end, t = res.prefill_end, req.timeline
            t.prefill_start, t.prefill_end, t.first_token, t.decode_admit = res.prefill_start, end, end, end
            t.transfer_start = t.transfer_end = end
            req.transport, req.cached_tokens = res.transport, res.cached_tokens
            req.output_token_ids = [res.first_token]
            r.stream(req)
            req.move(State.DECODE, at=end)

    def can_serve(self) -> bool:
        return bool(self.router.workers.decode)

    def describe_role(self, role: Role) -> str:
        return "colocated"
