"""Which workers are down, since when, and when to ask whether Ray has brought them back.

A worker whose call failed, or that the router killed as wedged, is down: it gets no work and no polls
until a probe (`node()` / `endpoint()`) answers from its restarted process. A killed decode worker's
old process may still answer for a moment; its old endpoint tells the two apart. Bookkeeping only:
the router (router/router.py) decides what a loss means for the requests.
"""

from __future__ import annotations

import time
from typing import Any

from router.calls import Role


class WorkerHealth:
    def __init__(self, restart_timeout_s: float) -> None:
        self.restart_timeout_s = restart_timeout_s  # how long a lost worker may take to come back
        self._down: set[str] = set()
        self._lost_at: dict[str, float] = {}
        self._probe_at: dict[str, tuple[Role, float]] = {}  # worker -> (its role, when to probe)
        self._killed_endpoints: dict[str, Any] = {}  # decode workers killed as hung -> their old endpoint

    def is_down(self, worker_id: str) -> bool:
        return worker_id in self._down

    def lost(self, role: Role, worker_id: str, probe_in_s: float) -> None:
        self._down.add(worker_id)
        self._lost_at[worker_id] = time.time()
        self.probe_later(role, worker_id, probe_in_s)

    def killed(self, worker_id: str, old_endpoint: Any) -> None:
        """The router killed this decode worker: an answer equal to `old_endpoint` is the dying process."""
        self._killed_endpoints[worker_id] = old_endpoint

    def probe_later(self, role: Role, worker_id: str, delay_s: float) -> None:
        self._probe_at[worker_id] = (role, time.time() + delay_s)

    def due_probes(self) -> list[tuple[Role, str]]:
        """Workers whose probe is due now (each returned once)."""
        now = time.time()
        due = [(role, wid) for wid, (role, at) in self._probe_at.items() if at <= now]
        for _, wid in due:
            del self._probe_at[wid]
        return due

    def overdue(self, worker_id: str, since: float | None = None) -> bool:
        """Lost longer ago than a restart may take (`since`: when it was lost, if the router never saw it)."""
        lost_at = self._lost_at.get(worker_id, since if since is not None else time.time())
        return time.time() - lost_at >= self.restart_timeout_s

    def is_old_process(self, worker_id: str, answer: Any) -> bool:
        return answer is not None and answer == self._killed_endpoints.get(worker_id)

    def back(self, worker_id: str) -> None:
        """It answered from a new process, or it is retired: either way no longer down."""
        self._down.discard(worker_id)
        self._killed_endpoints.pop(worker_id, None)
