"""One thread per process runs the model.

OpenMP keeps a thread team per calling thread. When a second thread also runs
torch ops (a Ray method thread, a gRPC handler), its team's threads spin on the
same cores as the model's team, and the model slows down: measured here, a
decode step went from 45 ms to 75 ms once another thread had run a few ops.
So every worker loads and runs its model on one `ComputeThread`, and other
threads that must touch tensors call `single_threaded()` first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def single_threaded() -> None:
    """For threads that are not a ComputeThread: run torch ops without an OpenMP team of their own."""
    if getattr(_local, "compute", False):
        return
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


_local = threading.local()


class ComputeThread:
    def __init__(self, num_threads: int, name: str = "compute") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                        initializer=self._init, initargs=(num_threads,))

    @staticmethod
    def _init(num_threads: int) -> None:
        _local.compute = True
        if num_threads > 0:
            torch.set_num_threads(num_threads)

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future[T]:
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run `fn` on the compute thread and wait for it (re-raising its exception)."""
        if getattr(_local, "compute", False):
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
