"""Decode side: which requests expect KV, where it goes, and what has arrived.

Every transport's receiver writes through here, so range checks and
completeness are decided in one place. A request's blocks are named by their
index in its block table; the inbox maps them to physical blocks, so a peer
can never write outside the reservation it was given.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from engine.compute_thread import single_threaded
from engine.kv_cache import KVPool, block_runs, rows_nbytes
from kvtransfer.base import IntegrityError


@dataclass
class _Expected:
    table: list[int]
    num_tokens: int
    first_block: int = 0  # blocks before it hold cached KV already: nothing may be written there
    received: set[tuple[int, int]] = field(default_factory=set)  # (layer, block index)
    bytes: int = 0


class KVInbox:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.layout = pool.layout
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}

    def expect(self, request_id: str, block_table: list[int], num_tokens: int, first_block: int = 0) -> None:
        with self._lock:
            self._expected[request_id] = _Expected(list(block_table), num_tokens, first_block)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._expected.pop(request_id, None)

    def accept(self, request_id: str, layer: int, block_start: int, num_blocks: int,
               k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
               v_scale: torch.Tensor | None = None) -> int:
        """Write one chunk (k, v: [n, KVH, D] as stored; an int8 pool's scales [n, KVH]) into the reserved
        blocks; return its bytes."""
        single_threaded()  # a receiver thread: keep OpenMP off the decode loop's cores
        bs = self.layout.block_size
        with self._lock:
            exp = self._expected.get(request_id)
            if exp is None:
                raise IntegrityError(f"no KV reservation for request {request_id} (aborted or never reserved)")
            prompt_blocks = -(-exp.num_tokens // bs)
            if not 0 <= layer < self.layout.num_layers:
                raise IntegrityError(f"layer {layer} out of range for {self.layout.num_layers} layers")
            if block_start < exp.first_block or num_blocks <= 0 or block_start + num_blocks > prompt_blocks:
                raise IntegrityError(f"blocks {block_start}+{num_blocks} outside blocks {exp.first_block}.."
                                     f"{prompt_blocks} of request {request_id} (the ones it expects)")
            t0, t1 = block_start * bs, min((block_start + num_blocks) * bs, exp.num_tokens)
            if k.shape[0] != t1 - t0:
                raise IntegrityError(f"chunk has {k.shape[0]} tokens, blocks {block_start}+{num_blocks} hold {t1 - t0}")
            table = exp.table
        runs = block_runs(table, bs, t1 - t0, first_block=block_start)
        device = self.pool.device
        scales = (None, None) if k_scale is None else (k_scale.to(device), v_scale.to(device))
        try:
            self.pool.write_runs(layer, runs, k.to(device), v.to(device), *scales)
        except ValueError as e:  # rows of another KV dtype (a peer that skipped the handshake)
            raise IntegrityError(str(e)) from e
        nbytes = rows_nbytes(k, v, k_scale, v_scale)
        with self._lock:
            exp = self._expected.get(request_id)
            if exp is not None:
                exp.received.update((layer, b) for b in range(block_start, block_start + num_blocks))
                exp.bytes += nbytes
        return nbytes

    def is_complete(self, request_id: str) -> bool:
        with self._lock:
            return self._is_complete(request_id)

    def _is_complete(self, request_id: str) -> bool:
        exp = self._expected.get(request_id)
        if exp is None:
            return False
        return len(exp.received) == self.layout.num_layers * (-(-exp.num_tokens // self.layout.block_size)
                                                             - exp.first_block)

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._expected)
