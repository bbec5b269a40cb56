"""Admission control that protects goodput: refuse at once what would only be served too late.

A request's TTFT is, to first order, the prompt tokens queued ahead of it
(itself included) divided by the rate the prefill workers sustain. With
mode 'slo', a request whose prediction already exceeds its TTFT SLO (times
`headroom`) is refused with 429 and a Retry-After, instead of being accepted
to miss its SLO and make every request behind it miss theirs. The headroom
covers what the prediction leaves out: each request's trips through the
router, Ray and HTTP, and swings in load since the rate was measured. In every mode the number
of requests waiting for prefill is bounded (503 beyond it).

Called from the HTTP thread (`admit`) and the router thread (`prefilled`, `gone`): one lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from pdserve.observability.metrics import SLO
from pdserve.serve.errors import ApiError
from router.request import Request

MODES = ("always", "slo")


@dataclass(frozen=True)
class AdmissionConfig:
    mode: str = "always"
    max_queue: int = 1024  # requests waiting for prefill at once
    headroom: float = 0.8  # slo: admit while the predicted TTFT is within this share of the SLO

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--admission must be one of {MODES}, got {self.mode!r}")
        if self.max_queue < 1:
            raise ValueError("--max-queue must be at least 1")
        if not 0 < self.headroom <= 1:
            raise ValueError("--admission-headroom must be in (0, 1]")


class PrefillRate:
    """Prompt tokens per second that reach their first token, measured as a client sees it.

    Each request spans from its arrival to its first token, so the time it waited
    and every trip through the router, Ray and HTTP count, not only the prefill
    kernels (on a fast CPU those are the smaller part: a rate read from the
    workers' prefill timestamps alone over-promised and admitted everything).
    Spans overlap under a backlog, so the time is the union of the spans: during
    a burst it is the wall time the burst took, when idle each request's own TTFT."""

    def __init__(self, window: int = 64) -> None:
        self._spans: deque[tuple[float, float, int]] = deque(maxlen=window)

    def observe(self, start: float, end: float, tokens: int) -> None:
        if end > start:
            self._spans.append((start, end, tokens))

    def tokens_per_s(self) -> float | None:
        if not self._spans:
            return None
        busy, reach = 0.0, -math.inf
        for start, end, _ in sorted(self._spans):
            if end > reach:
                busy += end - max(start, reach)
                reach = end
        return sum(t for _, _, t in self._spans) / busy


class Admission:
    def __init__(self, config: AdmissionConfig, slo: SLO) -> None:
        self.config, self.slo = config, slo
        self.rate = PrefillRate()
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}  # custom id (unique per request) -> prompt tokens, until its first token
        self.refused = 0

    def admit(self, req: Request) -> None:
        """Count the request in, or raise ApiError (429/503 with Retry-After)."""
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                self.refused += 1
                raise ApiError(503, f"the server holds {len(self._waiting)} requests waiting for prefill, its "
                               "limit (--max-queue); try again shortly", "queue_full", "server_error",
                               {"Retry-After": "1"})
            if self.config.mode == "slo":
                predicted = self.predicted_ttft_s(req.prompt_len)
                limit = (req.slo or {}).get("ttft_s", self.slo.ttft_s)
                if predicted is not None and predicted > limit * self.config.headroom:
                    self.refused += 1
                    retry = max(1, math.ceil(predicted - limit * self.config.headroom))
                    raise ApiError(429, f"predicted time to first token {predicted:.2f}s exceeds this request's "
                                   f"TTFT SLO of {limit:g}s; retry in {retry}s", "slo_unattainable",
                                   "rate_limit_exceeded", {"Retry-After": str(retry)})
            self._waiting[req.custom_id] = req.prompt_len

    def predicted_ttft_s(self, prompt_tokens: int) -> float | None:
        """Work queued ahead (and this prompt) over the measured prefill rate; None before any prefill."""
        rate = self.rate.tokens_per_s()
        return None if rate is None else (sum(self._waiting.values()) + prompt_tokens) / rate

    def prefilled(self, req: Request) -> None:
        """The request's first token came back: it no longer waits, and its TTFT timed the rate."""
        with self._lock:
            self._waiting.pop(req.custom_id, None)
            self.rate.observe(req.timeline.queued, time.time(), req.prompt_len)

    def gone(self, req: Request) -> None:
        with self._lock:
            self._waiting.pop(req.custom_id, None)
