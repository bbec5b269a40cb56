"""Every GPU check and benchmark in one run, on a GPU host: see docs/gpu.md.

Run on a GPU host from the project root, after `make setup` and `python scripts/gpu_models.py`,
which writes the random-weight models /tmp/smol and /tmp/big:

    python scripts/gpu_check.py [STEP ...]      # steps: tests step tp ipc (default: all)

Each step prints `RESULT {json}` lines and appends them to $OUT/results.jsonl (default /tmp/out).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "/tmp/out"))
MODELS = {"smol": "/tmp/smol", "big": "/tmp/big"}
sys.path.insert(0, str(ROOT))


def result(step: str, **kw) -> None:
    kw["step"] = step
    print("RESULT " + json.dumps(kw), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(kw) + "\n")


def run(cmd: list[str], timeout: int) -> tuple[int, str]:
    started = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r.returncode, f"[{time.time() - started:.0f}s] " + (r.stdout + r.stderr)[-1500:]


def tests() -> None:
    """The Triton kernels for real (no interpreter), graph replay vs eager, the CUDA IPC round trip."""
    rc, tail = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "tests/engine/test_triton_kernels.py", "tests/decode_worker/test_decode_batcher.py",
                    "tests/kvtransfer/test_transfer_faults.py", "-k",
                    "triton or paged or extend or store or rms or rope or graph or cuda"], 240)
    result("tests", rc=rc, tail=tail)


def _decode_step_ms(folder: str, batch: int, context: int, backend: str, graphs: bool) -> float:
    from pdserve.bench.synthetic import synthetic_batcher

    batcher = synthetic_batcher(_runner(folder, backend), batch, context, room_blocks=40, cuda_graphs=graphs,
                                overlap=graphs)
    for _ in range(5):
        batcher.step()
    torch.cuda.synchronize()
    started, steps = time.perf_counter(), 50
    for _ in range(steps):
        batcher.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps * 1000


@functools.cache
def _runner(folder: str, backend: str):
    from engine.config import EngineConfig
    from engine.runner import ModelRunner

    return ModelRunner(EngineConfig(model=folder, dtype="bfloat16", device="cuda", kv_cache_gib=1,
                                    attention_backend=backend))


def step() -> None:
    """Decode step time at batch 64 (context 300): torch reference eager, Triton eager, Triton + graphs."""
    for name, folder in MODELS.items():
        times = {f"{b}{'+graphs' if g else ''}": _decode_step_ms(folder, 64, 300, b, g)
                 for b, g in (("torch", False), ("triton", False), ("triton", True))}
        result("decode_step_ms", model=name, batch=64, context=300, **{k: round(v, 3) for k, v in times.items()},
               device=torch.cuda.get_device_name())


def tp() -> None:
    """bench throughput on the GPU: pdserve vs transformers CB on the same GPU, same run."""
    share = ["--prefill-gpus", "0.5", "--decode-gpus", "0.5", "--device", "cuda", "--dtypes", "bfloat16"]
    for label, extra, timeout in (("smol-512", ["--model", MODELS["smol"], "--num-requests", "512",
                                                "--systems", "hf_cb,pdserve"], 240),
                                  ("big-nanovllm", ["--model", MODELS["big"], "--workload", "nanovllm",
                                                    "--systems", "pdserve"], 150)):
        js = OUT / f"tp-{label}.json"
        rc, tail = run([sys.executable, "-m", "pdserve.cli", "bench", "throughput", *share, *extra,
                        "--json", str(js)], timeout)
        report = json.loads(js.read_text()) if js.exists() else None
        result("throughput", workload=label, rc=rc, report=report, tail=tail if rc else tail[-300:])


def ipc() -> None:
    rc, tail = run([sys.executable, "-m", "pdserve.cli", "bench", "kvtransfer", "--transports", "cuda_ipc",
                    "--tokens", "1024,32768"], 120)
    result("kvtransfer_cuda_ipc", rc=rc, tail=tail)


STEPS = {"tests": tests, "step": step, "tp": tp, "ipc": ipc}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(STEPS):
        try:
            STEPS[name]()
        except Exception as e:  # one failed step must not hide the others' results
            result(name, error=repr(e))
