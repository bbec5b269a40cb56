"""Draining one worker (scale-down, the autoscaler's way out): it takes no new work, finishes what it holds,
then stops. No request is lost or served twice: nothing is moved, the worker is only left out of placement.

    drain(role, wid)   a decode worker gets no new reservation (its DecodeCapacity stops accepting), a
                       prefill worker no new batch (`is_draining`, which the router's `is_down` reports)
    each router turn   a draining worker that holds nothing (no request in flight on it, no call to it
                       pending) is shut down and removed from the router's WorkerSet; its blocks still
                       held at that moment are recorded in `stopped` (0 unless something leaked)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray

from router.calls import CallKind, Role
from router.request import State

log = logging.getLogger("pdserve.router")


@dataclass
class WorkerDrains:
    draining: dict[str, Role] = field(default_factory=dict)
    stopped: dict[str, int] = field(default_factory=dict)  # worker -> KV blocks it still held when stopped

    def drain(self, router: Any, role: Role, wid: str) -> None:
        if wid not in (router.workers.prefill if role == Role.PREFILL else router.workers.decode):
            raise ValueError(f"no {role.value} worker {wid!r} to drain")
        self.draining[wid] = role
        if role == Role.DECODE:
            router.placement.workers[wid].accepting = False
        log.warning("draining %s worker %s: no new work; it stops once it holds nothing", role.value, wid)

    def is_draining(self, wid: str) -> bool:
        return wid in self.draining

    def check(self, router: Any) -> None:
        """Stop every draining worker that holds nothing any more."""
        for wid, role in list(self.draining.items()):
            if not self._holds_nothing(router, role, wid):
                continue
            del self.draining[wid]
            self.stopped[wid] = self._stop(router, role, wid)

    @staticmethod
    def _holds_nothing(router: Any, role: Role, wid: str) -> bool:
        if any(c.worker_id == wid and c.kind != CallKind.POLL for c in router._calls.values()):
            return False
        if role == Role.PREFILL:
            return not any(r.prefill_worker == wid and r.state == State.PREFILL for r in router.active.values())
        cap = router.placement.workers.get(wid)
        return not (cap and cap.holds) and not any(r.decode_worker == wid for r in router.active.values())

    @staticmethod
    def _stop(router: Any, role: Role, wid: str) -> int:
        handles = router.workers.prefill if role == Role.PREFILL else router.workers.decode
        handle = handles.pop(wid)
        held = 0
        if role == Role.DECODE:
            router.placement.remove_worker(wid)
            router.workers.endpoints.pop(wid, None)
            router.routing.worker_lost(wid)
            held = ray.get(handle.stats.remote(), timeout=60).pool.used_blocks
        router.dispatch.worker_retired(role, wid)
        try:
            ray.get(handle.shutdown.remote(), timeout=30)
        finally:
            ray.kill(handle, no_restart=True)
        log.warning("%s worker %s drained and stopped (%d KV blocks held)", role.value, wid, held)
        return held
