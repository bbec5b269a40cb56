"""Speculative decoding's figures: what the decode worker records per request (known answers from a
scripted drafter through the real batcher), and the dashboard's and Prometheus' sums over records."""

from __future__ import annotations

import re

import pytest

from engine.config import SamplingParams
from engine.specdec import Draft
from pdserve.bench.specdec import generate
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.dashboard.state import dashboard_state
from pdserve.observability.metrics import SLO, from_record, summarize
from tests.engine.test_specdec_engine import _prompts, _runner
from tests.pdserve.observability.test_metrics import record


class ByRequestDrafter:
    """Request 0 gets plain decoding's own continuation (every draft stands), request 1 a wrong one
    while it holds fewer than 8 tokens (none stands), request 2 nothing: once request 0 is done and
    request 1 has 8 tokens, no sequence has a draft and the steps are plain ones."""

    name, needs_prompt_ids = "by-request", False

    def __init__(self, reference: list[list[int]]) -> None:
        self.reference = reference

    def propose(self, seqs, gammas):
        drafts = []
        for s, g in zip(seqs, gammas):
            i = int(s.request_id)
            ref = self.reference[i][len(s.output):len(s.output) + g]
            wrong = tuple((t + 1) % 256 for t in ref) if i == 1 and len(s.output) < 8 else ()
            drafts.append(Draft(tuple(ref) if i == 0 else wrong))
        return drafts


def test_decode_worker_records_steps_gamma_and_forwards(tiny_models):
    runner = _runner(tiny_models["llama"])
    prompts = _prompts(2)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) for _ in prompts]
    plain = generate(runner, prompts, params)

    def install(stepper) -> None:
        stepper.drafter = ByRequestDrafter(plain.outputs)

    fast = generate(runner, prompts, params, "ngram", 4, stepper_hook=install)
    assert fast.outputs == plain.outputs
    # 23 decode tokens each. Request 0: steps ask γ = min(4, tokens left - 1) = 4, 4, 4, 4, 2, all
    # stand, 5 tokens a step but the last (3). Requests 1 and 2 are in the first 7 steps (request 1
    # holds 1..7 tokens then, asked 4 each time), then 16 plain steps: one token per forward.
    zero, one, two = fast.per_request
    assert {k: zero[k] for k in ("drafted", "accepted", "steps", "gamma_mean", "forwards")} == \
        {"drafted": 18, "accepted": 18, "steps": 5, "gamma_mean": 3.6, "forwards": 5}
    assert {k: one[k] for k in ("drafted", "accepted", "steps", "gamma_mean", "forwards")} == \
        {"drafted": 28, "accepted": 0, "steps": 7, "gamma_mean": 4.0, "forwards": 23}
    assert {k: two[k] for k in ("drafted", "accepted", "steps", "gamma_mean", "forwards")} == \
        {"drafted": 0, "accepted": 0, "steps": 7, "gamma_mean": 4.0, "forwards": 23}
    assert fast.spec_steps == 7 and fast.plain_steps == 16

    # The same figures as output lines: the dashboard's summary and Prometheus add them up.
    records = [spec_record(str(i), 1 + 23, s) for i, s in enumerate(fast.per_request)]
    spec = summarize([from_record(r) for r in records], SLO())["speculative"]
    assert spec["acceptance_rate"] == pytest.approx(18 / 46)
    assert spec["tokens_per_forward"] == pytest.approx(69 / 51)
    assert spec["mean_accepted"] == pytest.approx(18 / 19)
    assert spec["gamma_mean"] == pytest.approx((18 + 28 + 28) / 19)


def spec_record(cid: str, n_tokens: int, spec: dict | None, queued: float = 100.0) -> dict:
    r = record(cid, queued, queued + 0.1, queued + 0.2, queued + 0.25, queued + 0.25,
               [10.0 * i for i in range(n_tokens)])
    if spec is not None:
        r["pdserve"]["speculative"] = spec
    return r


RECORDS = [
    spec_record("a", 11, {"drafted": 12, "accepted": 9, "alpha": 0.7, "steps": 4, "gamma_mean": 3.0,
                          "forwards": 5}),
    spec_record("b", 6, {"drafted": 8, "accepted": 2, "alpha": 0.3, "steps": 2, "gamma_mean": 4.0,
                         "forwards": 3}, queued=101.0),
    # A line written before steps/γ/forwards were recorded: counts in drafted/accepted only.
    spec_record("c", 4, {"drafted": 5, "accepted": 5, "alpha": 0.9}),
    spec_record("d", 3, None),  # speculation off for this one
]


def _value(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_summary_and_prometheus_equal_the_sums_over_records():
    spec = summarize([from_record(r) for r in RECORDS], SLO())["speculative"]
    assert (spec["requests"], spec["drafted"], spec["accepted"]) == (3, 25, 16)
    assert (spec["steps"], spec["forwards"], spec["decode_tokens"]) == (6, 8, 10 + 5)
    assert spec["acceptance_rate"] == pytest.approx(16 / 25)
    assert spec["tokens_per_forward"] == pytest.approx(15 / 8)
    assert spec["gamma_mean"] == pytest.approx((3 * 4 + 4 * 2) / 6)
    collector = MetricsCollector(SLO())
    for r in RECORDS:
        collector.record(r)
    text = collector.prometheus().decode()
    assert _value(text, "pdserve_spec_draft_tokens_total") == 25
    assert _value(text, "pdserve_spec_accepted_tokens_total") == 16
    assert _value(text, "pdserve_spec_steps_total") == 6
    assert _value(text, "pdserve_spec_gamma_asked_total") == pytest.approx(20)
    assert _value(text, "pdserve_spec_target_forwards_total") == 8
    assert _value(text, "pdserve_spec_decode_tokens_total") == 15
    assert _value(text, "pdserve_spec_acceptance_rate") == pytest.approx(16 / 25)
    assert _value(text, "pdserve_spec_tokens_per_forward") == pytest.approx(15 / 8)
    assert _value(text, "pdserve_spec_gamma_mean") == pytest.approx(20 / 6)
    state = dashboard_state([from_record(r) for r in RECORDS], SLO())
    assert state["summary"]["speculative"] == spec
    points = [p for p in state["series"]["speculative"] if p["acceptance_rate"] is not None]
    assert [p["acceptance_rate"] for p in points] == [pytest.approx(14 / 17), pytest.approx(2 / 8)]


def test_no_speculation_no_figures():
    assert summarize([from_record(RECORDS[3])], SLO())["speculative"] is None
    state = dashboard_state([from_record(RECORDS[3])], SLO())
    assert state["series"]["speculative"] == []
    text = MetricsCollector(SLO()).prometheus().decode()
    assert _value(text, "pdserve_spec_draft_tokens_total") == 0
