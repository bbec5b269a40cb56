"""Per-stage metrics and goodput, computed from per-request timelines.

One definition serves the live dashboard, the Prometheus endpoint and the
batch report, so the three always agree. Inputs are output records (or
their `pdserve` extension): stage timestamps in Unix seconds and each output
token's time in ms after the first.

    queue wait        prefill_start - queued
    prefill time      prefill_end - prefill_start
    TTFT              first_token - queued
    transfer time     transfer_end - transfer_start  (overlaps prefill: KV streams out per layer)
    transfer exposed  transfer_end - prefill_end  (what the transfer adds after prefill)
    transfer GB/s     kv_bytes / time the transport spent moving them
    decode admit wait decode_admit - transfer_end
    TPOT              (finish - first_token) / (output tokens - 1); p99 of inter-token gaps too
    end-to-end        finish - queued
Goodput (DistServe): completed requests per second that meet both the TTFT
and the TPOT SLO. Attainment: prefill stage = share within the TTFT SLO;
decode stage = share within the TPOT SLO. Offered rate: requests arriving
(queued) per second; served rate: requests completing per second.
Speculative decoding (`pdserve.speculative` of each line): acceptance rate,
tokens per target forward and the γ asked (see `speculative_summary`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SLO:
    """Defaults suit SmolLM2-135M on a 2-core CPU; set your own with --slo-ttft / --slo-tpot."""

    ttft_s: float = 10.0
    tpot_s: float = 0.25


@dataclass(frozen=True)
class RequestMetrics:
    custom_id: str | None
    ok: bool
    queued: float
    finish: float
    prompt_tokens: int
    output_tokens: int
    queue_wait_s: float | None = None
    prefill_s: float | None = None
    ttft_s: float | None = None
    transfer_s: float | None = None
    transfer_exposed_s: float | None = None
    transfer_gbps: float | None = None
    kv_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    kv_bytes_saved: int = 0  # KV not transferred: the decode worker held those prefix blocks
    decode_admit_wait_s: float | None = None
    tpot_s: float | None = None
    itl_p99_s: float | None = None  # 99th percentile inter-token gap
    e2e_s: float | None = None
    prefill_start: float | None = None
    prefill_end: float | None = None
    transfer_start: float | None = None
    transfer_end: float | None = None
    decode_admit: float | None = None
    slo_ttft_s: float | None = None  # per-request SLOs override the batch's
    slo_tpot_s: float | None = None
    first_token: float | None = None
    kv_blocks: int = 0
    prefill_worker: str | None = None
    decode_worker: str | None = None
    spec_drafted: int | None = None  # speculative decoding (None: it was off for this request)
    spec_accepted: int | None = None
    spec_steps: int | None = None  # speculative steps; None on lines written before it was recorded
    spec_forwards: int | None = None  # target forwards that gave it tokens (speculative + plain)
    spec_gamma_mean: float | None = None  # mean γ asked per speculative step
    constrained: str | None = None  # structured output's kind (json_schema, regex, tool_calls, ...); None: free text
    constraint_valid: bool | None = None  # the answer validates (None: not checkable, e.g. an EBNF grammar)

    def meets(self, slo: SLO) -> tuple[bool, bool]:
        """(TTFT within SLO, TPOT within SLO); a single-token answer has no TPOT and meets it."""
        ttft = self.ttft_s is not None and self.ttft_s <= (self.slo_ttft_s or slo.ttft_s)
        tpot = self.tpot_s is None or self.tpot_s <= (self.slo_tpot_s or slo.tpot_s)
        return ttft and self.ok, tpot and self.ok


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def from_record(record: dict[str, Any]) -> RequestMetrics:
    """Metrics of one output line of run-batch."""
    ext = record.get("pdserve") or {}
    t = ext.get("timeline") or {}
    ok = record.get("error") is None
    usage = ((record.get("response") or {}).get("body") or {}).get("usage") or {}
    out_tokens = usage.get("completion_tokens", len(ext.get("output_token_ids") or []))
    times = ext.get("token_times_ms") or []
    gaps = [(b - a) / 1000 for a, b in zip(times, times[1:])]
    transfer = _diff(t.get("transfer_end"), t.get("transfer_start"))
    kv_bytes = ext.get("kv_bytes") or 0
    busy = ext.get("kv_transfer_busy_s") or transfer
    slo = ext.get("slo") or {}
    spec = ext.get("speculative") or {}
    structured = ext.get("structured") or {}
    return RequestMetrics(
        custom_id=record.get("custom_id"), ok=ok, queued=t.get("queued") or 0.0,
        finish=t.get("finish") or t.get("queued") or 0.0,
        prompt_tokens=usage.get("prompt_tokens", 0), output_tokens=out_tokens if ok else 0,
        queue_wait_s=_diff(t.get("prefill_start"), t.get("queued")),
        prefill_s=_diff(t.get("prefill_end"), t.get("prefill_start")),
        ttft_s=_diff(t.get("first_token"), t.get("queued")),
        transfer_s=transfer, transfer_exposed_s=_diff(t.get("transfer_end"), t.get("prefill_end")),
        transfer_gbps=kv_bytes / busy / 1e9 if busy and kv_bytes else None, kv_bytes=kv_bytes,
        cached_tokens=ext.get("cached_tokens") or 0, kv_bytes_saved=ext.get("kv_bytes_saved") or 0,
        decode_admit_wait_s=_diff(t.get("decode_admit"), t.get("transfer_end")),
        tpot_s=(_diff(t.get("finish"), t.get("first_token")) / (out_tokens - 1)
                if ok and out_tokens > 1 and t.get("finish") and t.get("first_token") else None),
        itl_p99_s=percentile(gaps, 99),
        e2e_s=_diff(t.get("finish"), t.get("queued")),
        prefill_start=t.get("prefill_start"), prefill_end=t.get("prefill_end"),
        transfer_start=t.get("transfer_start"), transfer_end=t.get("transfer_end"),
        decode_admit=t.get("decode_admit"), slo_ttft_s=slo.get("ttft_s"), slo_tpot_s=slo.get("tpot_s"),
        first_token=t.get("first_token"), kv_blocks=ext.get("kv_blocks") or 0,
        prefill_worker=ext.get("prefill_worker"), decode_worker=ext.get("decode_worker"),
        spec_drafted=spec.get("drafted"), spec_accepted=spec.get("accepted"), spec_steps=spec.get("steps"),
        spec_forwards=spec.get("forwards"), spec_gamma_mean=spec.get("gamma_mean"),
        constrained=structured.get("kind"), constraint_valid=structured.get("valid"))


def _stats(values: Iterable[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if v is not None]
    return {"mean": sum(xs) / len(xs) if xs else None, "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "max": max(xs) if xs else None, "count": len(xs)}


def summarize(requests: Sequence[RequestMetrics], slo: SLO, window: tuple[float, float] | None = None) -> dict:
    """Batch-level figures. `window` (start, end) defaults to first queued .. last finish."""
    if window is None:
        window = (min((r.queued for r in requests), default=0.0), max((r.finish for r in requests), default=0.0))
    span = max(window[1] - window[0], 1e-9)
    ok = [r for r in requests if r.ok]
    meets = [r.meets(slo) for r in ok]
    both = sum(1 for a, b in meets if a and b)
    prefilled = [r for r in requests if r.prefill_end is not None]
    return {
        "requests": len(requests), "succeeded": len(ok), "failed": len(requests) - len(ok),
        "window_s": span, "slo": asdict(slo),
        "goodput_rps": both / span,
        "throughput_rps": len(ok) / span,
        "slo_attainment": both / len(ok) if ok else None,
        "stages": {
            "queue": {"wait_s": _stats(r.queue_wait_s for r in requests)},
            "prefill": {
                "requests_per_s": len(prefilled) / span,
                "tokens_per_s": sum(r.prompt_tokens for r in prefilled) / span,
                "cached_tokens": sum(r.cached_tokens for r in ok),
                "computed_tokens": sum(r.prompt_tokens - r.cached_tokens for r in ok),
                "cache_hit_rate": (sum(r.cached_tokens for r in ok) / sum(r.prompt_tokens for r in ok)
                                   if sum(r.prompt_tokens for r in ok) else None),
                "time_s": _stats(r.prefill_s for r in requests),
                "ttft_s": _stats(r.ttft_s for r in ok),
                "slo_attainment": sum(a for a, _ in meets) / len(ok) if ok else None,
            },
            "transfer": {
                "time_s": _stats(r.transfer_s for r in requests),
                "exposed_s": _stats(r.transfer_exposed_s for r in requests),
                "gbps": _stats(r.transfer_gbps for r in requests),
                "bytes": sum(r.kv_bytes for r in ok),
                "bytes_saved": sum(r.kv_bytes_saved for r in ok),
            },
            "decode": {
                "requests_per_s": len(ok) / span,
                "tokens_per_s": sum(r.output_tokens for r in ok) / span,
                "admit_wait_s": _stats(r.decode_admit_wait_s for r in ok),
                "tpot_s": _stats(r.tpot_s for r in ok),
                "itl_p99_s": _stats(r.itl_p99_s for r in ok),
                "slo_attainment": sum(b for _, b in meets) / len(ok) if ok else None,
            },
            "end_to_end": {"latency_s": _stats(r.e2e_s for r in ok)},
        },
        "speculative": speculative_summary(ok),
        "structured": structured_summary(ok),
    }


def structured_summary(requests: Sequence[RequestMetrics]) -> dict[str, Any] | None:
    """Constrained answers (structured outputs, tool calls a tool_choice required): how many, how many
    were checked, and how many of those failed validation (the goal is 0). None when there were none."""
    constrained = [r for r in requests if r.constrained is not None]
    if not constrained:
        return None
    checked = [r for r in constrained if r.constraint_valid is not None]
    return {"requests": len(constrained), "checked": len(checked),
            "validation_failures": sum(not r.constraint_valid for r in checked)}


def speculative_summary(requests: Sequence[RequestMetrics]) -> dict[str, Any] | None:
    """Speculative decoding over the requests that carry its figures; None when none did.

        acceptance_rate     Σ accepted / Σ drafted  (vLLM's draft acceptance rate)
        mean_accepted       Σ accepted / Σ steps    (drafts kept per verify step)
        tokens_per_forward  Σ decode tokens / Σ target forwards, speculative and plain; decode tokens
                            are output tokens less the prefill's first. 1.0 is plain decoding.
        gamma_mean          Σ γ asked / Σ steps     (γ asked of the drafter per speculative step)
    Lines written before steps/forwards/γ were recorded count only in the first figure.
    """
    spec = [r for r in requests if r.spec_drafted is not None]
    if not spec:
        return None
    drafted = sum(r.spec_drafted or 0 for r in spec)
    accepted = sum(r.spec_accepted or 0 for r in spec)
    counted = [r for r in spec if r.spec_steps is not None and r.spec_forwards is not None]
    steps = sum(r.spec_steps or 0 for r in counted)
    forwards = sum(r.spec_forwards or 0 for r in counted)
    tokens = sum(max(r.output_tokens - 1, 0) for r in counted)
    gamma = sum((r.spec_gamma_mean or 0.0) * (r.spec_steps or 0) for r in counted)
    return {"requests": len(spec), "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "steps": steps, "forwards": forwards, "decode_tokens": tokens,
            "mean_accepted": accepted / steps if steps else None,
            "tokens_per_forward": tokens / forwards if forwards else None,
            "gamma_mean": gamma / steps if steps else None}


def by_finish(requests: Sequence[RequestMetrics], bucket_s: float, start: float) -> list[list[RequestMetrics]]:
    """The requests in buckets of finish time, `bucket_s` wide from `start` (the last bucket holds the
    latest finish); [] when there are none. The charts over time group by it."""
    if not requests:
        return []
    n = max(1, math.ceil((max(r.finish for r in requests) - start) / bucket_s))
    buckets: list[list[RequestMetrics]] = [[] for _ in range(n)]
    for r in requests:
        buckets[min(n - 1, max(0, int((r.finish - start) / bucket_s)))].append(r)
    return buckets


def goodput_series(requests: Sequence[RequestMetrics], slo: SLO, bucket_s: float = 1.0,
                   start: float | None = None, in_flight_queued: Sequence[float] = ()) -> list[dict[str, float]]:
    """Per time bucket: offered rate (requests queued in it: finished, failed and `in_flight_queued`,
    the queued times of requests not finished yet), served rate (`throughput_rps`: requests that
    succeeded, by finish time) and goodput (those of them within both SLOs), all in requests/s; `t`
    is the bucket's start, seconds after `start`."""
    arrivals = [r.queued for r in requests] + list(in_flight_queued)
    if not arrivals:
        return []
    t0 = min(arrivals) if start is None else start
    end = max([r.finish for r in requests] + arrivals)
    n = max(1, math.ceil((end - t0) / bucket_s))
    at = lambda t: min(n - 1, max(0, int((t - t0) / bucket_s)))  # noqa: E731
    good, done, offered = [0] * n, [0] * n, [0] * n
    for t in arrivals:
        offered[at(t)] += 1
    for r in requests:
        if not r.ok:
            continue
        i = at(r.finish)
        done[i] += 1
        a, b = r.meets(slo)
        good[i] += a and b
    return [{"t": round(i * bucket_s, 3), "offered_rps": offered[i] / bucket_s, "goodput_rps": good[i] / bucket_s,
             "throughput_rps": done[i] / bucket_s} for i in range(n)]


def offered_served(requests: Sequence[RequestMetrics], in_flight_queued: Sequence[float] = (),
                   window_s: float = 60.0) -> dict[str, float | None]:
    """Offered and served rate (requests/s) over the last `window_s` before the latest event (an arrival
    or a finish), or since the first arrival when the run is shorter. Offered counts every arrival
    (`in_flight_queued`: queued times of requests not finished yet); served, requests that succeeded.
    Served below offered for long means a queue is growing."""
    arrivals = [r.queued for r in requests] + list(in_flight_queued)
    if not arrivals:
        return {"window_s": None, "offered_rps": None, "served_rps": None}
    end = max([r.finish for r in requests] + arrivals)
    span = min(window_s, end - min(arrivals))
    if span <= 0:
        return {"window_s": None, "offered_rps": None, "served_rps": None}
    since = end - span
    return {"window_s": span, "offered_rps": sum(t >= since for t in arrivals) / span,
            "served_rps": sum(r.ok and r.finish >= since for r in requests) / span}
