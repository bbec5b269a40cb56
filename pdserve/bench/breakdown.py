"""Where a throughput run's wall time went (`pdserve bench throughput --breakdown`, issue 22).

The measured makespan (run-batch's wall, workers already started) is split into

    prefill compute   the prefill workers' forwards (PD; KV is sent layer by layer inside them)
    decode steps      the step loops' steps (colocated: mixed steps, prefill chunks included)
    the rest          makespan - both: router, Ray calls, transfers' ends, admission, workers idle
                      while work waits (on one node with the core lease the two never overlap)

and set beside an ideal makespan made of the same run's measured parts: every prompt prefilled at the
measured prefill rate over the tokens it computed (a prefix-cache hit is a real saving), then the
workload's output lengths replayed through the measured step-time curve
t(b) = a + c*b (least squares over the steps of each batch size) at --max-num-seqs rows at most.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.stats import ColocatedStats, DecodeStats, PrefillStats


@dataclass(frozen=True)
class StepCurve:
    """A decode step's wall seconds at batch size b: fixed + per_row * b."""

    fixed: float
    per_row: float

    def __call__(self, rows: int) -> float:
        return self.fixed + self.per_row * rows

    @classmethod
    def fit(cls, steps_by_rows: dict[int, tuple[int, float]]) -> StepCurve | None:
        """Least squares over every step (each batch size weighted by its step count); None without steps."""
        n = sum(c for c, _ in steps_by_rows.values())
        if n == 0:
            return None
        mean_b = sum(b * c for b, (c, _) in steps_by_rows.items()) / n
        mean_t = sum(s for _, s in steps_by_rows.values()) / n
        var = sum(c * (b - mean_b) ** 2 for b, (c, _) in steps_by_rows.items())
        cov = sum((b - mean_b) * (s - c * mean_t) for b, (c, s) in steps_by_rows.items())
        per_row = max(0.0, cov / var) if var > 0 else 0.0
        if mean_t - per_row * mean_b < 0:  # noise made the line cross zero: through the origin instead
            total_rows = sum(b * c for b, (c, _) in steps_by_rows.items())
            return cls(0.0, sum(s for _, s in steps_by_rows.values()) / total_rows)
        return cls(mean_t - per_row * mean_b, per_row)


def replay_decode(output_lengths: list[int], max_num_seqs: int, curve: StepCurve) -> float:
    """Seconds to decode every request once all are prefilled: prefill gives each its first token, each
    step one more to every running one; a finished request's row goes to the next waiting one."""
    left = sorted((n - 1 for n in output_lengths if n > 1), reverse=True)
    running, waiting, total, done_steps = [], left, 0.0, 0
    while running or waiting:
        while waiting and len(running) < max_num_seqs:
            running.append(done_steps + waiting.pop())  # the step count at which it finishes
        total += curve(len(running))
        done_steps += 1
        running = [end for end in running if end > done_steps]
    return total


@dataclass(frozen=True)
class Breakdown:
    makespan_s: float
    prefill_s: float | None  # None: colocated (prefill runs inside the steps)
    decode_s: float
    lease_wait_s: float
    prefill_tok_s: float | None
    curve: StepCurve | None
    ideal_prefill_s: float | None
    ideal_decode_s: float | None

    @property
    def rest_s(self) -> float:
        return self.makespan_s - (self.prefill_s or 0.0) - self.decode_s

    @property
    def ideal_s(self) -> float | None:
        if self.ideal_prefill_s is None or self.ideal_decode_s is None:
            return None
        return self.ideal_prefill_s + self.ideal_decode_s

    def as_dict(self) -> dict:
        return {"makespan_s": self.makespan_s, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "rest_s": self.rest_s, "lease_wait_s": self.lease_wait_s, "prefill_tok_s": self.prefill_tok_s,
                "step_fixed_ms": self.curve.fixed * 1e3 if self.curve else None,
                "step_per_row_ms": self.curve.per_row * 1e3 if self.curve else None,
                "ideal_s": self.ideal_s, "ideal_prefill_s": self.ideal_prefill_s,
                "ideal_decode_s": self.ideal_decode_s}


def compute(makespan_s: float, prefill: list[PrefillStats], loops: list[DecodeStats | ColocatedStats],
            prompt_tokens: int, output_lengths: list[int], max_num_seqs: int) -> Breakdown:
    rows: dict[int, tuple[int, float]] = {}
    for s in loops:
        for b, (c, t) in s.loop.steps_by_rows.items():
            c0, t0 = rows.get(b, (0, 0.0))
            rows[b] = (c0 + c, t0 + t)
    curve = StepCurve.fit(rows)
    forward = sum(p.forward_seconds for p in prefill)
    computed = sum(p.computed_tokens for p in prefill)
    rate = computed / forward if prefill and forward > 0 else None
    return Breakdown(
        makespan_s=makespan_s, prefill_s=forward if prefill else None,
        decode_s=sum(s.loop.step_seconds for s in loops),
        lease_wait_s=sum(p.lease_wait_seconds for p in prefill) + sum(s.loop.lease_wait_seconds for s in loops),
        prefill_tok_s=rate, curve=curve, ideal_prefill_s=computed / rate if rate else None,
        ideal_decode_s=replay_decode(output_lengths, max_num_seqs, curve) if curve else None)


def render(b: Breakdown) -> str:
    pct = lambda x: f"{x:.2f} s ({x / b.makespan_s:.0%})"  # noqa: E731
    lines = [f"breakdown of the {b.makespan_s:.2f} s makespan:",
             f"  prefill compute   {pct(b.prefill_s) if b.prefill_s is not None else 'inside the steps (colocated)'}",
             f"  decode steps      {pct(b.decode_s)}",
             f"  the rest          {pct(b.rest_s)}  (router, Ray, transfers, admission, idle while work waits)",
             f"  core lease waits  {b.lease_wait_s:.2f} s (summed over both sides)"]
    if b.curve:
        mixed = " over mixed steps (prefill chunks in them)" if b.prefill_s is None else ""
        lines.append(f"  step time         {b.curve.fixed * 1e3:.1f} ms + {b.curve.per_row * 1e3:.2f} ms/row "
                     f"(fit{mixed})")
    if b.ideal_s is not None:
        lines.append(f"ideal makespan {b.ideal_s:.2f} s (prefill {b.ideal_prefill_s:.2f} s at "
                     f"{b.prefill_tok_s:.0f} tok/s + decode replay {b.ideal_decode_s:.2f} s) vs measured "
                     f"{b.makespan_s:.2f} s: {b.makespan_s / b.ideal_s:.2f}x")
    return "\n".join(lines)
