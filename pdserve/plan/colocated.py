"""The planner's model of `--mode colocated`: workers that each prefill and decode, simulated on the
same clock, arrivals and stage timings as the PD model (pdserve.plan.simulate), so that `pdserve plan`
can say which mode a workload should run in.

What it mirrors (router/colocated.py, decode_worker/chunk_scheduler.py):
- the router sends each request, in its queue's order, to the worker with the fewest tokens reserved
  among those holding fewer than max batch + backlog requests; the rest wait in the router;
- each step runs one decode row per sequence that has its first token, then chunks of the prompts
  still prefilling (oldest first, admitting waiting ones while the batch has room) up to the token
  budget; the step that runs a prompt's last chunk gives its first token;
- a step with no chunk is a decode step (c + d*B + e*C); a step with chunks beside B decode rows costs
  a prefill call of the chunks (its fixed cost and floor once, each chunk's attention over its prompt so
  far) plus the rows' own decode costs (d*B + e*C): the weights are read once for both, which is what
  mixing buys;
- workers on one device slow each other as in PD: a step with a chunk moves toward the prefill busy
  fit, a decode step toward the decode busy fit, by the other workers stepping when it starts.
Prefix-cache hits and the front end's CPU count as in PD; left out as there: KV pool limits.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pdserve.plan.simulate import ROUTER_DEFAULTS, RouterPolicy, SimResult, StageTimes
from router.queue import LengthBucketQueue


@dataclass
class _Seq:
    index: int
    prompt: int
    steps_left: int  # decode steps after its first token
    computed: int = 0  # prompt tokens prefilled (or found in the prefix cache)
    context: int = 0  # once prefilled: tokens in the pool


@dataclass
class _Worker:
    index: int
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)  # admitted, in admission order
    reserved: int = 0
    held: int = 0  # requests sent to it and not finished
    stepping: bool = False
    plan: tuple = ()  # the running step: (decode rows, [(seq, chunk tokens)])
    busy_s: float = 0.0
    chunk_s: float = 0.0  # time in steps that carry a prefill chunk
    steps: int = 0
    rows: int = 0
    chunk_steps: int = 0
    chunks: int = 0


def simulate_colocated(times: StageTimes, arrivals_s: np.ndarray, prompts: np.ndarray, outputs: np.ndarray,
                       workers: int, max_batch: int, batched_tokens: int, policy: RouterPolicy = ROUTER_DEFAULTS,
                       cached: np.ndarray | None = None) -> SimResult:
    """Serve requests arriving at `arrivals_s` on `workers` colocated workers. SimResult's prefill fields
    describe the steps that carry chunks: prefill_busy is the share of time in them, prompts_per_call the
    chunks per such step."""
    if batched_tokens < max_batch:
        raise ValueError(f"the token budget ({batched_tokens}) must be at least the max batch ({max_batch})")
    return _ColocatedSim(times, arrivals_s, prompts, outputs, workers, max_batch, batched_tokens, policy,
                         cached).run()


class _ColocatedSim:
    def __init__(self, times, arrivals_s, prompts, outputs, workers, max_batch, budget, policy, cached) -> None:
        self.times, self.max_batch, self.budget = times, max_batch, budget
        self.most = max_batch + policy.colocated_backlog
        self.arrive = np.asarray(arrivals_s, dtype=float)
        self.prompts = [int(p) for p in prompts]
        self.outputs = [int(o) for o in outputs]
        n = len(self.prompts)
        self.cached = [0] * n if cached is None else [int(c) for c in cached]  # whole tokens: chunks are
        self.first_token, self.finish, self.started = np.zeros(n), np.zeros(n), np.full(n, np.nan)
        self.workers = [_Worker(i) for i in range(workers)]
        self.now = 0.0
        self.queue: LengthBucketQueue[int] = LengthBucketQueue(policy.bucket_edges, policy.aging_s, lambda: self.now)
        self.events = [(t, 1, i, i) for i, t in enumerate(self.arrive)]  # (time, kind, order, who)
        heapq.heapify(self.events)
        self.order = itertools.count(n)

    def run(self) -> SimResult:
        while self.events:
            self.now, kind, _, who = heapq.heappop(self.events)
            if kind == 1:
                self.queue.put(who, self.prompts[who], 0, tiebreak=-self.outputs[who])
                self._dispatch()
            else:
                self._step_done(self.workers[who])
        w, span = self.workers, max(self.now, 1e-12) * len(self.workers)
        steps, chunk_steps = sum(x.steps for x in w), sum(x.chunk_steps for x in w)
        return SimResult(self.first_token - self.arrive, SimResult.tpots(self.first_token, self.finish, self.outputs),
                         self.started - self.arrive, sum(x.chunk_s for x in w) / span,
                         sum(x.busy_s for x in w) / span, sum(x.chunks for x in w) / max(chunk_steps, 1),
                         sum(x.rows for x in w) / steps if steps else 0.0)

    def _dispatch(self) -> None:
        def fits(i: int) -> bool:
            room = [w for w in self.workers if w.held < self.most]
            if not room:
                return False
            w = min(room, key=lambda x: (x.reserved, x.index))
            w.reserved += self.prompts[i] + self.outputs[i]
            w.held += 1
            w.waiting.append(_Seq(i, self.prompts[i], self.outputs[i] - 1, computed=self.cached[i]))
            if not w.stepping:
                self._start_step(w)
            return True

        while len(self.queue):
            if not self.queue.constrained_get(fits):  # one bucket's fitting head run at a time
                return

    def _start_step(self, w: _Worker) -> None:
        if w.stepping:
            return
        decode = [s for s in w.running if s.context]
        left = self.budget - len(decode)
        chunks: list[tuple[_Seq, int]] = []
        for s in w.running:
            if left <= 0:
                break
            if not s.context:
                n = min(s.prompt - s.computed, left)
                chunks.append((s, n))
                left -= n
        while left > 0 and w.waiting and len(w.running) < self.max_batch:
            s = w.waiting.popleft()
            w.running.append(s)
            self.started[s.index] = self.now
            n = min(s.prompt - s.computed, left)
            chunks.append((s, n))
            left -= n
        if not decode and not chunks:
            return
        busy = sum(o.stepping for o in self.workers if o is not w)
        context = sum(s.context for s in decode)
        tokens = sum(n for _, n in chunks)
        if tokens:
            squares = sum((s.computed + n) ** 2 - s.computed ** 2 for s, n in chunks)  # attention over the prompt
            fit = self.times.decode_fit(busy)
            duration = (self.times.prefill_s(tokens, busy, squares)
                        + self.times.scale * (fit.d_s_per_seq * len(decode) + fit.e_s_per_seq_token * context))
            w.chunk_s, w.chunk_steps, w.chunks = w.chunk_s + duration, w.chunk_steps + 1, w.chunks + len(chunks)
        else:
            duration = self.times.decode_s(len(decode), context, busy)
        w.stepping, w.plan = True, (decode, chunks)
        w.busy_s, w.steps, w.rows = w.busy_s + duration, w.steps + 1, w.rows + len(decode)
        heapq.heappush(self.events, (self.now + duration, 0, next(self.order), w.index))

    def _step_done(self, w: _Worker) -> None:
        decode, chunks = w.plan
        w.stepping, w.plan = False, ()
        done = []
        for s in decode:
            s.context += 1
            s.steps_left -= 1
            if s.steps_left == 0:
                done.append(s)
        for s, n in chunks:
            s.computed += n
            if s.computed == s.prompt:
                s.context = s.prompt + 1
                self.first_token[s.index] = self.now
                if s.steps_left == 0:
                    done.append(s)
        for s in done:
            self.finish[s.index] = self.now
            w.running.remove(s)
            w.reserved -= self.prompts[s.index] + self.outputs[s.index]
            w.held -= 1
        if done:
            self._dispatch()
        self._start_step(w)
