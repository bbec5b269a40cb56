"""`TensorParallel`: one worker's rank in its tensor-parallel group, and the collectives the model needs.

A group is one `torch.distributed` process group per worker (gloo on a CPU, NCCL on CUDA). Degree 1
(`SINGLE`) needs no process group: every collective is the identity, so the TP-1 forward is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in its worker's tensor-parallel group."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None: the default group (one worker per process)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of {self.size} is out of range")

    @property
    def is_driver(self) -> bool:
        """Rank 0 talks to the router; the others follow its steps."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (same shape on all ranks), in place."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [..., n] side by side, in rank order: [..., size * n]."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (the step's inputs, sent once per step)."""
        if self.size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (start-up facts: each rank's pool)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out


SINGLE = TensorParallel()


def init_tensor_parallel(rank: int, size: int, init_method: str, device: str = "cpu",
                         timeout_s: float = 60.0) -> TensorParallel:
    """Join (or, at size 1, skip) the process group of one worker. `init_method`: e.g. tcp://host:port,
    the same on every rank. gloo on a CPU, NCCL on CUDA."""
    if size == 1:
        return SINGLE
    backend = "nccl" if device.startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                         timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank, size)
