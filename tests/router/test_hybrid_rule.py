"""The hybrid rule (router/hybrid_rule.py) on made cases: which path each request takes and why."""

from __future__ import annotations

import pytest

from proto.kinds import PrefillPath
from router.hybrid_rule import HybridRule, HybridSignals

RULE = HybridRule(load_edges=(0.5, 0.9), chunk_max_tokens=(512, 128, 0), prefill_tokens_per_s=1000.0,
                  ttft_slo_s=2.0)


def signals(prompt: int, cached: int = 0, queue: int = 0, load: float = 0.2, ttft: float = 2.0) -> HybridSignals:
    return HybridSignals(prompt, cached, queue, load, ttft)


def test_a_long_prompt_goes_to_a_prefill_worker():
    assert RULE.choose(signals(3000)) == PrefillPath.PD


def test_a_short_prompt_is_chunked():
    assert RULE.choose(signals(200)) == PrefillPath.CHUNKED


def test_a_long_prompt_whose_prefix_is_cached_is_chunked():
    assert RULE.choose(signals(3000, cached=2800)) == PrefillPath.CHUNKED
    assert RULE.choose(signals(3000, cached=2000)) == PrefillPath.PD  # 1000 uncached: still long


def test_the_threshold_falls_as_the_decode_load_rises():
    assert RULE.choose(signals(300, load=0.2)) == PrefillPath.CHUNKED
    assert RULE.choose(signals(300, load=0.6)) == PrefillPath.PD
    assert RULE.choose(signals(100, load=0.6)) == PrefillPath.CHUNKED


def test_a_saturated_decode_side_chunks_nothing():
    assert RULE.choose(signals(16, load=0.95)) == PrefillPath.PD
    assert RULE.choose(signals(3000, queue=100_000, load=1.2)) == PrefillPath.PD  # even with a hopeless queue


def test_a_prefill_queue_that_would_miss_the_ttft_slo_sends_the_request_to_the_chunked_path():
    assert RULE.choose(signals(1000, queue=500)) == PrefillPath.PD  # 1.5 s of prefill: within 2 s
    assert RULE.choose(signals(1000, queue=1500)) == PrefillPath.CHUNKED  # 2.5 s: would miss
    assert RULE.choose(signals(1000, queue=1500, ttft=5.0)) == PrefillPath.PD  # its own SLO is looser


def test_every_prompt_computes_at_least_one_token():
    assert signals(64, cached=64).uncached_tokens == 1


def test_a_rule_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="thresholds"):
        HybridRule(load_edges=(0.5,), chunk_max_tokens=(1, 2, 3))
    with pytest.raises(ValueError, match="rise"):
        HybridRule(load_edges=(0.9, 0.5), chunk_max_tokens=(1, 2, 0))


def test_the_rule_prints_one_line_per_load_level():
    text = RULE.describe()
    assert "decode load 0%-50%: chunk prompts up to 512" in text
    assert "decode load 50%-90%: chunk prompts up to 128" in text
    assert "decode load >= 90%: prefill every prompt on PD" in text
