"""CUDA IPC transport (same node, GPU): the decode worker's KV pool is one CUDA
allocation, exported once as an IPC handle; a prefill worker opens it and
copies each request's K/V device-to-device into the reserved blocks.

Both processes must see the pool's GPU: Ray hides other GPUs from an actor
unless RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 is set, so a prefill
worker on another GPU of the node needs that setting (and P2P access).
"""

from __future__ import annotations

import pickle
import time

import torch

from engine.kv_cache import KVLayout, KVPool, block_runs
from kvtransfer.base import KVConnection, KVEndpoint, TransferHandle, TransferStats


def export_pool(pool: KVPool) -> bytes:
    """The IPC handle of a CUDA pool, as bytes to publish in the decode worker's endpoint."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not pool.tensor.is_cuda:
        raise ValueError("only a CUDA pool can be exported over CUDA IPC")
    return pickle.dumps(reduce_tensor(pool.tensor))


def open_pool(handle: bytes, layout: KVLayout) -> KVPool:
    rebuild, args = pickle.loads(handle)  # noqa: S301 - produced by our own decode worker (endpoint)
    return KVPool(layout, rebuild(*args))


class CudaIpcConnection(KVConnection):
    transport = "cuda_ipc"

    def __init__(self, endpoint: KVEndpoint) -> None:
        if not endpoint.cuda_ipc:
            raise ValueError(f"decode worker {endpoint.worker_id} exposes no CUDA IPC handle")
        self.pool = open_pool(endpoint.cuda_ipc, endpoint.layout)
        self._runs: dict[str, list[tuple[int, int, int]]] = {}
        self._bytes: dict[str, int] = {}
        self._busy: dict[str, float] = {}

    def begin(self, request_id: str, block_table: list[int], num_tokens: int) -> TransferHandle:
        self._runs[request_id] = block_runs(block_table, self.pool.layout.block_size, num_tokens)
        self._bytes[request_id] = 0
        self._busy[request_id] = 0.0
        return TransferHandle(request_id, tuple(block_table), num_tokens, time.time())

    def write_layer(self, handle: TransferHandle, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        device = self.pool.tensor.device
        started = time.perf_counter()
        self.pool.write_runs(layer, self._runs[handle.request_id], k.to(device), v.to(device))
        self._busy[handle.request_id] += time.perf_counter() - started  # launch time; finish() syncs
        self._bytes[handle.request_id] += (k.numel() + v.numel()) * k.element_size()

    def finish(self, handle: TransferHandle, timeout: float) -> TransferStats:
        started = time.perf_counter()
        torch.cuda.synchronize(self.pool.tensor.device)  # the copies land before the router admits
        busy = self._busy.pop(handle.request_id, 0.0) + time.perf_counter() - started
        self._runs.pop(handle.request_id, None)
        nbytes = self._bytes.pop(handle.request_id, 0)
        return TransferStats(handle.request_id, self.transport, nbytes, handle.started, time.time(), busy)

    def abort(self, handle: TransferHandle) -> None:
        self._runs.pop(handle.request_id, None)
        self._bytes.pop(handle.request_id, None)
        self._busy.pop(handle.request_id, None)

    def close(self) -> None:
        self.pool = None  # type: ignore[assignment]
        self._runs.clear()


def open_connection(endpoint: KVEndpoint, **_: object) -> CudaIpcConnection:
    return CudaIpcConnection(endpoint)
