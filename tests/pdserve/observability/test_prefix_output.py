"""cached_tokens in every place a user reads it: the OpenAI usage, the pdserve extension, the run-batch
summary's hit rate, the metrics summary and Prometheus."""

from __future__ import annotations

from engine.config import SamplingParams
from pdserve.batch.run import BatchSummary
from pdserve.observability.dashboard.collector import MetricsCollector
from pdserve.observability.metrics import SLO, from_record, summarize
from pdserve.openai.records import success_record
from router.request import Request, State


def _done(rid: str, prompt: int, cached: int) -> Request:
    req = Request(rid, rid, 1, "completion", list(range(prompt)), SamplingParams(max_tokens=2, temperature=0))
    for state in (State.PREFILL, State.ADMITTING, State.DECODE, State.DONE):
        req.move(state)
    req.cached_tokens = cached
    req.output_token_ids, req.finish_reason = [5, 6], "length"
    req.timeline.prefill_start, req.timeline.prefill_end, req.timeline.first_token = 1.0, 2.0, 2.0
    req.timeline.finish = 3.0
    return req


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def test_cached_tokens_reach_usage_extension_summary_and_prometheus():
    records = [success_record(_done("a", 100, 64), _Tok(), "m"), success_record(_done("b", 60, 0), _Tok(), "m")]
    assert records[0]["response"]["body"]["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}
    assert records[0]["pdserve"]["cached_tokens"] == 64
    assert records[1]["response"]["body"]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    metrics = [from_record(r) for r in records]
    prefill = summarize(metrics, SLO(10, 1))["stages"]["prefill"]
    assert prefill["cached_tokens"] == 64 and prefill["cache_hit_rate"] == 64 / 160
    collector = MetricsCollector(SLO(10, 1))
    for r in records:
        collector.record(r)
    assert "pdserve_prefix_cached_tokens_total 64.0" in collector.prometheus().decode()
    summary = BatchSummary("out.jsonl", prompt_tokens=160, cached_tokens=64)
    assert summary.as_dict()["prefix_cache_hit_rate"] == 0.4
    assert "hit rate 40.0%" in summary.render()
