"""The transport interface both workers program against, and how one is chosen.

Decode side: a worker owns a KV pool and publishes one `KVEndpoint` that says
how to reach it (shared-memory name, gRPC address). Prefill side: a worker
`connect`s to an endpoint once and, per request, `begin`s a transfer, writes
each layer's K/V as prefill computes it, and `finish`es with a deadline.

    prefill worker                           decode worker
    conn = connect(endpoint, ...)            endpoint = KVEndpoint(...)
    h = conn.begin(request_id, table, n)     (blocks reserved by the router)
    conn.write_layer(h, layer, k, v)  ---->  pool[layer, :, table] <- k, v
    stats = conn.finish(h, timeout)          inbox.is_complete(request_id)
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proto.kinds import TRANSPORT_NAMES, Transport
from proto.messages import KVEndpoint, TLSFiles

if TYPE_CHECKING:  # the driver reads TRANSPORTS without loading torch
    import torch

    from engine.kv_cache import KVLayout

TRANSPORTS = TRANSPORT_NAMES  # what --transport accepts


class TransferError(RuntimeError):
    """A transfer did not complete; the request must be retried elsewhere or failed."""


class TransferTimeout(TransferError):
    """A transfer did not finish within its deadline (a stalled or unreachable receiver)."""


class IntegrityError(TransferError):
    """A chunk's checksum, shape, dtype or block range does not match what was reserved."""


class IncompatiblePeer(TransferError):
    """The two workers disagree on model or KV layout; refused before any byte moves."""


class Unauthenticated(TransferError):
    """The peer refused our cluster token, or asked for TLS we are not configured for."""


@dataclass(frozen=True)
class TransferHandle:
    request_id: str
    block_table: tuple[int, ...]  # physical block ids reserved on the decode worker
    num_tokens: int
    started: float = field(default_factory=time.time)
    first_block: int = 0  # blocks before it are already on the receiver (prefix cache): not sent


@dataclass(frozen=True)
class TransferStats:
    """One request's transfer. With layer streaming, start..end spans the prefill that overlaps it;
    `busy_s` is the time actually spent moving bytes, so `gbps` is the transport's own rate."""

    request_id: str
    transport: Transport
    bytes: int
    start: float
    end: float
    busy_s: float

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.busy_s, 1e-9) / 1e9


class KVConnection(ABC):
    """Prefill side of one (prefill worker, decode worker) pair."""

    transport: Transport

    @abstractmethod
    def begin(self, request_id: str, block_table: list[int], num_tokens: int,
              first_block: int = 0) -> TransferHandle: ...

    @abstractmethod
    def write_layer(self, handle: TransferHandle, layer: int, k: torch.Tensor, v: torch.Tensor,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """k, v: [num_tokens - first_block * BS, KVH, D] for `layer` (tokens from the first block
        sent on), already on the sender's device, as the receiving pool stores them: for an int8 pool
        (kv_cache_dtype int8) int8 values with their scales [n, KVH] float32 (engine.kv_cache.as_stored),
        shipped bit for bit."""

    @abstractmethod
    def finish(self, handle: TransferHandle, timeout: float) -> TransferStats:
        """Block until the receiver holds every layer; raise TransferError otherwise."""

    def abort(self, handle: TransferHandle) -> None:
        """Give up on a transfer (the router releases the decode-side blocks)."""

    def close(self) -> None: ...


def select_transport(requested: str, sender_node: str, endpoint: KVEndpoint) -> Transport:
    """Forced transport wins; `auto` takes CUDA IPC or shared memory on the same node, gRPC across nodes."""
    if requested not in TRANSPORTS:
        raise ValueError(f"--transport must be one of {TRANSPORTS}, got {requested!r}")
    if requested != Transport.AUTO:
        return Transport(requested)
    if sender_node == endpoint.node_id:
        if endpoint.cuda_ipc:
            return Transport.CUDA_IPC
        if endpoint.shm_name:
            return Transport.SHM
    return Transport.GRPC


_MODULES = {Transport.SHM: "kvtransfer.shm", Transport.CUDA_IPC: "kvtransfer.cuda_ipc",
            Transport.GRPC: "kvtransfer.grpc_transport"}


def connect(endpoint: KVEndpoint, transport: Transport, *, sender_id: str, auth_token: str,
            sender_layout: KVLayout, model_fingerprint: str, timeout: float = 30.0,
            tls: TLSFiles | None = None) -> KVConnection:
    """Open a connection of `transport` (lazily imported) and run the compatibility check."""
    problem = endpoint.layout.compatible_with(sender_layout)  # names the field: e.g. "kv_cache_dtype: int8 != auto"
    if problem is None and endpoint.model_fingerprint != model_fingerprint:
        problem = f"model: {endpoint.model_fingerprint} != {model_fingerprint}"
    if problem:
        raise IncompatiblePeer(f"decode worker {endpoint.worker_id} refuses {sender_id}: {problem}")
    module = importlib.import_module(_MODULES[transport])
    return module.open_connection(endpoint, sender_id=sender_id, auth_token=auth_token,
                                  sender_layout=sender_layout, model_fingerprint=model_fingerprint,
                                  timeout=timeout, tls=tls)
