"""Chunked prefill mixed into decode steps under a token budget: the colocated worker's scheduler.

vLLM's and SGLang's default policy. Each step:

    rows   = one row per running sequence that has its first token       (decode: 1 token each)
           + a chunk of each prompt still prefilling, oldest first,      (prefill: what the budget leaves)
             admitting waiting sequences while rows < max_num_seqs
    tokens = Σ rows' tokens <= max_num_batched_tokens

Decode rows come first and are never left out (max_num_batched_tokens >= max_num_seqs), so a long
prompt cannot stall the running batch; a prompt longer than the budget left is cut into chunks over
several steps, and the step that runs its last chunk samples its first token (step 0 of the keyed
sampler, as a PD prefill worker does). Pure bookkeeping: the worker runs the plan (engine/mixed.py)
and hands the sampled ids back to `postprocess`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from decode_worker.status import SeqStatus
from decode_worker.stopping import StopChecker
from engine.config import SamplingParams
from proto.kinds import FinishReason


@dataclass(eq=False)  # identity: a sequence is its own row
class ColocatedSequence:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    block_table: list[int]
    computed: int = 0  # prompt tokens whose KV is in the pool (starts at the cached prefix)
    cached_tokens: int = 0  # prompt tokens found in the pool's prefix cache (never computed)
    output: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.time)
    prefill_start: float | None = None  # its first chunk's step
    prefill_end: float | None = None  # its last chunk's step: its first token
    finish_reason: FinishReason | None = None
    status: SeqStatus = SeqStatus.WAITING  # decode_worker/status.py

    @property
    def prefilled(self) -> bool:
        return bool(self.output)

    @property
    def next_position(self) -> int:
        """Position of output[-1], whose KV the next decode row writes."""
        return len(self.prompt) + len(self.output) - 1


@dataclass(frozen=True)
class StepRow:
    seq: ColocatedSequence
    tokens: tuple[int, ...]  # this step's input tokens of the sequence
    start: int  # position of tokens[0] (= tokens of the sequence already in the pool)
    samples: bool  # its last logits give a token: a decode row, or a prompt's last chunk


@dataclass(frozen=True)
class StepPlan:
    rows: tuple[StepRow, ...]  # decode rows first, then prefill chunks
    num_decode: int

    @property
    def num_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)

    @property
    def sampling_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r.samples]


class ChunkScheduler:
    def __init__(self, stopper: StopChecker, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens ({max_num_batched_tokens}) must be at least --max-num-seqs "
                             f"({max_num_seqs}): every running sequence needs its decode row in each step")
        self.stopper = stopper
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[ColocatedSequence] = deque()
        self.running: list[ColocatedSequence] = []  # admitted: prefilling or decoding, in admission order

    def add(self, seq: ColocatedSequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request_id: str) -> ColocatedSequence | None:
        """Take a sequence out (aborted); the caller frees its blocks. Only between steps."""
        for seqs in (self.running, self.waiting):
            for seq in seqs:
                if seq.request_id == request_id:
                    seqs.remove(seq)
                    return seq
        return None

    def abort_all(self) -> list[ColocatedSequence]:
        seqs, self.running, self.waiting = self.running + list(self.waiting), [], deque()
        return seqs

    def schedule(self, now: float | None = None) -> StepPlan | None:
        """The next step's rows, or None when there is nothing to run."""
        now = time.time() if now is None else now
        rows = [StepRow(s, (s.output[-1],), s.next_position, True) for s in self.running if s.prefilled]
        num_decode = len(rows)
        budget = self.max_num_batched_tokens - num_decode
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilled:
                budget -= self._chunk(seq, budget, rows, now)
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            self.running.append(seq)
            budget -= self._chunk(seq, budget, rows, now)
        return StepPlan(tuple(rows), num_decode) if rows else None

    @staticmethod
    def _chunk(seq: ColocatedSequence, budget: int, rows: list[StepRow], now: float) -> int:
        n = min(len(seq.prompt) - seq.computed, budget)
        seq.status = SeqStatus.PREFILLING
        rows.append(StepRow(seq, seq.prompt[seq.computed:seq.computed + n], seq.computed,
                            seq.computed + n == len(seq.prompt)))
        if seq.prefill_start is None:
            seq.prefill_start = now
        return n

    def postprocess(self, plan: StepPlan, sampled: list[int],
                    now: float | None = None) -> tuple[list[ColocatedSequence], list[ColocatedSequence]]:
        """Apply a step's sampled ids (one per sampling row, in row order). Returns (sequences that got
        their first token, sequences that finished); finished ones leave the batch (blocks free to reuse)."""
        now = time.time() if now is None else now
        tokens = iter(sampled)
        prefilled, finished = [], []
        for row in plan.rows:
            seq = row.seq
            seq.computed = min(len(seq.prompt), row.start + len(row.tokens))
            if not row.samples:
                continue
            token = next(tokens)
            if not seq.prefilled:
                seq.prefill_end = now
                seq.status = SeqStatus.RUNNING
                prefilled.append(seq)
            if self.stopper.accept(seq, token, now):
                finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
        return prefilled, finished
