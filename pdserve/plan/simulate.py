"""The planner's model of a PD deployment: a discrete-event simulation of the router's policies.

Why a simulation and not closed forms: under load the router packs every queued prompt of a length
bucket into one prefill call (up to a token budget), so a call's fixed cost -- reading every weight
once, ~30-90 ms on a CPU core -- is shared by several prompts. A queue that serves one prompt per call
(M/G/1) charges that cost to every prompt and under-predicted the rate a 1P+1D pair sustains here by a
fifth; a batch-service queue has no usable closed form once the batches are cut by length buckets and
the two-call mailbox of each worker. DistServe's placement search simulates for the same reason.

What it mirrors (router/router.py, decode_worker/):
- the router's own length-bucket queue (router.queue.LengthBucketQueue) on the simulated clock, with
  the tiebreak the router gives it (longest output first within a bucket);
- each prefill worker holds up to `prefill_batches_in_flight` calls, one running and the rest in its
  mailbox; the router cuts the next call as soon as a slot opens and sends it to the ready worker with
  the fewest tokens in flight;
- a prompt's tokens found in the prefix cache (`cached`) are neither computed nor sent, though its other
  tokens attend to them;
- a call takes the profiled time of its packed prompts (pdserve.plan.profile.PrefillFit) plus the KV
  transfer prefill does not hide: all of it over shared memory, which copies each layer inside the
  forward (one CPU node), the last layer's share over CUDA IPC or gRPC, which stream while prefill
  computes; its prompts' first tokens are out when it returns (TTFT);
- with batch admissions (run-batch and `up` on one shared CPU node) the router holds prefilled requests
  until no prefill call is in flight and admits them together; otherwise at once, all of a call's
  requests for one decode worker in one admission;
- each request is placed on the decode worker with the fewest tokens reserved, joins its batch at the
  next step boundary when there is room under the max batch (FIFO otherwise), and leaves after
  output - 1 steps; a step of B sequences with total context C takes c + d*B + e*C;
- workers that share a device slow each other: each call or step is timed by its fit moved toward the
  busy-neighbour fit by the number of the other workers busy when it starts.
The front end's CPU on the same cores stretches every time (Resources.time_scale). Left out: KV pool
limits (`does_fit` always fits), retries.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pdserve.plan.profile import DecodeFit, PrefillFit, StageProfile
from router.queue import DEFAULT_BUCKET_EDGES, LengthBucketQueue


@dataclass(frozen=True)
class RouterPolicy:
    """The router's prefill batching: router.router.RouterConfig's fields of the same names."""

    max_prefill_tokens: int = 2048
    max_prefill_batch: int = 64
    prefill_batches_in_flight: int = 2
    bucket_edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES
    aging_s: float = 10.0
    batch_admissions: bool = False
    colocated_backlog: int = 8  # --mode colocated: requests a worker may hold beyond its max batch

    @classmethod
    def of(cls, router_config, shared_cores: bool = False) -> RouterPolicy:
        """`shared_cores`: what the router decides batch admissions by when the config leaves it to it."""
        fields = {k: getattr(router_config, k) for k in cls.__dataclass_fields__}
        if fields["batch_admissions"] is None:
            fields["batch_admissions"] = shared_cores
        return cls(**fields)


ROUTER_DEFAULTS = RouterPolicy()
ONE_PROMPT_PER_CALL = RouterPolicy(max_prefill_batch=1, prefill_batches_in_flight=1)  # an M/G/1 queue per worker


@dataclass(frozen=True)
class StageTimes:
    """A stage's solo and busy-neighbour fits, on one worker's share of the device (`scale`)."""

    prefill: PrefillFit
    decode: DecodeFit
    prefill_busy: PrefillFit | None = None
    decode_busy: DecodeFit | None = None
    scale: float = 1.0
    exposed_transfer_s_per_token: float = 0.0  # the KV transfer a prefill call does not hide

    @classmethod
    def of(cls, profile: StageProfile, scale: float, transfer_gbps: float, neighbours: bool,
           transfer_hidden: bool = False) -> StageTimes:
        """`transfer_hidden`: the transport streams layers while prefill computes (CUDA IPC, gRPC), so only
        the last layer's share shows; shared memory copies each layer inside the forward."""
        per_token = profile.kv_bytes_per_token / (transfer_gbps * 1e9) if transfer_gbps > 0 else 0.0
        return cls(profile.prefill, profile.decode, profile.prefill_busy if neighbours else None,
                   profile.decode_busy if neighbours else None, scale,
                   per_token / profile.num_layers if transfer_hidden else per_token)

    def prefill_s(self, tokens: int, busy_neighbours: int, square_sum: float | None = None) -> float:
        return self.scale * self.prefill.toward(self.prefill_busy, busy_neighbours).time(tokens, square_sum)

    def decode_fit(self, busy_neighbours: int) -> DecodeFit:
        return self.decode.toward(self.decode_busy, busy_neighbours)

    def decode_s(self, batch: int, context_tokens: int, busy_neighbours: int) -> float:
        fit = self.decode_fit(busy_neighbours)
        return self.scale * (fit.c_s + fit.d_s_per_seq * batch + fit.e_s_per_seq_token * context_tokens)


@dataclass
class SimResult:
    ttft_s: np.ndarray  # per request
    tpot_s: np.ndarray  # per request; 0 for a one-token output
    prefill_wait_s: np.ndarray  # arrival to the start of its prefill call
    prefill_busy: float  # share of the time a prefill worker computes, averaged over workers
    decode_busy: float  # share of the time a decode worker steps, averaged over workers
    prompts_per_call: float
    rows_per_step: float  # decode batch, averaged over steps

    @staticmethod
    def tpots(first_token: np.ndarray, finish: np.ndarray, outputs: list[int]) -> np.ndarray:
        """Per request: (finish - first token) over the tokens after the first; 0 for a one-token output."""
        outs = np.array(outputs)
        return np.where(outs > 1, (finish - first_token) / np.maximum(outs - 1, 1), 0.0)

    def attainment(self, ttft_slo_s: float, tpot_slo_s: float) -> tuple[float, float, float]:
        """(TTFT ok, TPOT ok, both ok): shares of all requests."""
        ttft, tpot = self.ttft_s <= ttft_slo_s, self.tpot_s <= tpot_slo_s
        return float(ttft.mean()), float(tpot.mean()), float((ttft & tpot).mean())


@dataclass
class _PrefillWorker:
    index: int
    mailbox: deque = field(default_factory=deque)  # calls sent, not started: lists of request indices
    calls: int = 0  # sent and not returned, the running one included
    tokens: int = 0  # prompt tokens of those calls
    running: bool = False
    busy_s: float = 0.0


@dataclass
class _DecodeWorker:
    index: int
    waiting: deque = field(default_factory=deque)
    finishes: list = field(default_factory=list)  # heap of (step it finishes after, request, context at join)
    reserved: int = 0  # prompt + output tokens of its unfinished requests
    step: int = 0
    context: int = 0  # the running sequences' contexts summed
    stepping: bool = False
    busy_s: float = 0.0
    steps: int = 0
    rows: int = 0


_DONE_PREFILL, _DONE_STEP, _ARRIVE = 0, 1, 2  # at equal times: returns before arrivals


def simulate(times: StageTimes, arrivals_s: np.ndarray, prompts: np.ndarray, outputs: np.ndarray,
             prefill_workers: int, decode_workers: int, max_batch: int,
             policy: RouterPolicy = ROUTER_DEFAULTS, cached: np.ndarray | None = None) -> SimResult:
    """Serve requests arriving at `arrivals_s` (sorted) with these prompt and output token counts, `cached`
    of each prompt's tokens in the prefix cache (default none)."""
    return _Sim(times, arrivals_s, prompts, outputs, prefill_workers, decode_workers, max_batch, policy,
                cached).run()


def computed_squares(prompt: float, cached: float) -> float:
    """A prefill's attention work for a prompt whose first `cached` tokens are cached: each computed token
    attends to all before it, so L^2 - c^2 (the per-prompt square of PrefillFit)."""
    return prompt * prompt - cached * cached


class _Sim:
    def __init__(self, times, arrivals_s, prompts, outputs, n_prefill, n_decode, max_batch, policy, cached) -> None:
        self.times, self.policy, self.max_batch = times, policy, max_batch
        self.arrive = np.asarray(arrivals_s, dtype=float)
        self.prompts = [int(p) for p in prompts]
        self.outputs = [int(o) for o in outputs]
        n = len(self.prompts)
        self.cached = [0.0] * n if cached is None else [float(c) for c in cached]
        self.first_token, self.finish, self.started = np.zeros(n), np.zeros(n), np.zeros(n)
        self.decode_of = [0] * n
        self.prefill = [_PrefillWorker(i) for i in range(n_prefill)]
        self.decode = [_DecodeWorker(i) for i in range(n_decode)]
        self.now = 0.0
        self.queue: LengthBucketQueue[int] = LengthBucketQueue(policy.bucket_edges, policy.aging_s, lambda: self.now)
        self.events: list[tuple[float, int, int, int]] = [(t, _ARRIVE, i, i) for i, t in enumerate(self.arrive)]
        heapq.heapify(self.events)
        self.order = itertools.count(n)
        self.calls = 0
        self.held: list[int] = []  # prefilled, not yet admitted to decode

    def run(self) -> SimResult:
        events, handlers = self.events, (self._prefill_done, self._step_done, self._arrived)
        while events:
            self.now, kind, _, who = heapq.heappop(events)
            handlers[kind](who)
        span = max(self.now, 1e-12)
        steps = sum(d.steps for d in self.decode)
        return SimResult(self.first_token - self.arrive, SimResult.tpots(self.first_token, self.finish, self.outputs),
                         self.started - self.arrive,
                         sum(p.busy_s for p in self.prefill) / (len(self.prefill) * span),
                         sum(d.busy_s for d in self.decode) / (len(self.decode) * span),
                         len(self.prompts) / max(self.calls, 1),
                         sum(d.rows for d in self.decode) / steps if steps else 0.0)

    # ---- prefill ---------------------------------------------------------------------------
    def _arrived(self, i: int) -> None:
        self.queue.put(i, self.prompts[i], 0, tiebreak=-self.outputs[i])
        self._dispatch()

    def _dispatch(self) -> None:
        p = self.policy
        while len(self.queue):
            ready = [w for w in self.prefill if w.calls < p.prefill_batches_in_flight]
            if not ready:
                return
            worker = min(ready, key=lambda w: (w.tokens, w.index))
            call = self.queue.constrained_get(token_budget=p.max_prefill_tokens, max_items=p.max_prefill_batch)
            for i in call:
                d = min(self.decode, key=lambda w: (w.reserved, w.index))
                d.reserved += self.prompts[i] + self.outputs[i]
                self.decode_of[i] = d.index
            worker.mailbox.append(call)
            worker.calls += 1
            worker.tokens += sum(self.prompts[i] for i in call)
            self.calls += 1
            if not worker.running:
                self._start_call(worker)

    def _start_call(self, worker: _PrefillWorker) -> None:
        call = worker.mailbox[0]
        tokens = sum(self.prompts[i] - self.cached[i] for i in call)
        squares = sum(computed_squares(self.prompts[i], self.cached[i]) for i in call)
        busy = sum(w.running for w in self.prefill) + sum(d.stepping for d in self.decode)
        duration = self.times.prefill_s(tokens, busy, squares) + self.times.exposed_transfer_s_per_token * tokens
        for i in call:
            self.started[i] = self.now
        worker.running, worker.busy_s = True, worker.busy_s + duration
        heapq.heappush(self.events, (self.now + duration, _DONE_PREFILL, self._seq(), worker.index))

    def _prefill_done(self, index: int) -> None:
        worker = self.prefill[index]
        call = worker.mailbox.popleft()
        worker.running, worker.calls = False, worker.calls - 1
        worker.tokens -= sum(self.prompts[i] for i in call)
        for i in call:
            self.first_token[i] = self.now
            if self.outputs[i] <= 1:
                self.finish[i] = self.now
                self.decode[self.decode_of[i]].reserved -= self.prompts[i] + self.outputs[i]
            else:
                self.held.append(i)
        if worker.mailbox:
            self._start_call(worker)
        self._dispatch()
        if not self.policy.batch_admissions or not any(w.calls for w in self.prefill):
            self._admit()

    def _admit(self) -> None:
        """Every held request joins its decode worker's queue before any idle one steps: a call's requests
        for one worker arrive in one admission and step together."""
        touched = {self.decode_of[i] for i in self.held}
        for i in self.held:
            self.decode[self.decode_of[i]].waiting.append(i)
        self.held = []
        for d in sorted(touched):
            if not self.decode[d].stepping:
                self._start_step(self.decode[d])

    # ---- decode ----------------------------------------------------------------------------
    def _start_step(self, d: _DecodeWorker) -> None:
        while d.waiting and len(d.finishes) < self.max_batch:
            i = d.waiting.popleft()
            context = self.prompts[i] + 1
            heapq.heappush(d.finishes, (d.step + self.outputs[i] - 1, i, context - d.step))
            d.context += context
        batch = len(d.finishes)
        if batch == 0:
            return
        busy = sum(w.running for w in self.prefill) + sum(o.stepping for o in self.decode if o is not d)
        duration = self.times.decode_s(batch, d.context, busy)
        d.stepping, d.busy_s, d.steps, d.rows = True, d.busy_s + duration, d.steps + 1, d.rows + batch
        heapq.heappush(self.events, (self.now + duration, _DONE_STEP, self._seq(), d.index))

    def _step_done(self, index: int) -> None:
        d = self.decode[index]
        d.stepping = False
        d.step += 1
        d.context += len(d.finishes)  # every sequence made one token
        while d.finishes and d.finishes[0][0] <= d.step:
            _, i, offset = heapq.heappop(d.finishes)
            self.finish[i] = self.now
            d.context -= offset + d.step
            d.reserved -= self.prompts[i] + self.outputs[i]
        self._start_step(d)

    def _seq(self) -> int:
        """An event's tiebreak after time and kind: arrivals take 0..n-1, calls and steps count on from n."""
        return next(self.order)
