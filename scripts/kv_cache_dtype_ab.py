"""Decode steps of SmolLM2-135M with the model-dtype KV cache and with int8 KV, interleaved in one process
(so both see the same load on a shared machine): bf16 weights, one torch thread, 300-token contexts.

    .venv/bin/python scripts/kv_cache_dtype_ab.py [STEPS]
"""

import sys
import time

import torch

from engine.config import EngineConfig
from engine.kv_cache import KVPool
from engine.runner import ModelRunner

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
context = 300
torch.set_num_threads(1)
runners = {kv: ModelRunner(EngineConfig(dtype="bfloat16", device="cpu", kv_cache_dtype=kv)) for kv in ("auto", "int8")}
for batch in (1, 32):
    per = context // 16 + 2
    setups = {kv: (r, KVPool.allocate(r.kv_layout(num_blocks=batch * per)), torch.arange(batch * per).view(batch, per))
              for kv, r in runners.items()}
    times: dict[str, list[float]] = {kv: [] for kv in runners}
    for i in range(steps):
        for kv, (runner, pool, tables) in setups.items():
            started = time.perf_counter()
            runner.decode(pool, torch.ones(batch, dtype=torch.long), torch.full((batch,), context + i), tables)
            times[kv].append(time.perf_counter() - started)
    for kv, ts in times.items():
        ts = sorted(ts[2:])  # the first two are warm-up
        print(f"batch {batch} context {context} kv {kv}: median {ts[len(ts) // 2] * 1000:.1f} ms, "
              f"best {ts[0] * 1000:.1f} ms")
