"""Time the decode loop's step at one batch size: SmolLM2-135M on the CPU, the batcher as a decode
worker runs it (greedy, EOS ignored, every sequence at the same context).

    .venv/bin/python scripts/decode_step_bench.py [DTYPE] [BATCH] [LABEL]

To compare two commits in the same minutes, run it alternately from two checkouts with
`PYTHONPATH=<checkout>` (both sides need pdserve/bench/synthetic.py).
"""

import sys
import time

import torch

from engine.config import EngineConfig
from engine.runner import ModelRunner
from pdserve.bench.synthetic import synthetic_batcher

dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
label = sys.argv[3] if len(sys.argv) > 3 else ""
context, steps = 300, 15
torch.set_num_threads(2)
runner = ModelRunner(EngineConfig(dtype=dtype, device="cpu", kv_cache_gib=0.5))
batcher = synthetic_batcher(runner, batch, context)
for _ in range(3):
    batcher.step()
times = []
for _ in range(steps):
    started = time.perf_counter()
    batcher.step()
    times.append(time.perf_counter() - started)
times.sort()
print(f"{label} {dtype} batch {batch} context {context}: median step {times[steps // 2] * 1000:.1f} ms, "
      f"best {times[0] * 1000:.1f} ms")
