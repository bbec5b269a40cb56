"""The calls each worker kind answers: the contract between the router and the workers.

The router holds Ray actor handles and calls these methods with `.remote(...)`; the worker classes
(prefill_worker/worker.py, decode_worker/worker.py, decode_worker/colocated.py) implement them, and
tests/proto/test_workers.py checks that each class matches its protocol, signature for signature.
Every argument and return value is a typed message (proto/messages.py) or stats record
(proto/stats.py): nothing crosses a process boundary as a dict of unknown shape.

Who calls what, and what it may block on:

    PrefillWorkerAPI.prefill        router, one call per prefill batch; runs the forward and the KV
                                    transfer, returns once every request's KV is in place (or failed)
    DecodeWorkerAPI.reserve         router, before a prefill batch is sent; under the pool lock only
    DecodeWorkerAPI.admit           router, once prefill returned; queues sequences for the step loop
    ColocatedWorkerAPI.submit       router (--mode colocated): reserve + queue, prefill runs in place
    HybridWorkerAPI                 router (--mode hybrid): submit for short prompts, reserve/admit for long
    StepLoopWorkerAPI.poll          router, one in flight per worker; waits up to `timeout` for results
    StepLoopWorkerAPI.release       router, fire and forget: aborts (the loop frees blocks between steps)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from proto.kinds import Mode
from proto.messages import (
    Admission,
    ColocatedTask,
    DecodePoll,
    Grant,
    KVEndpoint,
    PrefillResult,
    PrefillTask,
    Reservation,
)
from proto.stats import ColocatedStats, DecodeStats, PrefillStats, WorkerPlacement


@runtime_checkable
class WorkerInfoAPI(Protocol):
    """What any worker actor tells about itself (pdserve/runtime/actors.py adds these to each worker)."""

    def startup(self) -> dict[str, float]:
        """Seconds each start-up phase took (process+imports, kernel, model+pool; cpu: CPU seconds)."""

    def node(self) -> str:
        """The Ray node id it runs on; answers as soon as the actor is up (the router's restart probe)."""

    def where(self) -> WorkerPlacement: ...

    def rss_mib(self) -> float:
        """Peak resident memory of the worker process."""


@runtime_checkable
class PrefillWorkerAPI(Protocol):
    def prefill(self, tasks: list[PrefillTask]) -> list[PrefillResult]:
        """Prefill the batch packed, sample each first token, stream each request's KV into its decode
        worker's reserved blocks layer by layer. A failed transfer fails only its own result."""

    def barrier(self) -> None:
        """Returns once the prefill calls queued before it have run (their KV writes are over)."""

    def stats(self) -> PrefillStats:
        """Counters since start: batches, tokens, forward and call seconds, waits for the node's cores."""

    def shutdown(self) -> None: ...


@runtime_checkable
class StepLoopWorkerAPI(Protocol):
    """What the decode worker and the colocated worker share: a pool, a step loop, polls and aborts."""

    def endpoint(self) -> KVEndpoint:
        """How to reach this worker's KV pool (its layout and size); also the restart probe's answer."""

    def poll(self, timeout: float = 0.5, stream: bool = False) -> DecodePoll:
        """Finished requests since the last poll (waiting up to `timeout` for one), the loop's heartbeat
        age, and with `stream` the new tokens of running requests."""

    def release(self, request_ids: list[str]) -> int:
        """Abort these requests wherever they are on this worker and free their blocks."""

    def release_all(self) -> int:
        """Abort every request held here (a restarted router knows none of them)."""

    def stall_for(self, seconds: float) -> None:
        """Fault drill: wedge the step loop while the actor keeps answering calls."""

    def shutdown(self) -> None: ...


@runtime_checkable
class DecodeWorkerAPI(StepLoopWorkerAPI, Protocol):
    def reserve(self, reservations: list[Reservation], arrived: Sequence[Admission] = ()) -> dict[str, Grant]:
        """Hold blocks for prompt + max_tokens of each request that fits (the others are left out);
        `arrived`: requests whose KV is complete but not yet admitted (their blocks become shareable)."""

    def admit(self, admissions: list[Admission]) -> list[str]:
        """Start decoding requests whose KV is in place; returns the ids refused (KV incomplete)."""

    def stats(self) -> DecodeStats: ...


@runtime_checkable
class ColocatedWorkerAPI(StepLoopWorkerAPI, Protocol):
    def submit(self, tasks: list[ColocatedTask]) -> list[str]:
        """Reserve and queue each task (prefilled in chunks inside decode steps); returns the ids refused."""

    def stats(self) -> ColocatedStats: ...


@runtime_checkable
class HybridWorkerAPI(ColocatedWorkerAPI, Protocol):
    """--mode hybrid: a colocated worker that also takes KV from prefill workers (the PD path)."""

    def reserve(self, reservations: list[Reservation], arrived: Sequence[Admission] = ()) -> dict[str, Grant]:
        """As DecodeWorkerAPI.reserve."""

    def admit(self, admissions: list[Admission]) -> list[str]:
        """As DecodeWorkerAPI.admit: the request joins the running batch as a decode row."""


# A Ray actor handle whose methods are the protocol's, each called as `handle.method.remote(...)`.
PrefillHandle = Any
StepLoopHandle = Any


@dataclass
class WorkerSet:
    """Handles to a deployment's running workers and the step-loop workers' KV endpoints.

    PD: `prefill` holds PrefillWorkerAPI actors, `decode` DecodeWorkerAPI actors. Colocated: `prefill`
    is empty and `decode` holds ColocatedWorkerAPI actors (they take the decode role: pools, polls)."""

    prefill: dict[str, PrefillHandle]
    decode: dict[str, StepLoopHandle]
    endpoints: dict[str, KVEndpoint] = field(default_factory=dict)
    max_num_seqs: int = 128
    shared_cores: bool = False  # prefill and decode workers compete for the same CPU cores
    mode: Mode = Mode.PD  # COLOCATED: `decode` holds colocated workers, `prefill` is empty; HYBRID: hybrid ones
    followers: list = field(default_factory=list)  # ranks > 0 of tensor-parallel workers: kept alive, stopped last
