"""The router's side of `--mode colocated`: requests go straight to a worker that prefills and decodes.

Placement is PD's (`does_fit` on the mirror of each worker's pool, prefix overlap against load);
what changes is the hand-off: the queue's head requests that fit are sent with their prompts to the
chosen worker (`submit`), which chunks their prefill into its decode steps. No prefill dispatch, no
transfer. A worker holds at most max_num_seqs + `RouterConfig.colocated_backlog` requests, so the
queue's priorities still decide who runs next and a freed row is refilled without a round trip.
Its polls report each prompt's first token and prefill stamps (`DecodePoll.prefilled`); the rest
(results, streaming, faults, retries) is the decode side of the PD router unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from proto.messages import ColocatedTask, PrefillResult
from router.request import Request, State

if TYPE_CHECKING:
    from router.router import Router


class ColocatedDispatch:
    """Mixed into Router; used only when `workers.colocated`."""

    def _dispatch_colocated(self: Router) -> None:
        chosen: dict[str, str] = {}

        def fits(req: Request) -> bool:  # does_fit + reserve in the mirror, prefix overlap against load
            keys = self.routing.keys(req.prompt_token_ids)
            where = self.placement.place(req.attempt_id, req.prompt_len + req.params.max_tokens,
                                         self.routing.decode_overlap(keys))
            if where is not None:
                chosen[req.attempt_id] = where
            return where is not None

        by_worker: dict[str, list[Request]] = defaultdict(list)
        while len(self.queue):
            batch = self.queue.constrained_get(fits)
            if not batch:
                break
            for req in batch:
                by_worker[chosen[req.attempt_id]].append(req)
        for wid, reqs in by_worker.items():
            for req in reqs:
                req.decode_worker = req.prefill_worker = wid
                req.kv_blocks = self.placement.workers[wid].holds[req.attempt_id]
                req.move(State.PREFILL)
            tasks = [ColocatedTask(r.attempt_id, tuple(r.prompt_token_ids), r.params) for r in reqs]
            if self.on_prefill_batch:
                self.on_prefill_batch(len(tasks))
            self._track(self.workers.decode[wid].submit.remote(tasks), "submit", wid, reqs)

    def _on_submitted(self: Router, call, refused: list[str]) -> None:
        """The worker had less room than the mirror said (a bug, but recoverable): serve those again."""
        for req in call.requests:
            if req.attempt_id in refused and self._current(req.attempt_id) is req:
                self._retry(req, f"colocated worker {call.worker_id} could not reserve KV blocks")

    def _on_colocated_prefill(self: Router, results: tuple[PrefillResult, ...]) -> None:
        """First tokens: the prompt's last chunk ran. Prefill stamps are its first and last chunk's steps;
        the (absent) transfer is stamped as taking no time, so every stage metric keeps its meaning."""
        for res in results:
            req = self._current(res.request_id)
            if req is None or req.state != State.PREFILL:
                continue
            end = res.prefill_end
            req.timeline.update(prefill_start=res.prefill_start, prefill_end=end, transfer_start=end,
                                transfer_end=end, first_token=end, decode_admit=end)
            req.transport, req.cached_tokens = res.transport, res.cached_tokens
            req.output_token_ids = [res.first_token]
            self._stream(req)
            req.move(State.DECODE, at=end)
