"""Shared-memory transport (same node, CPU): the decode worker's pool lives in
one POSIX shared-memory segment; a prefill worker maps it once and writes each
request's K/V straight into the reserved blocks (kvtransfer/direct.py).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from multiprocessing import shared_memory

import torch

from engine.kv_cache import KVLayout, KVPool
from kvtransfer.base import KVEndpoint
from kvtransfer.direct import DirectWriteConnection


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
            with contextlib.suppress(FileNotFoundError):  # already gone: nothing to clean
                self._shm.unlink()


class ShmConnection(DirectWriteConnection):
    transport = "shm"

    def __init__(self, endpoint: KVEndpoint) -> None:
        if not endpoint.shm_name:
            raise ValueError(f"decode worker {endpoint.worker_id} exposes no shared-memory pool")
        self._shared = SharedKVPool(endpoint.layout, endpoint.shm_name)
        super().__init__(self._shared.pool)

    def close(self) -> None:
        self.pool = None  # type: ignore[assignment]
        self._shared.close()


def open_connection(endpoint: KVEndpoint, **_: object) -> ShmConnection:
    return ShmConnection(endpoint)
