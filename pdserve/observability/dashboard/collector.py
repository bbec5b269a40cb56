"""The live side of the dashboards: finished requests and the router's state, as the batch runs.

The router thread feeds it (`record`, `refresh`); the HTTP server's threads
read it (`state`, `prometheus`). One lock guards both sides.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdserve.observability.dashboard.state import LIMIT_WINDOW_S, dashboard_state
from pdserve.observability.limiting import STAGES, limiting_stage
from pdserve.observability.metrics import SLO, RequestMetrics, from_record, offered_served, summarize
from router.request import State

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_GBPS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Every metric name /metrics exposes; deploy/grafana-dashboard.json is built on these.
METRIC_NAMES = (
    "pdserve_requests_total", "pdserve_prompt_tokens_total", "pdserve_output_tokens_total",
    "pdserve_queue_wait_seconds", "pdserve_prefill_seconds", "pdserve_ttft_seconds",
    "pdserve_kv_transfer_seconds", "pdserve_kv_transfer_exposed_seconds", "pdserve_kv_transfer_bytes_total",
    "pdserve_kv_transfer_gbps",
    "pdserve_decode_admit_wait_seconds", "pdserve_tpot_seconds", "pdserve_itl_p99_seconds", "pdserve_e2e_seconds",
    "pdserve_slo_met_total", "pdserve_slo_attainment", "pdserve_goodput_requests_per_second",
    "pdserve_stage_requests_per_second", "pdserve_stage_tokens_per_second", "pdserve_requests_in_state",
    "pdserve_queue_depth", "pdserve_kv_blocks_used", "pdserve_kv_blocks_total", "pdserve_decode_batch_size",
    "pdserve_prefill_batch_size", "pdserve_slo_ttft_seconds", "pdserve_slo_tpot_seconds",
    "pdserve_prefix_cached_tokens_total", "pdserve_kv_transfer_saved_bytes_total",
    "pdserve_limiting_stage", "pdserve_offered_requests_per_second", "pdserve_served_requests_per_second",
    "pdserve_spec_draft_tokens_total", "pdserve_spec_accepted_tokens_total", "pdserve_spec_steps_total",
    "pdserve_spec_gamma_asked_total", "pdserve_spec_target_forwards_total", "pdserve_spec_decode_tokens_total",
    "pdserve_spec_acceptance_rate", "pdserve_spec_tokens_per_forward", "pdserve_spec_gamma_mean",
)


class _Prometheus:
    def __init__(self, slo: SLO) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdserve_requests", "Finished requests", ["outcome"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("pdserve_prefix_cached_tokens",
                                     "Prompt tokens served from a prefill worker's prefix cache (not computed)",
                                     registry=r)
        self.saved_bytes = Counter("pdserve_kv_transfer_saved_bytes",
                                   "KV bytes not transferred: the decode worker already held those prefix blocks",
                                   registry=r)
        self.output_tokens = Counter("pdserve_output_tokens", "Output tokens of finished requests", registry=r)
        h = lambda name, doc, buckets=_LATENCY_BUCKETS: Histogram(name, doc, buckets=buckets, registry=r)  # noqa: E731
        self.queue_wait = h("pdserve_queue_wait_seconds", "Queued until prefill starts")
        self.prefill = h("pdserve_prefill_seconds", "Prefill compute of the request's batch")
        self.ttft = h("pdserve_ttft_seconds", "Time to first token (queued until prefill's first token)")
        self.transfer = h("pdserve_kv_transfer_seconds", "KV transfer span, begin to acknowledged (overlaps prefill)")
        self.transfer_exposed = h("pdserve_kv_transfer_exposed_seconds", "KV transfer left after prefill ended")
        self.transfer_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.transfer_gbps = h("pdserve_kv_transfer_gbps", "KV transfer rate per request (GB/s)", _GBPS_BUCKETS)
        self.admit_wait = h("pdserve_decode_admit_wait_seconds", "KV complete until the decode batch admits it")
        self.tpot = h("pdserve_tpot_seconds", "Mean time per output token after the first")
        self.itl_p99 = h("pdserve_itl_p99_seconds", "Per-request 99th percentile inter-token gap")
        self.e2e = h("pdserve_e2e_seconds", "Queued until finished")
        self.slo_met = Counter("pdserve_slo_met", "Requests within SLO", ["stage"], registry=r)
        self.attainment = Gauge("pdserve_slo_attainment", "Share of finished requests within SLO", ["stage"],
                                registry=r)
        self.goodput = Gauge("pdserve_goodput_requests_per_second",
                             "Completed requests/s meeting both TTFT and TPOT SLOs (batch so far)", registry=r)
        self.stage_rps = Gauge("pdserve_stage_requests_per_second", "Requests/s through a stage", ["stage"],
                               registry=r)
        self.stage_tps = Gauge("pdserve_stage_tokens_per_second", "Tokens/s through a stage", ["stage"], registry=r)
        self.in_state = Gauge("pdserve_requests_in_state", "Requests in each state now", ["state"], registry=r)
        self.queue_depth = Gauge("pdserve_queue_depth", "Queued requests per prompt-length bucket", ["bucket"],
                                 registry=r)
        self.kv_used = Gauge("pdserve_kv_blocks_used", "KV blocks held on a decode worker", ["worker"], registry=r)
        self.kv_total = Gauge("pdserve_kv_blocks_total", "KV blocks in a decode worker's pool", ["worker"],
                              registry=r)
        self.decode_batch = Gauge("pdserve_decode_batch_size", "Sequences in a decode worker's batch now",
                                  ["worker"], registry=r)
        self.prefill_batch = h("pdserve_prefill_batch_size", "Requests per prefill batch", _BATCH_BUCKETS)
        self.limiting = Gauge("pdserve_limiting_stage", "1 for the stage that limits goodput over the last "
                              "window (pdserve/observability/limiting.py), 0 for the others", ["stage"], registry=r)
        self.offered = Gauge("pdserve_offered_requests_per_second",
                             "Requests arriving per second over the last window (finished or not)", registry=r)
        self.served = Gauge("pdserve_served_requests_per_second",
                            "Requests completing successfully per second over the last window", registry=r)
        c = lambda name, doc: Counter(name, doc, registry=r)  # noqa: E731
        self.spec_drafted = c("pdserve_spec_draft_tokens", "Speculative decoding: tokens drafted")
        self.spec_accepted = c("pdserve_spec_accepted_tokens", "Speculative decoding: drafted tokens accepted")
        self.spec_steps = c("pdserve_spec_steps", "Speculative (verify) steps, summed over requests")
        self.spec_gamma = c("pdserve_spec_gamma_asked", "Σ γ asked of the drafter over speculative steps")
        self.spec_forwards = c("pdserve_spec_target_forwards",
                               "Target forwards (speculative + plain) that gave speculating requests tokens")
        self.spec_tokens = c("pdserve_spec_decode_tokens", "Decode tokens (after the first) of speculating requests")
        self.spec_acceptance = Gauge("pdserve_spec_acceptance_rate", "Accepted / drafted tokens (batch so far)",
                                     registry=r)
        self.spec_tpf = Gauge("pdserve_spec_tokens_per_forward", "Decode tokens per target forward (batch so far)",
                              registry=r)
        self.spec_gamma_mean = Gauge("pdserve_spec_gamma_mean", "Mean γ asked per speculative step (batch so far)",
                                     registry=r)
        Gauge("pdserve_slo_ttft_seconds", "TTFT SLO", registry=r).set(slo.ttft_s)
        Gauge("pdserve_slo_tpot_seconds", "TPOT SLO", registry=r).set(slo.tpot_s)

    def observe(self, m: RequestMetrics, slo: SLO) -> None:
        self.requests.labels("succeeded" if m.ok else "failed").inc()
        if not m.ok:
            return
        self.prompt_tokens.inc(m.prompt_tokens)
        self.cached_tokens.inc(m.cached_tokens)
        self.output_tokens.inc(m.output_tokens)
        for hist, value in ((self.queue_wait, m.queue_wait_s), (self.prefill, m.prefill_s), (self.ttft, m.ttft_s),
                            (self.transfer, m.transfer_s), (self.transfer_exposed, m.transfer_exposed_s),
                            (self.transfer_gbps, m.transfer_gbps),
                            (self.admit_wait, m.decode_admit_wait_s), (self.tpot, m.tpot_s),
                            (self.itl_p99, m.itl_p99_s), (self.e2e, m.e2e_s)):
            if value is not None:
                hist.observe(value)
        self.transfer_bytes.inc(m.kv_bytes)
        self.saved_bytes.inc(m.kv_bytes_saved)
        if m.spec_drafted is not None:
            self.spec_drafted.inc(m.spec_drafted)
            self.spec_accepted.inc(m.spec_accepted or 0)
            if m.spec_steps is not None and m.spec_forwards is not None:
                self.spec_steps.inc(m.spec_steps)
                self.spec_gamma.inc((m.spec_gamma_mean or 0.0) * m.spec_steps)
                self.spec_forwards.inc(m.spec_forwards)
                self.spec_tokens.inc(max(m.output_tokens - 1, 0))
        ttft_ok, tpot_ok = m.meets(slo)
        for stage, met in (("prefill", ttft_ok), ("decode", tpot_ok), ("both", ttft_ok and tpot_ok)):
            if met:
                self.slo_met.labels(stage).inc()

    def set_summary(self, s: dict[str, Any]) -> None:
        self.goodput.set(s["goodput_rps"])
        stages = s["stages"]
        for stage, key in (("prefill", "prefill"), ("decode", "decode")):
            if stages[key]["slo_attainment"] is not None:
                self.attainment.labels(stage).set(stages[key]["slo_attainment"])
            self.stage_rps.labels(stage).set(stages[key]["requests_per_s"])
            self.stage_tps.labels(stage).set(stages[key]["tokens_per_s"])
        if s["slo_attainment"] is not None:
            self.attainment.labels("both").set(s["slo_attainment"])
        spec = s.get("speculative") or {}
        for gauge, key in ((self.spec_acceptance, "acceptance_rate"), (self.spec_tpf, "tokens_per_forward"),
                           (self.spec_gamma_mean, "gamma_mean")):
            if spec.get(key) is not None:
                gauge.set(spec[key])


class MetricsCollector:
    def __init__(self, slo: SLO, title: str = "pdserve batch", total_lines: int | None = None) -> None:
        self.slo, self.title, self.total_lines = slo, title, total_lines
        self._lock = threading.Lock()
        self._requests: list[RequestMetrics] = []
        self._live: dict[str, Any] = {}
        self._live_at = 0.0
        self._in_flight: dict[str | None, float] = {}  # custom id -> queued time, of the router's unfinished requests
        self._recorded: set[str | None] = set()  # custom ids already recorded: never in flight again
        self._summary_stale = False
        self.finished = False
        self.prom = _Prometheus(slo)

    def record(self, record: dict[str, Any]) -> None:
        """One output line, as written to the output file."""
        m = from_record(record)
        with self._lock:
            self._requests.append(m)
            self._recorded.add(m.custom_id)
            self._in_flight.pop(m.custom_id, None)  # seen in flight at the last refresh: count its arrival once
            self.prom.observe(m, self.slo)
            self._summary_stale = True

    def prefill_batch(self, size: int) -> None:
        with self._lock:
            self.prom.prefill_batch.observe(size)

    def refresh(self, router: Any, every_s: float = 1.0) -> None:
        """Live state from the router and its decode workers, at most every `every_s`."""
        now = time.time()
        if now - self._live_at < every_s:
            return
        self._live_at = now
        import ray

        snap = router.snapshot()
        in_flight = {r.custom_id: r.timeline.queued for r in list(router.active.values())}
        workers = {}
        try:
            stats = ray.get([h.stats.remote() for h in router.workers.decode.values()], timeout=5)
            workers = {s.worker_id: {"worker_id": s.worker_id, "num_blocks": s.pool.num_blocks,
                                     "free_blocks": s.pool.free_blocks, "running": s.running} for s in stats}
        except Exception:  # a worker restarting: keep the last figures
            workers = self._live.get("decode_workers", {})
        with self._lock:
            self._live = {"at": now, "states": snap["states"], "queue_depth": snap["queue_depth"],
                          "decode_workers": workers}
            # a request recorded while we waited for the workers' stats is finished, not in flight
            self._in_flight = {cid: q for cid, q in in_flight.items() if cid not in self._recorded}
            self._summary_stale = True
            for state in (State.QUEUED, State.PREFILL, State.ADMITTING, State.DECODE):
                self.prom.in_state.labels(state.value).set(snap["states"].get(state.value, 0))
            for bucket, depth in snap["queue_depth"].items():
                self.prom.queue_depth.labels(bucket).set(depth)
            for wid, s in workers.items():
                self.prom.kv_used.labels(wid).set(s["num_blocks"] - s["free_blocks"])
                self.prom.kv_total.labels(wid).set(s["num_blocks"])
                self.prom.decode_batch.labels(wid).set(s["running"])

    def state(self) -> dict[str, Any]:
        with self._lock:
            requests, live = list(self._requests), dict(self._live, finished=self.finished)
            in_flight = list(self._in_flight.values())
        return dashboard_state(requests, self.slo, total_lines=self.total_lines, live=live, title=self.title,
                               in_flight_queued=in_flight)

    def prometheus(self) -> bytes:
        with self._lock:
            self._refresh_summary()
            return generate_latest(self.prom.registry)

    def _refresh_summary(self) -> None:
        """Batch-level gauges (goodput, attainment, stage rates): O(requests), so only when read."""
        if self._summary_stale and (self._requests or self._in_flight):
            rates = offered_served(self._requests, list(self._in_flight.values()), LIMIT_WINDOW_S)
            if rates["offered_rps"] is not None:
                self.prom.offered.set(rates["offered_rps"])
                self.prom.served.set(rates["served_rps"])
        if self._summary_stale and self._requests:
            self.prom.set_summary(summarize(self._requests, self.slo))
            limit = limiting_stage(self._requests, self.slo, window_s=LIMIT_WINDOW_S)
            for stage in STAGES:
                self.prom.limiting.labels(stage).set(1 if limit and limit.stage == stage else 0)
            self._summary_stale = False
