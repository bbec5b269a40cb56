"""The tensor-parallel flags: vLLM's --tensor-parallel-size for every worker, --prefill-tp / --decode-tp per phase."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser, cluster_config
from pdserve.runtime.cluster import ClusterConfig


@pytest.mark.parametrize(("argv", "expected"), [
    ([], (1, 1)),
    (["--tensor-parallel-size", "2"], (2, 2)),
    (["-tp", "2", "--decode-tp", "1"], (2, 1)),
    (["--prefill-tp", "1", "--decode-tp", "2"], (1, 2)),
])
def test_each_phase_gets_its_degree(argv, expected):
    args = build_parser().parse_args(["run-batch", "-i", "in.jsonl", "-o", "out.jsonl", *argv])
    cluster = cluster_config(args)
    assert (cluster.prefill_tp, cluster.decode_tp) == expected


def test_a_degree_below_one_is_refused():
    with pytest.raises(ValueError, match="tensor parallel sizes must be at least 1"):
        ClusterConfig(decode_tp=0)
