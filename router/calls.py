"""The router's calls in flight: one typed record per Ray call, settled in one place.

Every call the router makes to a worker and waits for is a `Call` keyed by its ObjectRef. Whatever ends
it (a reply, a failure, its deadline), `Router._settle` undoes its bookkeeping first — a prefill
worker's mailbox slot, a decode worker's poll slot, blocks of requests aborted while it ran — and only
then is the outcome handled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from router.request import Request


class Role(Enum):
    """A worker's role as the router sees it. Colocated workers take the decode role (pools, polls)."""

    PREFILL = "prefill"
    DECODE = "decode"


class CallKind(Enum):
    PREFILL = "prefill"  # PrefillWorkerAPI.prefill: a batch; returns PrefillResults
    ADMIT = "admit"  # DecodeWorkerAPI.admit: prefilled requests join the batch; returns the ids refused
    SUBMIT = "submit"  # ColocatedWorkerAPI.submit: requests to prefill and decode in place; ids refused
    POLL = "poll"  # StepLoopWorkerAPI.poll: results, streamed tokens, heartbeat; one in flight per worker
    PROBE = "probe"  # node() / endpoint() of a worker Ray is restarting: it answers once it is back


@dataclass
class Call:
    kind: CallKind
    role: Role
    worker_id: str
    requests: list[Request] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def deadline_s(self, call_timeout_s: float, poll_timeout_s: float, stall_timeout_s: float) -> float:
        """How long it may take before its worker counts as wedged: a poll waits by design."""
        return poll_timeout_s + stall_timeout_s if self.kind == CallKind.POLL else call_timeout_s

    def describe(self) -> str:
        if self.kind == CallKind.PROBE:
            return f"probe of {self.role.value} worker {self.worker_id}"
        return f"{self.kind.value} call to {self.worker_id}"
