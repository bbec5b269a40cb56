"""Typed control messages between the router and the workers (carried by Ray).

Each is a frozen dataclass with plain fields, so what crosses a process
boundary is explicit and versionable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.config import EngineConfig, SamplingParams
from engine.prefix_cache import KVEvents
from proto.kinds import FinishReason, Transport

if TYPE_CHECKING:  # engine.kv_cache imports torch, which the driver (router) does not load
    from engine.kv_cache import KVLayout


@dataclass(frozen=True)
class Reservation:
    """Router -> decode worker: hold KV blocks for a request before its prefill starts."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    prompt_token_ids: tuple[int, ...] = ()  # lets the decode worker share blocks it already caches


@dataclass(frozen=True)
class Grant:
    """Decode worker -> router: a reservation held. Its first `window_blocks` table entries are not held
    (-1: before every layer's sliding window at the first decode step, engine/kv_window.py) and the
    `cached_blocks` after them already hold this prompt's KV (prefix cache): the prefill worker sends only
    the blocks from `first_block` on."""

    block_table: tuple[int, ...]
    cached_blocks: int = 0
    window_blocks: int = 0

    @property
    def first_block(self) -> int:
        return self.window_blocks + self.cached_blocks


@dataclass(frozen=True)
class KVShard:
    """One rank of a tensor-parallel decode worker as a sender reaches it: KV heads [head_start,
    head_start + head_count) of `total_heads`, in its own shared-memory pool (same blocks on every rank)."""

    head_start: int
    head_count: int
    total_heads: int
    shm_name: str | None = None


@dataclass(frozen=True)
class TensorParallelSpec:
    """Which rank of its worker's tensor-parallel group a process is (engine/parallel/), and where the
    group meets (torch.distributed init address, rank 0's node)."""

    size: int = 1
    rank: int = 0
    address: str = ""


@dataclass(frozen=True)
class KVEndpoint:
    """How to reach one decode worker's KV pool; published once at start-up."""

    worker_id: str
    node_id: str
    layout: KVLayout
    model_fingerprint: str
    grpc_address: str | None = None
    grpc_tls: bool = False
    shm_name: str | None = None
    cuda_ipc: bytes | None = None  # pickled IPC handle of a CUDA pool
    # A tensor-parallel decode worker: one entry per rank (its KV heads, its pool); `layout` then has every
    # head and senders split each layer's rows by head (kvtransfer/reshard.py). (): one pool holds all heads.
    shards: tuple[KVShard, ...] = ()


@dataclass(frozen=True)
class PrefillTask:
    """Router -> prefill worker: one request of a prefill batch and where its KV goes.

    The decode worker's endpoint travels with the task, so a prefill worker
    always sends to the current incarnation of a restarted decode worker."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    decode: KVEndpoint
    block_table: tuple[int, ...]
    cached_blocks: int = 0  # leading blocks not sent: the decode worker holds them (prefix) or never reads them


@dataclass(frozen=True)
class PrefillResult:
    """Prefill worker -> router. `error` set means the KV did not arrive (retry elsewhere)."""

    request_id: str
    first_token: int
    prefill_start: float
    prefill_end: float
    transfer_start: float
    transfer_end: float
    transport: Transport
    kv_bytes: int
    transfer_busy_s: float = 0.0  # time spent moving bytes (the span overlaps prefill)
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefill worker's prefix cache (not computed)
    kv_events: KVEvents | None = None  # the worker's prefix-cache changes; on the first result of a batch


@dataclass(frozen=True)
class Admission:
    """Router -> decode worker: the KV is in place; run this request in the continuous batch."""

    request_id: str
    prompt_tokens: int
    first_token: int
    first_token_time: float
    params: SamplingParams
    transport: Transport


@dataclass(frozen=True)
class ColocatedTask:
    """Router -> colocated worker (`--mode colocated`): a request to prefill and decode in place.
    The router's mirror of the worker's pool said it fits (prompt + max_tokens); no KV travels."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class DecodeResult:
    """Decode worker -> router: a finished request's whole output, first token included."""

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    admitted_at: float
    finished_at: float
    token_times: tuple[float, ...] = field(default=())  # wall time of each output token
    error: str | None = None
    speculative: dict[str, float] | None = None  # drafted, accepted, alpha (speculative decoding on)


@dataclass(frozen=True)
class TokenProgress:
    """Decode worker -> router, streaming polls only: tokens a running request made since the last poll.

    `start` is the index in the request's output of token_ids[0] (output[0] came from prefill)."""

    request_id: str
    start: int
    token_ids: tuple[int, ...]
    token_times: tuple[float, ...]


@dataclass(frozen=True)
class DecodePoll:
    """Decode worker -> router, each poll: finished requests, and how long since its loop last turned.

    The age is measured on the worker, so it means the same whatever the two nodes' clocks say.
    """

    results: tuple[DecodeResult, ...]
    loop_stalled_s: float
    progress: tuple[TokenProgress, ...] = ()  # poll(stream=True) only
    kv_events: KVEvents | None = None  # prefix-cache blocks stored/evicted since the last poll
    prefilled: tuple[PrefillResult, ...] = ()  # colocated workers: prompts whose last chunk ran since the last poll
    released_blocks: tuple[tuple[str, int], ...] = ()  # (request, blocks) a sliding window left behind and freed


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for the KV endpoint. The server uses cert + key; clients verify with ca."""

    cert: str
    key: str
    ca: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        from pathlib import Path

        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()


@dataclass(frozen=True)
class WorkerConfig:
    """Router -> worker at start-up: everything a prefill or decode worker needs."""

    engine: EngineConfig
    worker_id: str
    auth_token: str  # the cluster's shared secret for the KV endpoint
    transport: Transport = Transport.AUTO
    kv_host: str | None = None  # bind address of the KV server; None: the node's own address
    transfer_timeout_s: float = 60.0
    tls: TLSFiles | None = None  # TLS for the gRPC KV endpoint
    inject_transfer_failures: int = 0  # fault drill: the first N transfers of a prefill worker fail
    max_num_batched_tokens: int = 0  # colocated workers: tokens per mixed step; 0: 512 on a CPU, 2048 on CUDA
    tensor_parallel: TensorParallelSpec = field(default_factory=TensorParallelSpec)  # this process's rank
    # PD on a CPU node whose cores both roles use: prefill and decode forwards take turns on the node's cores
    # (engine/core_lease.py); the lease is named by auth_token and the node id.
    share_node_cores: bool = False
