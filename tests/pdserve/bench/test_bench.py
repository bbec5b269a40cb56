"""The benchmarks run (no timing assertions): `pdserve bench throughput --quick`."""

from __future__ import annotations

import re

import pytest

from pdserve.cli import main

pytestmark = pytest.mark.slow


def test_bench_throughput_quick(ray_cluster, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["bench", "throughput", "--quick", "--dtypes", "float32", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"throughput ratio_vs_hf_cb=\d+\.\d\d ratio_vs_hf_static=\d+\.\d\d roofline_share=\d\.\d{4}",
                        last), last
    for system in ("hf_static", "hf_cb", "pdserve"):
        assert re.search(rf"^\| {system} \|", out, re.M), f"no table row for {system}"
    import json

    report = json.loads(report_path.read_text())
    fp32 = report["dtypes"]["float32"]
    # In fp32, greedy pdserve equals both transformers baselines token for token.
    assert fp32["agreement"] == {"hf_static": 1.0, "hf_cb": 1.0}
    assert fp32["rows"]["pdserve"]["output_tok_s"] > 0 and 0 < fp32["roofline_share"] < 1


def test_bench_throughput_native_vs_generic_path(ray_cluster, tmp_path, capsys):
    """The same model on both paths in one run: greedy fp32 tokens equal, the ratio on the last line."""
    import json

    report_path = tmp_path / "report.json"
    assert main(["bench", "throughput", "--quick", "--dtypes", "float32", "--systems", "pdserve,pdserve_generic",
                 "--json", str(report_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r" ratio_native_vs_generic=\d+\.\d\d$", last), last
    fp32 = json.loads(report_path.read_text())["dtypes"]["float32"]
    assert fp32["agreement"] == {"pdserve_generic": 1.0}
    assert fp32["ratio_native_vs_generic"] > 0


def test_bench_throughput_breakdown_and_a_missing_vllm(ray_cluster, tmp_path, capsys, monkeypatch):
    """PD with the core lease: the makespan's split and the ideal beside it; vllm asked for but not
    installed: its row is skipped with the reason, the last line says n/a."""
    monkeypatch.delenv("PDSERVE_VLLM_PYTHON", raising=False)
    report_path = tmp_path / "report.json"
    assert main(["bench", "throughput", "--quick", "--dtypes", "float32", "--systems", "pdserve,vllm", "--mode", "pd",
                 "--breakdown", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].endswith("vllm_out_tok_s=n/a ratio_vs_vllm=n/a")
    assert "vllm skipped: no vLLM Python given (--vllm-python PATH or PDSERVE_VLLM_PYTHON)" in out
    assert re.search(r"^ideal makespan \d+\.\d\d s \(prefill .* vs measured \d+\.\d\d s", out, re.M), out
    import json

    split = json.loads(report_path.read_text())["breakdown"]["float32"]
    assert split["prefill_s"] > 0 and split["decode_s"] > 0
    assert split["prefill_s"] + split["decode_s"] + split["rest_s"] == pytest.approx(split["makespan_s"])


def test_bench_kvtransfer_quick(capsys):
    assert main(["bench", "kvtransfer", "--quick"]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"kvtransfer tokens=512 shm_gbps=[\d.]+ shm_vs_memcpy=[\d.]+ grpc_gbps=[\d.]+ "
                        r"grpc_vs_memcpy=[\d.]+", last), last
    assert "memcpy" in out and out.count("tokens") >= 3


def test_bench_sampling_prints_both_methods_per_setting(capsys):
    """Runs on the default model's logits; the earlier method it compares against must draw only tokens
    the current sampler can draw (the same nucleus, the same top-k)."""
    import torch

    from engine.sampler import SamplingTensors, processed_probs_t
    from pdserve.bench.sampling import SETTINGS, earlier_sample, main, model_logits

    assert main(["--batch-sizes", "2", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == len(SETTINGS) and all(r[0] == "2" and r[-1].endswith("x") for r in rows)
    logits = model_logits(2, "float32")
    for params in SETTINGS.values():
        st = SamplingTensors.build([params] * 2, "cpu")
        probs = processed_probs_t(logits, st)
        for step in range(20):
            drawn = earlier_sample(logits, st, torch.full((2,), step))
            assert (probs.gather(1, drawn[:, None]) > 0).all()
