"""How queued requests reach workers: the one interface PD and colocated dispatch implement.

The router (router/router.py) owns the queue, the placement mirror, the calls in flight, polls, faults
and retries; a `Dispatch` strategy, chosen once at construction from the deployment's mode, decides how
a request gets from the queue onto a worker and handles the replies to the calls it makes:

    PDDispatch (router/pd.py)               prefill batch -> KV into reserved blocks -> admit on decode
    ColocatedDispatch (router/colocated.py) submit to a worker that prefills in chunks and decodes

Strategies see the router only through `RouterServices`, so neither imports the router.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

import ray

from proto.messages import DecodePoll
from proto.workers import WorkerSet
from router.calls import Call, CallKind, Role
from router.placement import Placement, PrefixRouting
from router.queue import LengthBucketQueue
from router.request import Request


class RouterServices(Protocol):
    """What a dispatch strategy may use of the router. Single-threaded: all on the router's loop."""

    workers: WorkerSet
    config: Any  # RouterConfig
    queue: LengthBucketQueue[Request]
    placement: Placement
    routing: PrefixRouting
    on_prefill_batch: Callable[[int], None] | None

    def track(self, ref: ray.ObjectRef, call: Call) -> None:
        """Wait for this call's reply in the loop; `Dispatch.on_reply` gets it."""

    def current(self, attempt_id: str) -> Request | None:
        """The request of this attempt, or None when the attempt is stale (retried, finished)."""

    def is_down(self, worker_id: str) -> bool:
        """The worker is being restarted by Ray: send it nothing."""

    def retry(self, req: Request, reason: str) -> None:
        """Back to the queue with a fresh attempt id (or failed, past max_attempts)."""

    def release(self, req: Request) -> None:
        """Free the request's reservation: in the mirror, and on its decode worker (fire and forget)."""

    def stream(self, req: Request) -> None:
        """Hand the streaming front end the output tokens it has not seen."""

    def hung(self, role: Role, worker_id: str, reason: str) -> None:
        """A worker that stopped answering: kill it so Ray restarts it, and serve its requests again."""

    def worker_lost(self, role: Role, worker_id: str, reason: str) -> None:
        """A worker's call failed: requeue what it held and probe for its restart."""


class Dispatch(ABC):
    """One way of serving the queue. The router calls `dispatch` every turn of its loop, `on_reply` for
    each reply to a call of a kind in `kinds`, and `settle` whenever such a call ends (replied, failed
    or expired) before anything else looks at it."""

    kinds: frozenset[CallKind] = frozenset()

    def __init__(self, router: RouterServices) -> None:
        self.router = router

    @abstractmethod
    def dispatch(self) -> None:
        """Send what the queue holds to workers with room."""

    @abstractmethod
    def on_reply(self, call: Call, value: Any) -> None:
        """A reply to one of this strategy's calls."""

    def settle(self, call: Call) -> None:
        """Undo a call's bookkeeping (a mailbox slot, blocks of requests aborted meanwhile)."""

    def on_poll(self, worker_id: str, poll: DecodePoll) -> None:
        """What a poll brings beyond results and streamed tokens (colocated: first tokens)."""

    def abort(self, req: Request) -> None:
        """Stop a request that left the queue: by default its worker drops it and frees its blocks."""
        self.router.release(req)

    def worker_back(self, role: Role, worker_id: str) -> None:
        """A lost worker answered its probe: it is empty and may take work again."""

    def worker_retired(self, role: Role, worker_id: str) -> None:
        """A worker is gone for good."""

    @abstractmethod
    def can_serve(self) -> bool:
        """Enough workers are left to serve a request at all."""

    def describe_role(self, role: Role) -> str:
        """How a role's workers are named in errors."""
        return role.value
