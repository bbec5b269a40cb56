"""`bench serve --workload bimodal` (issue 28): most prompts short, some of 2-4k tokens, from a seed."""

from __future__ import annotations

import argparse

from pdserve.bench.workload import WorkloadSpec, make_workload
from pdserve.cli.bench.serve import bench_from_args


def test_bimodal_prompts_are_mostly_short_with_some_long(tokenizer):
    spec = WorkloadSpec(num_requests=40, min_prompt=16, max_prompt=256, prompt_lengths="bimodal", seed=1)
    lengths = [len(r.prompt_ids) for r in make_workload(spec, tokenizer)]
    short = [n for n in lengths if n <= 260]  # a prompt reaches its target within a word's tokens
    long = [n for n in lengths if 2048 <= n <= 4110]
    assert len(short) + len(long) == len(lengths)
    assert 2 <= len(long) <= 14 and len(short) > 2 * len(long)
    assert lengths == [len(r.prompt_ids) for r in make_workload(spec, tokenizer)]  # the seed decides


def test_the_workload_flag_sets_the_bimodal_spec():
    from pdserve.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--workload", "bimodal", "--prompt-len", "16:512"])
    assert isinstance(args, argparse.Namespace)
    workload = bench_from_args(args).workload
    assert workload.prompt_lengths == "bimodal" and workload.max_prompt == 256


def test_the_report_gives_hybrids_rate_over_the_better_baseline():
    from pdserve.bench.serve_report import hybrid_ratio

    def mode(rate):
        return {"sustained": {"rate_rps": rate}}

    report = {"modes": {"pd": mode(2.0), "colocated": mode(2.5), "hybrid": mode(3.0)}}
    assert hybrid_ratio(report) == 1.2
    assert hybrid_ratio({"modes": {"pd": mode(2.0), "hybrid": mode(3.0)}}) is None  # colocated did not run
    assert hybrid_ratio({"modes": {"pd": mode(0.0), "colocated": mode(None), "hybrid": mode(1.0)}}) is None
