"""Stop rules: EOS, ignore_eos, stop tokens, stop strings, max_tokens."""

from __future__ import annotations

from decode_worker.stopping import StopChecker
from engine.config import SamplingParams


def test_eos_max_tokens_and_stop_tokens(tokenizer):
    checker = StopChecker([2], tokenizer)
    assert checker.check([5, 2], SamplingParams(max_tokens=10)) == "stop"
    assert checker.check([5, 2], SamplingParams(max_tokens=10, ignore_eos=True)) is None
    assert checker.check([5, 6], SamplingParams(max_tokens=2)) == "length"
    assert checker.check([5, 6], SamplingParams(max_tokens=9, stop_token_ids=(6,))) == "stop"
    assert checker.check([5], SamplingParams(max_tokens=9)) is None


def test_stop_string_spanning_tokens(tokenizer):
    checker = StopChecker([2], tokenizer)
    ids = tokenizer("The planets are Mercury, Venus, Earth and Mars.", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=100, stop=("Earth and",))
    hits = [checker.check(ids[: i + 1], params) for i in range(len(ids))]
    first = hits.index("stop")
    assert "Earth and" in tokenizer.decode(ids[: first + 1]) and "Earth and" not in tokenizer.decode(ids[:first])
