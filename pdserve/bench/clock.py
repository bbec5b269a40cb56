"""The clock in-process benchmarks time with.

At one torch thread every step runs on the calling thread, so its CPU time
measures the work alone: another process on the machine does not inflate it,
where wall time swings 2-10x on a shared 2-core host. With more threads, wall
time (CPU time would add the threads up)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def bench_clock() -> Callable[[], float]:
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def clock_name() -> str:
    return "thread CPU time" if bench_clock() is time.thread_time else "wall time"
