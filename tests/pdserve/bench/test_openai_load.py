"""vLLM's load client, re-implemented (pdserve/bench/openai_load.py), and `pdserve bench serve --base-url`:
its stream parsing and random dataset alone, then its request/stream format against a real `pdserve serve`
(real uvicorn, Ray workers, the default model), as `vllm bench serve --backend openai --endpoint
/v1/completions` runs it."""

from __future__ import annotations

import json
import random

import pytest

from pdserve.bench.openai_load import EventSplitter, RandomDataset, _read_event, random_requests
from pdserve.bench.serve import Target, ratios
from pdserve.bench.serve_sample import Sample
from pdserve.cli.bench.serve import _goodput_slo
from pdserve.observability.metrics import SLO


def _events(stream: bytes, cuts: list[int]) -> list[str]:
    splitter, out, last = EventSplitter(), [], 0
    for cut in [*cuts, len(stream)]:
        out += splitter.add(stream[last:cut])
        last = cut
    return out


def test_events_split_the_same_wherever_the_bytes_are_cut():
    bodies = [{"choices": [{"text": "é😀 x"}]}, {"choices": [], "usage": {"completion_tokens": 2}}]
    stream = "".join(f"data: {json.dumps(b, ensure_ascii=False)}\n\n" for b in bodies).encode() + b"data: [DONE]\n\n"
    whole = _events(stream, [])
    assert whole == [f"data: {json.dumps(b, ensure_ascii=False)}" for b in bodies] + ["data: [DONE]"]
    rng = random.Random(0)
    for _ in range(50):  # cuts inside multi-byte characters and inside the blank line
        assert _events(stream, sorted(rng.sample(range(1, len(stream)), 5))) == whole


def test_a_stream_fills_the_sample_as_vllm_counts_it():
    s = Sample("a", 10, 3, scheduled=0.0)
    _read_event(": ping", s, 0.0)
    assert s.first is None
    _read_event('data: {"choices": [{"text": "a"}]}', s, 0.0)
    first = s.first
    _read_event('data: {"choices": [{"text": ""}]}', s, 0.0)  # an empty text still counts as a chunk
    assert first is not None and s.end is not None and s.end >= first
    end = s.end
    _read_event('data: {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 10}}', s, 0.0)
    _read_event("data: [DONE]", s, 0.0)
    assert (s.first, s.end, s.output_tokens, s.error) == (first, end, 3, None)  # latency ends at the last token
    _read_event('data: {"error": {"message": "boom"}}', s, 0.0)
    assert s.error == "boom"


def test_random_prompts_have_the_asked_lengths_and_repeat_with_the_seed(tokenizer):
    spec = RandomDataset(input_len=40, output_len=7)
    a, b = random_requests(spec, 5, tokenizer, seed=3), random_requests(spec, 5, tokenizer, seed=3)
    assert a == b and a != random_requests(spec, 5, tokenizer, seed=4)
    special = set(tokenizer.all_special_ids)
    for r in a:
        assert len(r.prompt_ids) == 40 and r.max_tokens == 7 and not special & set(r.prompt_ids)
        assert tokenizer.decode(list(r.prompt_ids)) == r.prompt
    ranged = random_requests(RandomDataset(40, 10, range_ratio=0.5), 50, tokenizer, seed=0)
    assert {len(r.prompt_ids) for r in ranged} <= set(range(20, 61)) and len({r.max_tokens for r in ranged}) > 1
    assert all(5 <= r.max_tokens <= 15 for r in ranged)
    with pytest.raises(ValueError, match="range-ratio"):
        RandomDataset(10, 10, range_ratio=1.0)


def test_goodput_and_base_url_flags_parse_as_vllm_writes_them():
    assert _goodput_slo(["ttft:2000", "tpot:150"], SLO()) == SLO(ttft_s=2.0, tpot_s=0.15)
    assert _goodput_slo(None, SLO(ttft_s=3.0)) == SLO(ttft_s=3.0)
    for bad in (["e2e:100"], ["ttft:x"], ["tpot:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            _goodput_slo(bad, SLO())
    assert Target.parse("vllm=http://127.0.0.1:8000/") == Target("vllm", "http://127.0.0.1:8000")
    assert Target.parse("http://h:1") == Target("h:1", "http://h:1")
    with pytest.raises(ValueError, match="--base-url"):
        Target.parse("vllm=h:1")


def test_ratios_are_taken_against_the_baseline_rate_by_rate():
    def mode(goodput, tpot, sustained):
        return {"rates": [{"rate_rps": 3, "goodput_rps": goodput, "tpot_mean_s": tpot, "ttft_mean_s": 0.1}],
                "sustained": {"rate_rps": sustained}}

    report = {"modes": {"vllm": mode(2.0, 0.04, 4.0), "pd": mode(3.0, 0.02, 5.0), "bad": {"error": "x"}}}
    got = ratios(report, "vllm")
    assert got == {"pd": [{"rate_rps": 3, "goodput_rps": 1.5, "tpot_mean_s": 0.5, "ttft_mean_s": 1.0},
                          {"sustained": 1.25}]}
    assert ratios(report, None) == {} and ratios({"modes": {"vllm": {"error": "x"}}}, "vllm") == {}


@pytest.mark.slow
def test_vllm_load_through_pdserve_serve_with_its_breakdown(ray_cluster, tmp_path, capsys):
    """`pdserve bench serve --base-url` (vLLM's request/stream format) against a running `pdserve serve`:
    every request streams all its tokens; the server's /metrics accounts for each token streamed."""
    from engine.config import EngineConfig
    from pdserve.cli import main
    from pdserve.runtime.cluster import ClusterConfig
    from pdserve.serve.server import ServeOptions, start_server
    from router.router import RouterConfig

    running = start_server(EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.25), ClusterConfig(),
                           RouterConfig(max_prefill_tokens=256), ServeOptions(port=0))
    try:
        out = tmp_path / "report.json"
        rc = main(["bench", "serve", "--modes", "", "--base-url", f"pdserve={running.url}", "--dataset-name",
                   "random", "--random-input-len", "24", "--random-output-len", "5", "--num-prompts", "6",
                   "--request-rate", "4", "--ignore-eos", "--goodput", "ttft:60000", "tpot:60000", "--warmup", "1",
                   "--json", str(out), "--report", str(tmp_path / "r.html")])
    finally:
        running.stop()
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["slo"] == {"ttft_s": 60.0, "tpot_s": 60.0} and report["rates"] == [4.0]
    (row,) = report["modes"]["pdserve"]["rates"]
    assert row["requests"] == row["completed"] == 6 and row["failed"] == 0, row["errors"]
    assert row["output_tokens"] == 6 * 5 and row["prompt_tokens"] == 6 * 24
    assert row["attainment"] == 1.0 and row["goodput_rps"] > 0
    b = row["breakdown"]  # every token handed to a client during the rate, and the steps that made them
    assert b["tokens"] == 30 and b["steps"] >= 4
    assert b["step_ms"]["forward"] > 0 and b["step_ms"]["forward"] <= b["step_ms"]["step total"]
    assert b["token_ms"]["router wait"] >= 0 and b["token_ms"]["http thread CPU"] > 0
    printed = capsys.readouterr().out
    assert "per output token" in printed and "[pdserve] 4 req/s: goodput" in printed


def test_runs_of_the_random_dataset_are_vllms_prompts_per_rate(tokenizer):
    from pdserve.bench.openai_load import PromptRequest
    from pdserve.bench.serve import ServeBench, make_runs

    bench = ServeBench(rates=(1.0, 2.0), modes=("pd",), num_prompts=3, warmup=1,
                       dataset=RandomDataset(input_len=30, output_len=4))
    runs, warmup = make_runs(bench, tokenizer)
    assert [rate for rate, _, _ in runs] == [1.0, 2.0] and len(warmup) == 1
    prompts = [r.prompt for _, reqs, _ in runs for r in reqs] + [warmup[0].prompt]
    assert len(set(prompts)) == 7  # no rate replays another's prompts into the prefix cache
    for rate, reqs, offsets in runs:
        assert all(isinstance(r, PromptRequest) and len(r.prompt_ids) == 30 and r.max_tokens == 4 for r in reqs)
        assert [r.custom_id for r in reqs] == [f"{rate:g}-{i}" for i in range(3)] and len(offsets) == 3
    with pytest.raises(ValueError, match="--direct"):
        ServeBench(direct=True, dataset=RandomDataset())
    with pytest.raises(ValueError, match="--base-url"):
        ServeBench(modes=())
