"""Typed control messages between the router and the workers (carried by Ray).

Each is a frozen dataclass with plain fields, so what crosses a process
boundary is explicit and versionable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig, SamplingParams


@dataclass(frozen=True)
class Reservation:
    """Router -> decode worker: hold KV blocks for a request before its prefill starts."""

    request_id: str
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class PrefillTask:
    """Router -> prefill worker: one request of a prefill batch and where its KV goes."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    decode_worker_id: str
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class PrefillResult:
    """Prefill worker -> router. `error` set means the KV did not arrive (retry elsewhere)."""

    request_id: str
    first_token: int
    prefill_start: float
    prefill_end: float
    transfer_start: float
    transfer_end: float
    transport: str
    kv_bytes: int
    error: str | None = None


@dataclass(frozen=True)
class Admission:
    """Router -> decode worker: the KV is in place; run this request in the continuous batch."""

    request_id: str
    prompt_tokens: int
    first_token: int
    first_token_time: float
    params: SamplingParams
    transport: str


@dataclass(frozen=True)
class DecodeResult:
    """Decode worker -> router: a finished request's whole output, first token included."""

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length"
    admitted_at: float
    finished_at: float
    token_times: tuple[float, ...] = field(default=())  # wall time of each output token
    error: str | None = None


@dataclass(frozen=True)
class WorkerConfig:
    """Router -> worker at start-up: everything a prefill or decode worker needs."""

    engine: EngineConfig
    worker_id: str
    auth_token: str  # the cluster's shared secret for the KV endpoint
    transport: str = "auto"  # auto | shm | grpc
    kv_host: str | None = None  # bind address of the KV server; None: the node's own address
    transfer_timeout_s: float = 60.0
