"""A request's life as the router tracks it: a state machine with a timestamp at every step.

    QUEUED -> PREFILL -> TRANSFER -> DECODE -> DONE
       ^         |          |          |
       +---------+----------+----------+   worker lost / transfer failed: back to QUEUED (retry)
    any state -> FAILED(reason)             the request's own fault, or retries exhausted
    PREFILL -> DECODE                       --mode colocated: prefilled in place, no transfer

`timeline` holds the stage timestamps the workers measured (wall clock, s);
`transitions` holds when the router saw each state change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.config import SamplingParams


class State(str, Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    TRANSFER = "transfer"
    DECODE = "decode"
    DONE = "done"
    FAILED = "failed"


_ALLOWED = {
    State.QUEUED: {State.PREFILL, State.FAILED},
    State.PREFILL: {State.TRANSFER, State.DECODE, State.QUEUED, State.FAILED},  # DECODE: --mode colocated
    State.TRANSFER: {State.DECODE, State.QUEUED, State.FAILED},
    State.DECODE: {State.DONE, State.QUEUED, State.FAILED},
    State.DONE: set(),
    State.FAILED: set(),
}

# Stage timestamps written to every output line, in order.
TIMELINE_FIELDS = ("queued", "prefill_start", "prefill_end", "transfer_start", "transfer_end",
                   "first_token", "decode_admit", "finish")


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
    timeline: dict[str, float] = field(default_factory=dict)
    transitions: list[tuple[str, float]] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    errors: list[str] = field(default_factory=list)  # what went wrong on earlier attempts
    prefill_worker: str | None = None
    decode_worker: str | None = None
    transport: str | None = None
    kv_bytes: int = 0
    kv_busy_s: float = 0.0  # time the transport spent moving this request's KV
    kv_blocks: int = 0  # reserved on the decode worker for prompt + max_tokens
    cached_tokens: int = 0  # prompt tokens the prefill worker found in its prefix cache
    kv_bytes_saved: int = 0  # KV the decode worker already held (shared prefix blocks): not transferred
    slo: dict[str, float] | None = None  # per-request SLO override: {"ttft_s": ..., "tpot_s": ...}
    speculative: dict[str, float] | None = None  # drafted, accepted, alpha from the decode worker
    streamed: int = 0  # output tokens handed to a streaming front end (kept across retries)
    tools: Any = None  # the front end's ToolPlan (pdserve/openai/tools.py): how to read tool calls from the answer

    def __post_init__(self) -> None:
        now = time.time()
        self.timeline.setdefault("queued", now)
        self.transitions.append((self.state.value, now))

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
        for key in TIMELINE_FIELDS[1:]:
            self.timeline.pop(key, None)
        self.decode_worker = self.prefill_worker = self.transport = None
        self.kv_bytes, self.kv_busy_s, self.cached_tokens, self.kv_bytes_saved = 0, 0.0, 0, 0

    def fail(self, reason: str) -> None:
        self.error = reason
        self.move(State.FAILED)
        self.timeline["finish"] = time.time()
