"""The prefill side of a same-node CPU transport (shared memory): the decode worker's pool is mapped
into this process, and each layer is copied straight into the request's reserved blocks, as
contiguous runs (usually one per layer). One copy, no serialization. (CUDA IPC writes the same way
from a side stream: kvtransfer/cuda_ipc.py.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.kv_cache import KVPool, block_runs, rows_nbytes
from kvtransfer.base import KVConnection, TransferHandle, TransferStats


@dataclass
class _Transfer:
    runs: list[tuple[int, int, int]]
    bytes: int = 0
    busy_s: float = 0.0


class DirectWriteConnection(KVConnection):
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._transfers: dict[str, _Transfer] = {}

    def begin(self, request_id: str, block_table: list[int], num_tokens: int,
              first_block: int = 0) -> TransferHandle:
        bs = self.pool.layout.block_size
        self._transfers[request_id] = _Transfer(block_runs(block_table, bs, num_tokens - first_block * bs, first_block))
        return TransferHandle(request_id, tuple(block_table), num_tokens, time.time(), first_block)

    def write_layer(self, handle: TransferHandle, layer: int, k: torch.Tensor, v: torch.Tensor,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        t = self._transfers[handle.request_id]
        started = time.perf_counter()
        device = self.pool.device
        scales = (None, None) if k_scale is None else (k_scale.to(device), v_scale.to(device))
        self.pool.write_runs(layer, t.runs, k.to(device), v.to(device), *scales)
        t.busy_s += time.perf_counter() - started
        t.bytes += rows_nbytes(k, v, k_scale, v_scale)

    def finish(self, handle: TransferHandle, timeout: float) -> TransferStats:
        t = self._transfers.pop(handle.request_id)  # CPU copies are done when write_layer returns
        return TransferStats(handle.request_id, self.transport, t.bytes, handle.started, time.time(), t.busy_s)

    def abort(self, handle: TransferHandle) -> None:
        self._transfers.pop(handle.request_id, None)
