"""The router's interface, as the front ends (run-batch, the online server) see it.

Two implementations: `router.router.Router`, which drives workers from this
process, and `pdserve.runtime.deployment.RemoteRouter`, the client side of a
deployment's router actor (`pdserve up`). A front end only submits, aborts and
ticks; what comes back arrives through the callbacks it gave the constructor:

    on_finished(req)          once per request: DONE, or FAILED with req.error (aborted ones too)
    on_tokens(req, new_ids)   streaming only: output tokens as they are generated, in order, each
                              token once, the first one as soon as prefill returns it
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from proto.workers import WorkerSet
from router.request import Request

OnFinished = Callable[[Request], None]
OnTokens = Callable[[Request, list[int]], None]


@runtime_checkable
class RouterAPI(Protocol):
    active: dict[str, Request]  # request_id -> request not finished yet
    workers: WorkerSet  # the workers served (decode handles for live stats)

    def submit(self, req: Request) -> None:
        """Queue a request; a request that can never fit fails at once (through on_finished)."""

    def abort(self, request_id: str, reason: str) -> bool:
        """Stop a request wherever it is and free its KV blocks; False if it is not in flight."""

    def tick(self, wait_s: float = 0.5) -> None:
        """One turn of the loop: dispatch work, wait up to `wait_s` for replies, deliver callbacks."""

    @property
    def done(self) -> bool:
        """No request in flight."""

    def snapshot(self) -> dict[str, Any]:
        """Live counts for progress lines and dashboards: states, queue_depth, kv_blocks_held."""
