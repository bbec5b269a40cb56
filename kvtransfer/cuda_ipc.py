"""CUDA IPC transport (same node, GPU): the decode worker's KV pool is one CUDA
allocation, exported once as an IPC handle; a prefill worker opens it and
copies each request's K/V device-to-device into the reserved blocks.

Both processes must see the pool's GPU: Ray hides other GPUs from an actor
unless RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 is set, so a prefill
worker on another GPU of the node needs that setting (and P2P access).
"""

from __future__ import annotations

import pickle

import torch

from engine.kv_cache import KVLayout, KVPool
from kvtransfer.base import KVEndpoint
from kvtransfer.direct import DirectWriteConnection


def export_pool(pool: KVPool) -> bytes:
    """The IPC handle of a CUDA pool, as bytes to publish in the decode worker's endpoint."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not pool.tensor.is_cuda:
        raise ValueError("only a CUDA pool can be exported over CUDA IPC")
    return pickle.dumps(reduce_tensor(pool.tensor))


def open_pool(handle: bytes, layout: KVLayout) -> KVPool:
    rebuild, args = pickle.loads(handle)  # noqa: S301 - produced by our own decode worker (endpoint)
    return KVPool(layout, rebuild(*args))


class CudaIpcConnection(DirectWriteConnection):
    transport = "cuda_ipc"

    def __init__(self, endpoint: KVEndpoint) -> None:
        if not endpoint.cuda_ipc:
            raise ValueError(f"decode worker {endpoint.worker_id} exposes no CUDA IPC handle")
        super().__init__(open_pool(endpoint.cuda_ipc, endpoint.layout))

    def sync(self) -> None:
        torch.cuda.synchronize(self.pool.tensor.device)

    def close(self) -> None:
        self.pool = None  # type: ignore[assignment]


def open_connection(endpoint: KVEndpoint, **_: object) -> CudaIpcConnection:
    return CudaIpcConnection(endpoint)
