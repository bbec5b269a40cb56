"""One request of a serving benchmark as its client saw it (`pdserve bench serve`, any front end)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.observability.metrics import SLO


@dataclass
class Sample:
    """One request as the client saw it; times in seconds from the start of its rate's run."""

    custom_id: str
    prompt_tokens: int
    max_tokens: int
    scheduled: float  # when it was due to arrive
    sent: float = 0.0
    first: float | None = None  # first content
    end: float | None = None  # end of the stream
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def tpot(self) -> float | None:
        if self.error or self.first is None or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - self.first) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.sent

    def meets(self, slo: SLO) -> tuple[bool, bool]:
        """(TTFT ok, TPOT ok), both False for a failed request; no TPOT (one token) meets it."""
        if self.error is not None:
            return False, False
        ttft, tpot = self.ttft, self.tpot
        return ttft is not None and ttft <= slo.ttft_s, tpot is None or tpot <= slo.tpot_s
