"""A request's life as the router tracks it: a state machine with a timestamp at every step.

    QUEUED -> PREFILL -> ADMITTING -> DECODE -> DONE
       ^         |           |           |
       +---------+-----------+-----------+   worker lost / transfer failed: back to QUEUED (retry)
    any state -> FAILED(reason)                the request's own fault, or retries exhausted
    PREFILL -> DECODE                          --mode colocated: prefilled in place, nothing sent

PREFILL covers the prefill call and the KV transfer it streams layer by layer (the call returns once
the KV is in place); ADMITTING: the KV is on the decode worker and the first token known, the request
waits to join its decode batch (held while prefill runs when batch admissions are on, then `admit`).

`timeline` holds the stage timestamps the workers measured (wall clock, s);
`transitions` holds when the router saw each state change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from enum import Enum

from engine.config import SamplingParams
from proto.kinds import FinishReason, Transport


class State(str, Enum):
    QUEUED = "queued"
    PREFILL = "prefill"  # prefill computing, its KV streaming into the decode worker's reserved blocks
    ADMITTING = "admitting"  # KV in place, first token known: waiting to join the decode batch
    DECODE = "decode"
    DONE = "done"
    FAILED = "failed"


_ALLOWED = {
    State.QUEUED: {State.PREFILL, State.FAILED},
    State.PREFILL: {State.ADMITTING, State.DECODE, State.QUEUED, State.FAILED},  # DECODE: --mode colocated
    State.ADMITTING: {State.DECODE, State.QUEUED, State.FAILED},
    State.DECODE: {State.DONE, State.QUEUED, State.FAILED},
    State.DONE: set(),
    State.FAILED: set(),
}

@dataclass
class Timeline:
    """Stage timestamps the workers measured (Unix seconds); None: not reached. Written to every output
    line in this order (`as_dict`). The transfer streams during prefill: its span overlaps prefill's."""

    queued: float = field(default_factory=time.time)
    prefill_start: float | None = None
    prefill_end: float | None = None
    transfer_start: float | None = None
    transfer_end: float | None = None
    first_token: float | None = None
    decode_admit: float | None = None
    finish: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def clear_attempt(self) -> None:
        """Forget every stage after `queued`: a retried request starts its stages again."""
        for f in fields(self)[1:]:
            setattr(self, f.name, None)



class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow: a bug in the router, not in the request."""


@dataclass
class Request:
    request_id: str  # unique within the batch
    custom_id: str
    line: int  # 1-based line of the input file
    kind: str  # "chat" | "completion"
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    state: State = State.QUEUED
    attempts: int = 0
    timeline: Timeline = field(default_factory=Timeline)
    transitions: list[tuple[str, float]] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    errors: list[str] = field(default_factory=list)  # what went wrong on earlier attempts
    prefill_worker: str | None = None
    decode_worker: str | None = None
    transport: Transport | None = None
    kv_bytes: int = 0
    kv_busy_s: float = 0.0  # time the transport spent moving this request's KV
    kv_blocks: int = 0  # reserved on the decode worker for prompt + max_tokens
    cached_tokens: int = 0  # prompt tokens the prefill worker found in its prefix cache
    kv_bytes_saved: int = 0  # KV the decode worker already held (shared prefix blocks): not transferred
    slo: dict[str, float] | None = None  # per-request SLO override: {"ttft_s": ..., "tpot_s": ...}
    speculative: dict[str, float] | None = None  # drafted, accepted, alpha from the decode worker
    streamed: int = 0  # output tokens handed to a streaming front end (kept across retries)

    def __post_init__(self) -> None:
        self.transitions.append((self.state.value, self.timeline.queued))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def attempt_id(self) -> str:
        """The id workers see: unique per attempt, so a late message about a dead attempt is harmless."""
        return f"{self.request_id}#{self.attempts}"

    @property
    def finished(self) -> bool:
        return self.state in (State.DONE, State.FAILED)

    def move(self, state: State, at: float | None = None) -> None:
        if state not in _ALLOWED[self.state]:
            raise InvalidTransition(f"request {self.request_id}: {self.state.value} -> {state.value}")
        self.state = state
        self.transitions.append((state.value, at if at is not None else time.time()))

    def requeue(self, reason: str) -> None:
        """Back to the queue after a worker or transfer fault; the next attempt starts clean."""
        self.errors.append(reason)
        if self.state != State.QUEUED:
            self.move(State.QUEUED)
        self.attempts += 1
        self.timeline.clear_attempt()
        self.decode_worker = self.prefill_worker = self.transport = None
        self.kv_bytes, self.kv_busy_s, self.cached_tokens, self.kv_bytes_saved = 0, 0.0, 0, 0

    def fail(self, reason: str) -> None:
        self.error = reason
        self.move(State.FAILED)
        self.timeline.finish = time.time()
