"""Speculative decoding over the continuous batch: draft, verify all in one target forward, keep.

The batcher hands every step to `SpeculativeStepper.step` first; it returns None when this step
should be a plain one (γ* = 0, or nothing was drafted), and the batcher then decodes as usual
and reports that step's cost through `observe_plain`.

One speculative step over B running sequences (sequence i asks for γ_i = min(γ, tokens it may
still emit - 1) drafts, so its KV never leaves its reservation of prompt + max_tokens):

    drafts   = drafter.propose(seqs, γ_i)                  ragged, possibly empty
    logits   = runner.extend([last_i] + drafts_i)          one target forward, Σ(d_i + 1) rows
    new_i    = verifier(logits, drafts)                    kept drafts + one target token
    output_i += new_i, token by token until a stop         rejected positions: nothing to undo,
                                                           the next step overwrites their KV
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from decode_worker.stopping import StopChecker
from engine.kv_cache import KVPool
from engine.runner import ModelRunner
from engine.specdec import AcceptanceTracker, Draft, Drafter, GammaChooser, Verifier
from engine.structured.drafts import mask_verify_logits_


@dataclass
class SpecState:
    """Per request, on DecodeSequence.spec: its acceptance tracker, the γ of its last step, and the
    counts its output line reports (the dashboard's γ and tokens per target forward)."""

    tracker: AcceptanceTracker = field(default_factory=AcceptanceTracker)
    last_gamma: int = 0
    steps: int = 0  # speculative (verify) steps it took part in
    gamma_sum: int = 0  # Σ γ asked of the drafter over those steps
    forwards: int = 0  # target forwards that gave it tokens: speculative steps + plain steps


class SpeculativeStepper:
    def __init__(self, runner: ModelRunner, pool: KVPool, stopper: StopChecker, drafter: Drafter,
                 chooser: GammaChooser, verifier: Verifier | None = None) -> None:
        self.runner, self.pool, self.stopper, self.drafter = runner, pool, stopper, drafter
        self.chooser = chooser
        self.verifier = verifier or Verifier()
        self.last_gamma = 0
        self.spec_steps = self.plain_steps = 0
        self._batch: list[Any] = []  # the sequences of the latest step (a plain one's finished are released)
        self.rows = 0  # Σ batch size over target forwards (speculative and plain): tokens per forward = out / rows

    def step(self, seqs: list[Any]) -> tuple[list[Any], list[Any]] | None:
        """One speculative step; (finished, still running), or None for a plain step."""
        self._batch = list(seqs)
        states = [_state(s) for s in seqs]
        gamma = self.chooser.choose([st.tracker.alpha for st in states])
        self.last_gamma = gamma
        if gamma == 0:
            return None
        asked = [max(0, min(gamma, s.params.max_tokens - len(s.output) - 1)) for s in seqs]
        started = time.perf_counter()
        drafts = self.drafter.propose(seqs, asked)
        drafted = time.perf_counter()
        if not any(d.tokens for d in drafts):
            return None
        new_tokens = self._verify(seqs, drafts)
        self.spec_steps += 1
        self.rows += len(seqs)
        self.chooser.costs.observe_spec(len(seqs), gamma, drafted - started, time.perf_counter() - drafted,
                                        self.chooser.steps)
        now = time.time()
        finished, still = [], []
        for seq, st, ask, d, new in zip(seqs, states, asked, drafts, new_tokens):
            st.tracker.update(ask, len(d.tokens), len(new) - 1)
            st.last_gamma = ask
            st.steps, st.gamma_sum, st.forwards = st.steps + 1, st.gamma_sum + ask, st.forwards + 1
            self._append(seq, new, now)
            (finished if seq.finish_reason else still).append(seq)
        self._release(finished)
        return finished, still

    def observe_plain(self, batch_size: int, seconds: float) -> None:
        self.plain_steps += 1
        self.rows += batch_size
        self.chooser.costs.observe_plain(batch_size, seconds, self.chooser.steps)
        for seq in self._batch:  # the plain step ran over exactly the batch `step` declined
            _state(seq).forwards += 1
        self._release([s for s in self._batch if s.finish_reason])

    def _release(self, finished: Sequence[Any]) -> None:
        """Tell a drafter with per-sequence state (model:PATH's own KV) which sequences are done;
        aborted ones it frees when they no longer show up in a step."""
        release = getattr(self.drafter, "release", None)
        if release is not None:
            for seq in finished:
                release(seq.request_id)

    def _verify(self, seqs: Sequence[Any], drafts: list[Draft]) -> list[list[int]]:
        chunks = [[s.output[-1], *d.tokens] for s, d in zip(seqs, drafts)]
        logits = self.runner.extend(self.pool, chunks, [s.next_position for s in seqs],
                                    [s.block_table for s in seqs], all_logits=True)
        if any(s.grammar is not None for s in seqs):  # each verified position under its grammar's mask there
            mask_verify_logits_(logits, [s.grammar for s in seqs], [d.tokens for d in drafts])
        return self.verifier(logits, drafts, [s.params for s in seqs], [len(s.output) for s in seqs])

    def _append(self, seq: Any, new: list[int], now: float) -> None:
        """Append token by token; a stop (EOS, stop string, max_tokens) cuts the rest of the run."""
        for token in new:
            if self.stopper.accept(seq, token, now):
                return


def _state(seq: Any) -> SpecState:
    if seq.spec is None:
        seq.spec = SpecState()
    return seq.spec


def spec_summary(seq: Any) -> dict[str, float] | None:
    """Drafted / accepted counts and α of a finished sequence, for its output line; also its speculative
    steps, the mean γ asked in them, and all target forwards that gave it tokens (decode tokens ÷
    forwards = tokens per target forward)."""
    st: SpecState | None = seq.spec
    if st is None:
        return None
    t = st.tracker
    return {"drafted": t.drafted_total, "accepted": t.accepted_total, "alpha": round(t.alpha, 4),
            "steps": st.steps, "gamma_mean": round(st.gamma_sum / st.steps, 4) if st.steps else 0.0,
            "forwards": st.forwards}


def build_stepper(runner: ModelRunner, pool: KVPool, stopper: StopChecker, speculative: str | None = None,
                  num_tokens: int | str | None = None) -> SpeculativeStepper | None:
    """The stepper the engine config asks for (`speculative`, `num_speculative_tokens`, unless given);
    None when off."""
    from engine.specdec import make_drafter

    cfg = runner.config
    drafter = make_drafter(speculative or cfg.speculative, runner.model, pool, runner.backend, runner)
    if drafter is None:
        return None
    n = cfg.num_speculative_tokens if num_tokens is None else num_tokens
    chooser = GammaChooser() if n == "auto" else GammaChooser(fixed=int(n))
    return SpeculativeStepper(runner, pool, stopper, drafter, chooser)
