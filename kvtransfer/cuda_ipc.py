"""CUDA IPC transport (same node, GPU): the decode worker's KV pool is one CUDA
allocation, exported once as an IPC handle; a prefill worker opens it and
copies each request's K/V device-to-device into the reserved blocks.

Each layer of a request is one launch (the KV-store kernel scatters every token
to its slot) on a side stream that waits for the layer's compute, so copies
overlap the next layer's prefill; `finish` waits on that request's last event,
never on the whole device, and its busy time comes from CUDA events.

Both processes must see the pool's GPU: Ray hides other GPUs from an actor
unless RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 is set, so a prefill
worker on another GPU of the node needs that setting (and P2P access).
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field

import torch

from engine.kv_cache import KVLayout, KVPool, rows_nbytes
from kvtransfer.base import KVConnection, KVEndpoint, TransferHandle, TransferStats
from proto.kinds import Transport


def export_pool(pool: KVPool) -> bytes:
    """The IPC handle of a CUDA pool, as bytes to publish in the decode worker's endpoint."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not pool.buffer.is_cuda:
        raise ValueError("only a CUDA pool can be exported over CUDA IPC")
    return pickle.dumps(reduce_tensor(pool.buffer))  # the whole buffer: data and (int8) scales


def open_pool(handle: bytes, layout: KVLayout) -> KVPool:
    rebuild, args = pickle.loads(handle)  # noqa: S301 - produced by our own decode worker (endpoint)
    return KVPool(layout, rebuild(*args))


@dataclass
class _Transfer:
    slots: torch.Tensor  # [num_tokens] flat pool slots, on the device
    bytes: int = 0
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)


def _store(pool: KVPool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    if k_scale is not None:  # int8 rows and their scales, as the sender stored them: copied bit for bit
        pool.write_stored(layer, slots, k, v, k_scale, v_scale)
        return
    try:
        from engine.kernels.triton_ops import store_kv
    except ImportError:  # no Triton: index_copy_ is still one launch per tensor
        pool.write_tokens(layer, slots, k, v)
        return
    cache = pool.layer(layer)
    store_kv(cache[0], cache[1], slots, k, v)


class CudaIpcConnection(KVConnection):
    transport = Transport.CUDA_IPC

    def __init__(self, endpoint: KVEndpoint) -> None:
        if not endpoint.cuda_ipc:
            raise ValueError(f"decode worker {endpoint.worker_id} exposes no CUDA IPC handle")
        self.pool = open_pool(endpoint.cuda_ipc, endpoint.layout)
        self.device = self.pool.device
        self.stream = torch.cuda.Stream(device=self.device)
        self._transfers: dict[str, _Transfer] = {}

    def begin(self, request_id: str, block_table: list[int], num_tokens: int,
              first_block: int = 0) -> TransferHandle:
        """Tokens from `first_block` on are sent (the receiver holds the blocks before it)."""
        bs = self.pool.layout.block_size
        table = torch.tensor(block_table, dtype=torch.int64)
        positions = torch.arange(first_block * bs, num_tokens)
        slots = table[positions // bs] * bs + positions % bs
        self._transfers[request_id] = _Transfer(slots.to(self.device, non_blocking=True))
        return TransferHandle(request_id, tuple(block_table), num_tokens, time.time(), first_block)

    def write_layer(self, handle: TransferHandle, layer: int, k: torch.Tensor, v: torch.Tensor,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        t = self._transfers[handle.request_id]
        rows = [x for x in (k, v, k_scale, v_scale) if x is not None]
        computed = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(computed)  # the layer's K/V exist before the copy reads them
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            _store(self.pool, layer, t.slots, *(None if x is None else x.to(self.device)
                                                for x in (k, v, k_scale, v_scale)))
            end.record(self.stream)
        for x in rows:
            x.record_stream(self.stream)  # the allocator must not reuse them before the copy is done
        t.events.append((start, end))
        t.bytes += rows_nbytes(*rows)

    def finish(self, handle: TransferHandle, timeout: float) -> TransferStats:
        t = self._transfers.pop(handle.request_id)
        if t.events:
            t.events[-1][1].synchronize()  # this request's copies only, not the whole device
        busy = sum(s.elapsed_time(e) for s, e in t.events) / 1000
        return TransferStats(handle.request_id, self.transport, t.bytes, handle.started, time.time(), busy)

    def abort(self, handle: TransferHandle) -> None:
        t = self._transfers.pop(handle.request_id, None)
        if t is not None and t.events:
            t.events[-1][1].synchronize()  # the router frees the blocks next: no copy may still write them

    def close(self) -> None:
        self.stream.synchronize()
        self.pool = None  # type: ignore[assignment]


def open_connection(endpoint: KVEndpoint, **_: object) -> CudaIpcConnection:
    return CudaIpcConnection(endpoint)
