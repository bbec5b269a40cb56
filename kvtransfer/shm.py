"""Shared-memory transport (same node, CPU): the decode worker's pool lives in
one POSIX shared-memory segment; a prefill worker maps it once and writes each
request's K/V straight into the reserved blocks. One copy, no serialization.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from multiprocessing import shared_memory

import torch

from engine.kv_cache import KVLayout, KVPool, block_runs
from kvtransfer.base import KVConnection, KVEndpoint, TransferHandle, TransferStats


class SharedKVPool:
    """A KV pool backed by a named shared-memory segment.

    The creator (decode worker) owns the segment and unlinks it on close; an
    attacher (prefill worker) only maps it and must never unlink it.
    """

    def __init__(self, layout: KVLayout, name: str | None = None) -> None:
        self.layout = layout
        self.owner = name is None
        if name is None:
            name = f"pdserve-kv-{uuid.uuid4().hex[:12]}"
            # The owner registers with Python's resource tracker, which unlinks the segment if we die.
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=layout.nbytes)
            buf = self._shm.buf
        else:
            # Map without SharedMemory: before 3.13 it registers attachers too, and their exit would
            # unlink the owner's pool.
            import _posixshmem

            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
            try:
                if os.fstat(fd).st_size < layout.nbytes:
                    raise ValueError(f"shared pool {name} is smaller than layout {layout}")
                self._map = mmap.mmap(fd, layout.nbytes)
            finally:
                os.close(fd)
            buf = self._map
        self.name = name
        self.pool = KVPool(layout, torch.frombuffer(buf, dtype=torch.uint8, count=layout.nbytes))
        if self.owner:
            # Touch every page now: a fresh segment faults a page in on first write, which would
            # slow the first transfers into each block (measured: 1.4 GB/s instead of ~15).
            self.pool.tensor.view(-1).view(torch.uint8).zero_()

    def close(self) -> None:
        self.pool = None  # type: ignore[assignment]  # drop views before unmapping
        try:
            if self.owner:
                self._shm.close()
            else:
                self._map.close()
        except BufferError:
            return  # a view still exists somewhere; the mapping goes with the process
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass


class ShmConnection(KVConnection):
    transport = "shm"

    def __init__(self, endpoint: KVEndpoint) -> None:
        if not endpoint.shm_name:
            raise ValueError(f"decode worker {endpoint.worker_id} exposes no shared-memory pool")
        self._shared = SharedKVPool(endpoint.layout, endpoint.shm_name)
        self._runs: dict[str, list[tuple[int, int, int]]] = {}
        self._bytes: dict[str, int] = {}
        self._busy: dict[str, float] = {}

    def begin(self, request_id: str, block_table: list[int], num_tokens: int) -> TransferHandle:
        self._runs[request_id] = block_runs(block_table, self._shared.layout.block_size, num_tokens)
        self._bytes[request_id] = 0
        self._busy[request_id] = 0.0
        return TransferHandle(request_id, tuple(block_table), num_tokens, time.time())

    def write_layer(self, handle: TransferHandle, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        started = time.perf_counter()
        self._shared.pool.write_runs(layer, self._runs[handle.request_id], k.cpu(), v.cpu())
        self._busy[handle.request_id] += time.perf_counter() - started
        self._bytes[handle.request_id] += (k.numel() + v.numel()) * k.element_size()

    def finish(self, handle: TransferHandle, timeout: float) -> TransferStats:
        self._runs.pop(handle.request_id, None)
        nbytes = self._bytes.pop(handle.request_id, 0)
        busy = self._busy.pop(handle.request_id, 0.0)
        return TransferStats(handle.request_id, self.transport, nbytes, handle.started, time.time(), busy)

    def abort(self, handle: TransferHandle) -> None:
        self._runs.pop(handle.request_id, None)
        self._bytes.pop(handle.request_id, None)
        self._busy.pop(handle.request_id, None)

    def close(self) -> None:
        self._shared.close()


def open_connection(endpoint: KVEndpoint, **_: object) -> ShmConnection:
    return ShmConnection(endpoint)
