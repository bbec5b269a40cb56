"""Continuous batching over the paged KV pool: admit, step every running sequence, retire.

Single-threaded by contract: only the decode loop calls `add` and `step`.
A sequence enters with its prompt KV already in its reserved blocks and its
first token (sampled by the prefill worker); each step feeds every running
sequence's newest token, writes its KV, and samples the next. Finished
sequences leave at once, so a freed slot is refilled on the next step.

The step's inputs live on the device (`DecodeState`): row i of the state is `running[i]`.
On CUDA a step replays a captured graph (engine/cuda_graphs.py) and, with `overlap`, step n+1 is
launched before step n's tokens are read back (SGLang's overlap scheduler): the GPU never waits for
the stop checks. A sequence that finished at step n then rode along in step n+1 (its extra token is
dropped; its KV write stays inside its reservation), so its blocks are handed back only after step
n+1 has completed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from decode_worker.decode_state import DecodeState
from decode_worker.phases import PhaseClock
from decode_worker.status import SeqStatus
from decode_worker.stopping import StopChecker
from engine.config import SamplingParams
from engine.cuda_graphs import DecodeGraphs
from engine.kv_cache import KVPool
from engine.runner import ModelRunner
from engine.sampler import sample_t
from engine.structured.bitmask import MaskFiller
from engine.structured.matcher import Matcher
from proto.kinds import FinishReason


@dataclass(eq=False)  # identity: a sequence is its own row
class DecodeSequence:
    """A request on a PD decode worker, from its reservation on (decode_worker/status.py). Its sampling
    parameters, first token and admission time arrive with `admit` (the prefill worker sampled the token)."""

    request_id: str
    prompt_len: int
    params: SamplingParams
    block_table: list[int]
    output: list[int]  # output[0] came from prefill
    token_times: list[float]
    admitted_at: float = field(default_factory=time.time)
    finish_reason: FinishReason | None = None
    prompt_token_ids: tuple[int, ...] = ()  # their blocks are keyed for prefix sharing; drafters read them
    spec: Any = None  # speculative decoding's per-request state (decode_worker/speculative.py)
    grammar: Matcher | None = None  # structured output: set by the worker when the sequence joins its loop
    status: SeqStatus = SeqStatus.RESERVED

    @property
    def next_position(self) -> int:
        """Position of output[-1], whose KV the next step writes."""
        return self.prompt_len + len(self.output) - 1


@dataclass
class _InFlight:
    """A launched step whose sampled ids are still on their way to the host."""

    seqs: list[DecodeSequence]  # row order at launch
    host_ids: torch.Tensor
    event: torch.cuda.Event | None


class ContinuousBatcher:
    def __init__(self, runner: ModelRunner, pool: KVPool, stopper: StopChecker, max_num_seqs: int,
                 cuda_graphs: bool | None = None, overlap: bool | None = None,
                 overlap_masks: bool | None = None, compiled: bool | None = None) -> None:
        """cuda_graphs / overlap: None = on for CUDA (unless the config says --enforce-eager), off on a CPU,
        where neither pays (no launch overhead; the host does the compute). Both also run on a CPU when
        asked, which is how their logic is tested without a GPU. overlap_masks: grammar bitmasks filled on
        a helper thread during the forward (engine/structured/bitmask.py); None: on (measured in
        docs/structured_outputs.md). compiled: None = on for a CPU where it can be (engine/compiled_step.py
        says why not, e.g. --enforce-eager), off on CUDA."""
        self.runner, self.pool, self.stopper = runner, pool, stopper
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[DecodeSequence] = deque()
        self.running: list[DecodeSequence] = []
        self.device = runner.device
        max_blocks = -(-runner.arch.max_position_embeddings // pool.layout.block_size)
        self.state = DecodeState(max_num_seqs, max_blocks, self.device)
        on_gpu = self.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = on_gpu and not runner.config.enforce_eager and runner.backend.graph_safe
        self.graphs = DecodeGraphs(runner.model, runner.backend, pool, max_num_seqs, max_blocks,
                                   capture=on_gpu) if cuda_graphs else None
        use_compiled = (not on_gpu) if compiled is None else compiled
        self.compiled = runner.compiled_step if use_compiled and self.graphs is None else None
        self.overlap = on_gpu if overlap is None else overlap
        self.masks = MaskFiller(runner.arch.vocab_size, overlap=True if overlap_masks is None else overlap_masks)
        self.speculative: Any = None  # a SpeculativeStepper (decode_worker/speculative.py): enable_speculation
        self._in_flight: _InFlight | None = None
        self._retiring: list[DecodeSequence] = []  # finished, blocks held until the step in flight completes
        # Per-phase times of steps (decode_worker/phases.py): admit, forward, sample, collect (read-back and
        # stop checks), retire (rows of finished sequences leave); speculative (drafting, verifying) and rebuild (rows
        # set again after a speculative step) with speculation on.
        self.phases = PhaseClock()

    def enable_speculation(self, stepper: Any) -> None:
        """Hand each step to `stepper` first. Its drafts are ragged host lists, so steps do not overlap."""
        self.speculative = stepper
        if stepper is not None:
            self.overlap = False

    def add(self, seq: DecodeSequence) -> DecodeSequence | None:
        """Queue a sequence; return it right away if its first token already ended it."""
        seq.finish_reason = self.stopper.reason(seq)
        if seq.finish_reason is not None:
            return seq
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight or self._retiring)

    def remove(self, request_id: str) -> bool:
        """Drop a sequence (aborted by the router); the caller frees its blocks."""
        self._settle()  # no step in flight may still write its KV
        for i, seq in enumerate(self.running):
            if seq.request_id == request_id:
                self._drop_row(i)
                return True
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return True
        return False

    def abort_all(self) -> list[DecodeSequence]:
        """Every sequence held (after a failed step): the batch and the device state start empty."""
        seqs = self.running + list(self.waiting) + self._retiring
        if self._in_flight is not None:
            seqs += [s for s in self._in_flight.seqs if s not in seqs]
        self.running, self.waiting, self._retiring, self._in_flight = [], deque(), [], None
        while self.state.n:
            self.state.remove(self.state.n - 1)
        return seqs

    def step(self) -> list[DecodeSequence]:
        """One token for every running sequence; returns those that finished (blocks free to reuse)."""
        self.phases.start()
        try:
            return self._step()
        finally:
            self.phases.stop()

    def _step(self) -> list[DecodeSequence]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            self.state.append(seq.output[-1], seq.next_position, len(seq.output), seq.block_table, seq.params)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        self.phases.lap("admit")
        if not self.running:
            self._settle()
            done, self._retiring = self._retiring, []
            return done
        if self.speculative is not None:
            return self._speculative_or_plain_step()
        if self.overlap and any(s.grammar is not None for s in self.running):
            return self._step_in_order()
        launched = self._launch()
        if not self.overlap:
            return self._collect(launched)
        previous, self._in_flight = self._in_flight, launched
        finished = self._collect(previous) if previous is not None else []
        # The step just launched completed the one before it, so what finished earlier is safe now;
        # what finished in `previous` rode along in `launched` and waits for the next call.
        done, self._retiring = self._retiring, finished
        return done

    def _step_in_order(self) -> list[DecodeSequence]:
        """A step that waits for the one in flight first: a grammar's mask needs the row's previous token."""
        self._settle()
        finished = self._collect(self._launch()) if self.running else []
        done, self._retiring = self._retiring + finished, []
        return done

    def _speculative_or_plain_step(self) -> list[DecodeSequence]:
        """A speculative step when the stepper finds one worth it, else a plain one it learns costs from.
        After a speculative step the device rows are rebuilt from the sequences (several tokens moved)."""
        result = self.speculative.step(self.running)
        self.phases.lap("speculative")  # drafting and verifying, or only deciding not to
        if result is None:
            started = time.perf_counter()
            batch = len(self.running)
            finished = self._collect(self._launch())
            self.speculative.observe_plain(batch, time.perf_counter() - started)
            return finished
        finished, still = result
        while self.state.n:
            self.state.remove(self.state.n - 1)
        for seq in still:
            self.state.append(seq.output[-1], seq.next_position, len(seq.output), seq.block_table, seq.params)
        self.running = list(still)
        self.phases.lap("rebuild")
        return finished

    def _launch(self) -> _InFlight:
        """Enqueue one step over rows [0, n) and the copy of its sampled ids to the host."""
        state, n = self.state, self.state.n
        tokens, positions = state.tokens[:n], state.positions[:n]
        masks = self.masks.begin([s.grammar for s in self.running])  # filled while the forward runs
        if self.graphs is not None and self.graphs.covers(n):
            logits = self.graphs.run(tokens, positions, state.block_tables[:n])
        elif self.compiled is not None:
            logits = self.compiled.run(self.pool, tokens, positions, state.block_tables[:n, : state.width])
        else:
            logits = self.runner.decode(self.pool, tokens, positions, state.block_tables[:n, : state.width])
        self.phases.lap("forward")
        if masks is not None:
            masks.apply(logits)
            self.phases.lap("mask")
        sampled = sample_t(logits, state.sampling(), state.steps[:n])
        state.advance(sampled)
        self.phases.lap("sample")
        if self.device.type == "cuda":
            host = torch.empty(n, dtype=torch.int64, pin_memory=True)
            host.copy_(sampled, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return _InFlight(list(self.running), host, event)
        return _InFlight(list(self.running), sampled, None)

    def _collect(self, flight: _InFlight) -> list[DecodeSequence]:
        """Wait for a launched step's ids (the one host sync), append them, retire finished sequences."""
        if flight.event is not None:
            flight.event.synchronize()
        ids = flight.host_ids.tolist()
        now = time.time()
        alive = {id(s) for s in self.running}
        finished = []
        for seq, token in zip(flight.seqs, ids):
            if id(seq) not in alive:
                continue  # finished at the step before (it rode along under overlap) or aborted
            if self.stopper.accept(seq, token, now):
                finished.append(seq)
        self.phases.lap("collect")
        for seq in finished:
            self._drop_row(self.running.index(seq))
            seq.status = SeqStatus.RETIRING
        self.phases.lap("retire")
        return finished

    def _drop_row(self, i: int) -> None:
        last = len(self.running) - 1
        self.state.remove(i)
        self.running[i] = self.running[last]
        self.running.pop()

    def _settle(self) -> None:
        """Complete the step in flight (overlap); what it finished joins the sequences safe to release."""
        if self._in_flight is not None:
            flight, self._in_flight = self._in_flight, None
            self._retiring += self._collect(flight)
