"""`pdserve bench step`: the floor's arithmetic, the run on a tiny model (no timing assertions), and the vLLM
subprocess protocol against a stand-in interpreter (vLLM itself is not a dependency)."""

from __future__ import annotations

import json
import stat

import pytest

from engine.config import EngineConfig, ModelArch
from pdserve.bench.step import MachineRates, StepBench, StepWork, run, vllm_python, vllm_steps

SMOLLM2 = ModelArch(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
                    tie_word_embeddings=True, attention_bias=False, qk_norm=False, eos_token_ids=(2,))


def test_floor_of_smollm2_steps():
    kv_token = 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 heads of 64, bf16: 23 KB
    projections = 30 * (576 * (9 + 2 * 3) * 64 + 9 * 64 * 576 + 3 * 576 * 1536)
    lm_head = 49152 * 576
    params = projections + lm_head + (30 * 2 + 1) * 576  # + the norms; the tied embedding is the LM head
    assert SMOLLM2.num_params() == params
    one = StepWork.of(SMOLLM2, 1, 300, 2, kv_token)
    assert one.bytes == params * 2 + 300 * kv_token
    assert one.flops == 2 * (projections + lm_head)
    # The figures: 30.7 GB/s and 0.78 TFLOP/s give 9.0 ms at batch 1 and 23.1 ms at 64, both bandwidth-bound.
    rates = MachineRates(read_gb_s=30.7, matmul_tflop_s=0.78, dtype="bfloat16", threads=2)
    assert one.floor_s(rates) == pytest.approx(9.0e-3, rel=0.01)
    many = StepWork.of(SMOLLM2, 64, 300, 2, kv_token)
    assert many.floor_s(rates) == pytest.approx(23.1e-3, rel=0.01)
    assert many.floor_s(rates) == many.bytes / 30.7e9 > many.flops / 0.78e12
    compute_bound = MachineRates(read_gb_s=300, matmul_tflop_s=0.78, dtype="bfloat16", threads=2)
    assert many.floor_s(compute_bound) == many.flops / 0.78e12


def test_step_bench_runs_on_a_tiny_model(tiny_models):
    bench = StepBench(batch_sizes=(1, 3), context=20, rounds=2, steps=2, threads=1, vllm=False)
    report = run(bench, EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu"))
    assert [r.batch for r in report.rows] == [1, 3]
    assert all(r.eager_s > 0 and r.compiled_s > 0 and r.floor_s > 0 and r.vllm_s is None for r in report.rows)
    assert report.compiled.startswith("compiled decode step (native C++, float32")
    assert report.vllm == "skipped: --no-vllm"
    table = report.table()
    assert "compiled/floor" in table and "thread CPU time" in table
    ops = report.rows[1].ops_s  # the compiled step's own per-op timers
    assert {"attention", "qkv_proj", "gate_up_proj", "lm_head"} <= ops.keys() and ops["attention"] > 0
    assert "compiled step per op" in table
    assert json.loads(report.to_json())["rows"][1]["batch"] == 3


def test_step_bench_reports_a_refused_compiled_step(tiny_models):
    bench = StepBench(batch_sizes=(2,), context=12, rounds=1, steps=1, threads=1, vllm=False)
    report = run(bench, EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu",
                                     enforce_eager=True))
    assert report.compiled == "off (--enforce-eager)" and report.rows[0].compiled_s is None


def test_vllm_python_choice(monkeypatch):
    monkeypatch.setenv("PDSERVE_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert vllm_python("/elsewhere/python") == "/elsewhere/python"
    assert vllm_python(None) == "/opt/vllm/bin/python"
    monkeypatch.delenv("PDSERVE_VLLM_PYTHON")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert vllm_python(None) is None  # no vllm here: the column is skipped, with the reason in the report


def _stand_in(tmp_path, body: str) -> str:
    """An executable standing in for vLLM's Python: it gets the step script and its flags as arguments."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_vllm_steps_protocol(tmp_path):
    ok = _stand_in(tmp_path, 'case "$*" in *vllm_step.py*"--batches 1,8"*) ;; *) exit 3 ;; esac\n'
                             '[ "$VLLM_CPU_OMP_THREADS_BIND" = 0-1 ] || exit 4\n'
                             'echo "vLLM log line"\n'
                             'echo \'{"batch": 1, "step_s": 0.02, "step_cpu_s": 0.01, "short_s": 1, "long_s": 2}\'\n'
                             'echo \'{"batch": 8, "step_s": 0.03, "step_cpu_s": 0.02, "short_s": 1, "long_s": 3}\'\n')
    assert vllm_steps(ok, tmp_path, "bfloat16", (1, 8), 300, 2) == {1: (0.02, 0.02), 8: (0.03, 0.03)}  # wall
    one_thread = _stand_in(tmp_path, "echo '{\"batch\": 1, \"step_s\": 0.02, \"step_cpu_s\": 0.01}'\n")
    assert vllm_steps(one_thread, tmp_path, "bfloat16", (1,), 300, 1) == {1: (0.01, 0.02)}  # CPU time, and wall
    broken = _stand_in(tmp_path, 'echo "ModuleNotFoundError: No module named vllm" >&2\nexit 1\n')
    with pytest.raises(RuntimeError, match="exited 1: ModuleNotFoundError: No module named vllm"):
        vllm_steps(broken, tmp_path, "bfloat16", (1,), 300, 2)
    with pytest.raises(RuntimeError, match="could not run"):
        vllm_steps(str(tmp_path / "absent"), tmp_path, "bfloat16", (1,), 300, 2)
