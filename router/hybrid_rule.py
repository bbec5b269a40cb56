"""Which way to prefill one request in `--mode hybrid`: a small pure rule the planner fits.

A short prompt, or one whose prefix the decode-side worker already caches, costs a few chunks inside
decode steps that run anyway: no prefill queue, no transfer, and a little extra time on the steps of
the requests decoding beside it. A long uncached prompt costs those steps a lot (every decoding
request's TPOT pays for its chunks), so it goes to a prefill worker and its KV travels. How long is
"long" depends on the decode side's load: a busy batch has less TPOT headroom to spend on chunks, so
the threshold falls as the load rises, and a saturated decode side takes no chunks at all. Finally, a
prefill queue long enough to make the request miss a TTFT SLO its own prefill would meet sends it to
the chunked path while the decode side still has room.

    level      = how many of `load_edges` the decode load reaches     (0 .. len(load_edges))
    threshold  = chunk_max_tokens[level]                              (uncached prompt tokens)
    CHUNKED if uncached <= threshold
            or (the prefill queue ahead would make PD miss the TTFT SLO that the prompt alone
                would meet, and level < saturated)
    PD      otherwise

`pdserve plan` fits `chunk_max_tokens` from the measured step and prefill costs (pdserve/plan/hybrid.py)
and prints the rule; `--hybrid-threshold` overrides it by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proto.kinds import PrefillPath


@dataclass(frozen=True)
class HybridSignals:
    """What the router knows when it places one request."""

    prompt_tokens: int
    cached_tokens: int  # leading prompt tokens the best decode-side worker already holds
    prefill_queue_tokens: int  # uncached prompt tokens waiting for or in prefill on the PD path
    decode_load: float  # the least loaded decode-side worker: requests held / max_num_seqs (0..1+)
    ttft_slo_s: float

    @property
    def uncached_tokens(self) -> int:
        return max(1, self.prompt_tokens - self.cached_tokens)  # at least one token is always computed


@dataclass(frozen=True)
class HybridRule:
    load_edges: tuple[float, ...] = (0.5, 0.9)  # decode load levels: < 0.5, 0.5-0.9, >= 0.9 (saturated)
    chunk_max_tokens: tuple[int, ...] = (512, 256, 0)  # per level: uncached prompts up to this are chunked
    prefill_tokens_per_s: float = 0.0  # the PD path's prefill rate (planner); 0: the queue test is off
    ttft_slo_s: float = 2.0  # for requests without their own (the serving SLO, --slo-ttft)

    def __post_init__(self) -> None:
        if len(self.chunk_max_tokens) != len(self.load_edges) + 1:
            raise ValueError(f"hybrid rule: {len(self.load_edges)} load edges need "
                             f"{len(self.load_edges) + 1} thresholds, got {len(self.chunk_max_tokens)}")
        if list(self.load_edges) != sorted(self.load_edges):
            raise ValueError(f"hybrid rule: load edges must rise, got {self.load_edges}")
        if any(t < 0 for t in self.chunk_max_tokens):
            raise ValueError(f"hybrid rule: thresholds must be >= 0, got {self.chunk_max_tokens}")

    @classmethod
    def fixed(cls, threshold: int) -> HybridRule:
        """One threshold at every load below saturation (`--hybrid-threshold N`)."""
        return cls(chunk_max_tokens=(threshold, threshold, 0))

    def with_slo(self, ttft_slo_s: float) -> HybridRule:
        return replace(self, ttft_slo_s=ttft_slo_s)

    def level(self, decode_load: float) -> int:
        return sum(decode_load >= edge for edge in self.load_edges)

    def choose(self, s: HybridSignals) -> PrefillPath:
        level = self.level(s.decode_load)
        if s.uncached_tokens <= self.chunk_max_tokens[level]:
            return PrefillPath.CHUNKED
        saturated = level == len(self.load_edges)
        if not saturated and self.prefill_tokens_per_s > 0:
            own_s = s.uncached_tokens / self.prefill_tokens_per_s
            if own_s <= s.ttft_slo_s < own_s + s.prefill_queue_tokens / self.prefill_tokens_per_s:
                return PrefillPath.CHUNKED  # the queue ahead, not the prompt itself, would miss the SLO
        return PrefillPath.PD

    def describe(self) -> str:
        """One line per load level, as `pdserve plan` prints it."""
        lows = (0.0, *self.load_edges)
        highs = (*self.load_edges, None)
        lines = []
        for low, high, threshold in zip(lows, highs, self.chunk_max_tokens):
            span = f"decode load {low:.0%}-{high:.0%}" if high is not None else f"decode load >= {low:.0%}"
            rule = f"chunk prompts up to {threshold} uncached tokens" if threshold else "prefill every prompt on PD"
            lines.append(f"{span}: {rule}")
        if self.prefill_tokens_per_s > 0:
            lines.append(f"below saturation, a prompt the PD prefill queue (at {self.prefill_tokens_per_s:.0f} "
                         "tok/s) would make miss its TTFT SLO is chunked")
        return "\n".join(lines)
