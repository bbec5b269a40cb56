"""Continuous batching over the paged KV pool: admit, step every running sequence, retire.

Single-threaded by contract: only the decode loop calls `add` and `step`.
A sequence enters with its prompt KV already in its reserved blocks and its
first token (sampled by the prefill worker); each step feeds every running
sequence's newest token, writes its KV, and samples the next. Finished
sequences leave at once, so a freed slot is refilled on the next step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from decode_worker.stopping import StopChecker
from engine.config import SamplingParams
from engine.kv_cache import KVPool
from engine.runner import ModelRunner
from engine.sampler import sample


@dataclass
class DecodeSequence:
    request_id: str
    prompt_len: int
    params: SamplingParams
    block_table: list[int]
    output: list[int]  # output[0] came from prefill
    token_times: list[float]
    admitted_at: float = field(default_factory=time.time)
    finish_reason: str | None = None
    prompt_token_ids: tuple[int, ...] = ()  # carried only when a drafter needs them (ngram)
    spec: Any = None  # speculative decoding's per-request state (decode_worker/speculative.py)

    @property
    def next_position(self) -> int:
        """Position of output[-1], whose KV the next step writes."""
        return self.prompt_len + len(self.output) - 1


class ContinuousBatcher:
    def __init__(self, runner: ModelRunner, pool: KVPool, stopper: StopChecker, max_num_seqs: int) -> None:
        self.runner, self.pool, self.stopper = runner, pool, stopper
        self.max_num_seqs = max_num_seqs
        self.speculative: Any = None  # a SpeculativeStepper when speculation is on (decode_worker/speculative.py)
        self.waiting: deque[DecodeSequence] = deque()
        self.running: list[DecodeSequence] = []
        self.device = runner.device

    def add(self, seq: DecodeSequence) -> DecodeSequence | None:
        """Queue a sequence; return it right away if its first token already ended it."""
        seq.finish_reason = self.stopper.check(seq.output, seq.params)
        if seq.finish_reason is not None:
            return seq
        self.waiting.append(seq)
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request_id: str) -> bool:
        """Drop a sequence (aborted by the router); the caller frees its blocks."""
        for group in (self.running, self.waiting):
            for seq in group:
                if seq.request_id == request_id:
                    group.remove(seq)
                    return True
        return False

    def step(self) -> list[DecodeSequence]:
        """One token for every running sequence; returns those that finished."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        if not self.running:
            return []
        seqs = self.running
        spec = self.speculative
        if spec is not None and (done := spec.step(seqs)) is not None:
            finished, self.running = done
            return finished
        started = time.perf_counter()
        tokens = torch.tensor([s.output[-1] for s in seqs], dtype=torch.long)
        positions = torch.tensor([s.next_position for s in seqs], dtype=torch.long)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.long)
        logits = self.runner.decode(self.pool, tokens.to(self.device), positions.to(self.device),
                                    tables.to(self.device))
        next_tokens = sample(logits, [s.params for s in seqs], [len(s.output) for s in seqs]).tolist()
        now = time.time()
        finished, still = [], []
        for seq, token in zip(seqs, next_tokens):
            seq.output.append(token)
            seq.token_times.append(now)
            seq.finish_reason = self.stopper.check(seq.output, seq.params)
            (finished if seq.finish_reason else still).append(seq)
        self.running = still
        if spec is not None:
            spec.observe_plain(len(seqs), time.perf_counter() - started)
        return finished
