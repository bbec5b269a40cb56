"""A run's breakdown of a pdserve server's time, from its /metrics before and after (the gauges of
pdserve/observability/token_time.py): per decode step, its phases and the loop's time between steps; per
output token streamed, the router thread's pieces and the front end's CPU. Another server (vLLM) has none
of these metrics: its breakdown is empty."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Breakdown:
    """Sums over workers of each cumulative figure, keyed `name[/label value...]`."""

    values: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Breakdown:
        values: dict[str, float] = defaultdict(float)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels = sample.name, dict(sample.labels)
                if name == "pdserve_worker_phase_seconds":
                    values[f"phase/{labels['phase']}/{labels['clock']}"] += sample.value
                elif name in ("pdserve_worker_steps", "pdserve_worker_step_seconds", "pdserve_worker_core_wait_seconds",
                              "pdserve_worker_poll_cpu_seconds", "pdserve_streamed_tokens_total",
                              "pdserve_worker_step_rows", "pdserve_worker_prefill_tokens"):
                    values[name.removeprefix("pdserve_")] += sample.value
                elif name == "pdserve_router_seconds":
                    values[f"router/{labels['piece']}/{labels['clock']}"] += sample.value
                elif name == "pdserve_thread_cpu_seconds":
                    values[f"thread/{labels['thread']}"] += sample.value
        return cls(dict(values))

    def minus(self, before: Breakdown) -> dict[str, Any]:
        """The run's figures: {"steps", "tokens", "step_ms": {piece: ms per step}, "token_ms": {piece: ms per
        output token}}; {} when there is nothing to divide by (another server, or nothing ran)."""
        d = {k: v - before.values.get(k, 0.0) for k, v in self.values.items()}
        steps, tokens = d.get("worker_steps", 0.0), d.get("streamed_tokens_total", 0.0)
        if steps <= 0 or tokens <= 0:
            return {}
        step_ms = {k.split("/")[1]: 1e3 * v / steps for k, v in d.items()
                   if k.startswith("phase/") and k.endswith("/wall")}
        step_ms["step total"] = 1e3 * d.get("worker_step_seconds", 0.0) / steps
        step_ms["of it, waiting for a core"] = 1e3 * d.get("worker_core_wait_seconds", 0.0) / steps
        token_ms = {f"router {k.split('/')[1]}": 1e3 * v / tokens for k, v in d.items()
                    if k.startswith("router/") and k.endswith("/wall")}
        token_ms |= {f"{k.split('/')[1]} thread CPU": 1e3 * v / tokens for k, v in d.items() if k.startswith("thread/")}
        token_ms["worker poll CPU"] = 1e3 * d.get("worker_poll_cpu_seconds", 0.0) / tokens
        return {"steps": steps, "tokens": tokens, "step_ms": step_ms, "token_ms": token_ms,
                "rows_per_step": d.get("worker_step_rows", 0.0) / steps,
                "prefill_tokens_per_step": d.get("worker_prefill_tokens", 0.0) / steps}

    @staticmethod
    def describe(run: dict[str, Any]) -> str:
        if not run:
            return "n/a"
        step = ", ".join(f"{k} {v:.1f}" for k, v in run["step_ms"].items())
        token = ", ".join(f"{k} {v:.2f}" for k, v in run["token_ms"].items())
        return (f"{run['tokens']:.0f} tokens in {run['steps']:.0f} steps of {run['rows_per_step']:.1f} rows "
                f"({run['prefill_tokens_per_step']:.1f} prompt tokens); per step (ms): {step}; "
                f"per output token (ms): {token}")


def scrape_breakdown(base_url: str, timeout_s: float = 10.0) -> Breakdown:
    """The server's figures now; empty for a server without pdserve's /metrics."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout_s) as r:
            return Breakdown.parse(r.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return Breakdown()
