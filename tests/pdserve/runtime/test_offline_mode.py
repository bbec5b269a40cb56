"""`--mode auto` for offline commands (pdserve/runtime/offline_mode.py): on one CPU node the measured
winner, said in the log; pd wherever PD-only flags, a joined cluster or a GPU say so; --mode given wins."""

from __future__ import annotations

import logging

import pytest

from pdserve.cli import build_parser
from pdserve.cli.flags import cluster_config
from pdserve.runtime import offline_mode
from proto.kinds import Mode

RUN_BATCH = ["run-batch", "-i", "in.jsonl", "-o", "out.jsonl", "--device", "cpu"]


def _mode(argv: list[str]) -> str:
    return cluster_config(build_parser().parse_args(argv)).mode


def test_auto_on_one_cpu_node_runs_the_measured_winner_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="pdserve.cli"):
        assert _mode(RUN_BATCH) == offline_mode.SINGLE_CPU_NODE
        assert _mode(["bench", "throughput", "--device", "cpu"]) == offline_mode.SINGLE_CPU_NODE
    assert "--mode auto: one CPU node" in caplog.text
    assert f"running --mode {offline_mode.SINGLE_CPU_NODE}" in caplog.text


@pytest.mark.parametrize("extra", [["--address", "auto"], ["--speculative", "ngram"], ["--prefill-workers", "2"],
                                   ["--decode-cpus", "1"], ["--prefill-threads", "1"]])
def test_auto_is_pd_where_the_run_asks_for_pd_or_leaves_the_node(extra):
    assert _mode([*RUN_BATCH, *extra]) == Mode.PD


@pytest.mark.parametrize("mode", Mode.words())
def test_a_mode_given_always_wins(mode):
    assert _mode([*RUN_BATCH, "--mode", mode]) == mode


def test_online_commands_keep_pd_as_their_default():
    assert _mode(["serve"]) == Mode.PD
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mode", "auto"])
