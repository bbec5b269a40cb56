"""Run one function on every rank of a tensor-parallel group, each rank its own process (tests,
benchmarks, single-machine runs without Ray). Ray workers place their ranks themselves."""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from typing import Any

from engine.parallel.group import TensorParallel, init_tensor_parallel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, address: str, threads: int, target: Callable[..., Any], args: tuple,
               results: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        tp = init_tensor_parallel(rank, size, address)
        results.put((rank, True, target(tp, *args)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank's traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run_ranks(target: Callable[..., Any], size: int, *args: Any, threads: int = 1,
              timeout_s: float = 300.0) -> list[Any]:
    """`target(tp: TensorParallel, *args)` on `size` spawned ranks of `threads` threads each; their
    results in rank order. A rank's exception is raised here with its traceback."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, size, address, threads, target, args, results), daemon=True)
             for r in range(size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in range(size):
            rank, ok, value = results.get(timeout=timeout_s)
            if not ok:
                raise RuntimeError(f"tensor-parallel rank {rank} of {size} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(size)]


__all__ = ["TensorParallel", "free_port", "run_ranks"]
