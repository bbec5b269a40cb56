"""`--speculative ngram` through a real Ray cluster, both transports: outputs equal plain decoding,
each line's `pdserve` extension carries drafted/accepted/α, and no KV block leaks."""

from __future__ import annotations

import json

import pytest

from engine.config import EngineConfig, SamplingParams
from engine.runner import ModelRunner
from pdserve.batch.run import BatchOptions, run_batch
from pdserve.bench.specdec import generate
from pdserve.runtime.cluster import ClusterConfig
from router.router import RouterConfig
from tests.engine.test_specdec_engine import REWRITE, _chat

MAX_TOKENS = 24


def test_cli_flags_reach_the_engine_config(tmp_path):
    from pdserve.cli import build_parser, engine_config

    args = build_parser().parse_args(["run-batch", "-i", "x", "-o", "y", "--speculative", "layers:4",
                                      "--num-speculative-tokens", "3"])
    cfg = engine_config(args)
    assert (cfg.speculative, cfg.num_speculative_tokens) == ("layers:4", 3)
    assert engine_config(build_parser().parse_args(["run-batch", "-i", "x", "-o", "y"])).speculative == "off"
    with pytest.raises(ValueError, match="--speculative must be"):
        EngineConfig(speculative="medusa")
    with pytest.raises(ValueError, match="--num-speculative-tokens"):
        EngineConfig(num_speculative_tokens=0)


@pytest.fixture(scope="module")
def plain_outputs(default_model_dir, tokenizer):
    runner = ModelRunner(EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.05, num_threads=1))
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0) for _ in REWRITE]
    return generate(runner, _chat(tokenizer, REWRITE), params, tokenizer=tokenizer).outputs


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_run_batch_with_ngram_equals_plain_decoding(ray_cluster, tmp_path, plain_outputs, transport):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"model": "SmolLM2-135M-Instruct", "max_tokens": MAX_TOKENS,
                                                "temperature": 0, "messages": [{"role": "user", "content": t}]}})
                           + "\n" for i, t in enumerate(REWRITE)))
    out = tmp_path / "out.jsonl"
    summary = run_batch(inp, out, EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25,
                                               speculative="ngram", num_speculative_tokens="auto"),
                        ClusterConfig(transport=transport), RouterConfig(max_prefill_tokens=512),
                        BatchOptions(progress=False))
    assert summary.succeeded == len(REWRITE) and summary.kv_blocks_leaked == 0
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for i, ref in enumerate(plain_outputs):
        ext = records[f"r{i}"]["pdserve"]
        assert ext["transport"] == transport
        assert ext["output_token_ids"] == ref, f"r{i}: speculative {ext['output_token_ids']} != plain {ref}"
        spec = ext["speculative"]
        assert 0 <= spec["accepted"] <= spec["drafted"] and 0 < spec["alpha"] < 1
    assert sum(records[f"r{i}"]["pdserve"]["speculative"]["accepted"] for i in range(len(REWRITE))) > 0


@pytest.mark.slow
def test_bench_specdec_quick(tmp_path, capsys):
    """The benchmark runs end to end (no timing assertions): table rows, exactness, the SVG plot."""
    import re

    from pdserve.cli import main

    svg = tmp_path / "speedup.svg"
    assert main(["bench", "specdec", "--quick", "--threads", "1", "--dtype", "float32", "--svg", str(svg)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^specdec best_speedup=\d+\.\d\d drafter=\S+ gamma=\S+ batch=2 all_exact=True$", out, re.M), out
    assert re.search(r"^\| ngram \| auto \| 2 \|", out, re.M) and re.search(r"^\| layers:24 \| 2 \| 2 \|", out, re.M)
    assert svg.read_text().startswith("<svg") and "polyline" in svg.read_text()
