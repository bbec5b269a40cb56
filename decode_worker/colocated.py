"""The colocated worker (`--mode colocated`): one paged KV pool, prefill and decode in the same steps.

The non-disaggregated baseline, engine for engine: the router hands a request with its prompt
straight to a worker whose pool fits prompt + max_tokens (no prefill dispatch, no KV transfer);
the worker prefills it in chunks mixed into its decode steps (chunk_scheduler.py, engine/mixed.py)
and reports the same things a PD pair does: its first token and prefill stamps (`DecodePoll.prefilled`),
streamed tokens, and the whole output at the end (`DecodeResult`).

Threads as in DecodeWorker (the loop, polls and streaming are step_loop.py's): the model and the
step loop run on one ComputeThread; `submit`, `release` and `poll` come from the router on Ray
threads. `_lock` guards the BlockManager and `requests` (every request held here, by id; its
`status` says where it is: decode_worker/status.py); the scheduler belongs to the loop, others reach
it through `_loop_queue`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

from decode_worker.chunk_scheduler import ChunkScheduler, ColocatedSequence, StepPlan
from decode_worker.ranks import POOL, exchange_pools, start_rank
from decode_worker.status import SeqStatus
from decode_worker.step_loop import Abort, StepLoopWorker
from decode_worker.stopping import StopChecker
from engine.compute_thread import ComputeThread
from engine.config import default_batched_tokens
from engine.kv_cache import BlockManager, KVLayout, KVPool
from engine.loader import load_tokenizer
from engine.parallel.follow import DriverRunner
from engine.runner import model_fingerprint
from engine.sampler import sample
from engine.structured.bitmask import MaskFiller
from engine.structured.grammars import Grammars
from kvtransfer.base import KVEndpoint
from proto.kinds import FinishReason, Transport
from proto.messages import ColocatedTask, DecodeResult, PrefillResult, WorkerConfig
from proto.stats import ColocatedStats

log = logging.getLogger("pdserve.colocated")


class ColocatedWorker(StepLoopWorker):
    _slice_polls = True  # a prompt that finished prefilling also ends a poll's wait

    def __init__(self, config: WorkerConfig, node_id: str = "local", node_ip: str = "127.0.0.1") -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.node_id = node_id
        self.compute = ComputeThread(config.engine.num_threads, name=f"colocated-{self.worker_id}")
        self.tp, self.runner = start_rank(self.compute, config, "colocated")  # decode_worker/ranks.py
        layout = self.runner.kv_layout()
        fingerprint = model_fingerprint(self.runner.folder)
        self.pool, self.endpoint_info = self._open_pool(layout, fingerprint, node_ip)
        self.compute.call(exchange_pools, self.tp, self.runner, None)
        if self.tp.size > 1:  # rank 0 drives the others, each over its own pool of its KV heads
            self.runner = DriverRunner(self.runner, self.tp, {POOL: self.pool})
        self._compiled = self.compute.call(lambda: self.runner.compiled_step)  # steps of decode rows only (CPU)
        self.blocks = BlockManager(layout.num_blocks, layout.block_size, salt=fingerprint,
                                   enable_prefix_caching=config.engine.enable_prefix_caching)
        budget = config.max_num_batched_tokens or default_batched_tokens(self.runner.config.device,
                                                                         config.engine.max_num_seqs)
        tokenizer = load_tokenizer(self.runner.folder)
        stopper = StopChecker(self.runner.arch.eos_token_ids, tokenizer)
        self.grammars = Grammars(lambda: tokenizer, self.runner.arch.vocab_size, self.runner.arch.eos_token_ids)
        self.masks = MaskFiller(self.runner.arch.vocab_size, overlap=True)
        self.scheduler = ChunkScheduler(stopper, config.engine.max_num_seqs, budget)
        self._lock = threading.Lock()
        self.requests: dict[str, ColocatedSequence] = {}  # every request held here (decode_worker/status.py)
        self._prefilled: queue.Queue[PrefillResult] = queue.Queue()
        self.prefill_tokens = self.decode_tokens = 0  # tokens computed per kind, over all steps
        self._announced: set[str] = set()  # requests whose first token a poll has returned (in `prefilled`)
        self._start_loop_state()
        self._start_loop()

    def _open_pool(self, layout: KVLayout, fingerprint: str, node_ip: str) -> tuple[KVPool, KVEndpoint]:
        """No transport: nothing is sent to this pool. The endpoint only tells the router its size.
        (A hybrid worker, decode_worker/hybrid.py, opens one that prefill workers write into.)"""
        pool = self.compute.call(KVPool.allocate, layout, self.runner.config.device)
        return pool, KVEndpoint(worker_id=self.worker_id, node_id=self.node_id, layout=layout,
                                model_fingerprint=fingerprint)

    # ---- router-facing API -------------------------------------------------------------
    def endpoint(self) -> KVEndpoint:
        return self.endpoint_info

    def submit(self, tasks: list[ColocatedTask]) -> list[str]:
        """Reserve blocks for prompt + max_tokens of each task and queue it; return the ids refused (no room:
        the router's mirror was wrong, or a restart emptied the pool). Leading prompt blocks the pool
        already caches are shared, and prefill starts after them (at least one prompt token is computed)."""
        refused = []
        with self._lock:
            for t in tasks:
                if t.request_id in self.requests:
                    refused.append(t.request_id)  # a duplicate: the first copy is running
                    continue
                prompt_len = len(t.prompt_token_ids)
                total, max_shared = prompt_len + t.params.max_tokens, (prompt_len - 1) // self.blocks.block_size
                if not self.blocks.can_allocate(total, t.prompt_token_ids, max_shared):
                    refused.append(t.request_id)
                    continue
                table = self.blocks.allocate(t.request_id, total, t.prompt_token_ids, max_shared)
                cached = self.blocks.shared_blocks(t.request_id) * self.blocks.block_size
                seq = ColocatedSequence(t.request_id, tuple(t.prompt_token_ids), t.params, table,
                                        computed=cached, cached_tokens=cached, status=SeqStatus.QUEUED)
                self.requests[t.request_id] = seq
                self._loop_queue.put(seq)
        return refused

    def release(self, request_ids: list[str]) -> int:
        """Abort requests: the loop takes them out between steps and frees their blocks."""
        with self._lock:
            mine = [rid for rid in request_ids if rid in self.requests]
        for rid in mine:
            self._loop_queue.put(Abort(rid))
        return len(mine)

    def release_all(self) -> int:
        with self._lock:
            held = list(self.requests)
        return self.release(held)

    def _poll_ready(self) -> bool:
        return not self._prefilled.empty()

    def _take_prefilled(self) -> tuple[PrefillResult, ...]:
        prefilled = []
        with contextlib.suppress(queue.Empty):
            while True:
                prefilled.append(self._prefilled.get_nowait())
        self._announced.update(p.request_id for p in prefilled)
        return tuple(prefilled)

    def _streamable(self) -> list[ColocatedSequence]:
        """Running sequences whose first token a poll has returned (in `prefilled`): the tokens after it
        stream; one whose first token is still on its way is left for later (the router would drop the rest)."""
        running = [s for s in list(self.scheduler.running) if s.request_id in self._announced]
        self._announced.intersection_update(s.request_id for s in running)
        return running

    def stats(self) -> ColocatedStats:
        with self._lock:
            return ColocatedStats(self.worker_id, self._pool_stats(), running=len(self.scheduler.running),
                                  waiting=len(self.scheduler.waiting), loop=self.loop_stats(),
                                  prefill_tokens=self.prefill_tokens, decode_tokens=self.decode_tokens,
                                  max_num_batched_tokens=self.scheduler.max_num_batched_tokens)

    def shutdown(self) -> None:
        self._stop_loop()
        if self.tp.size > 1:
            self.compute.call(self.runner.stop)  # the followers' loops return

    # ---- the step loop -------------------------------------------------------------------
    def _has_work(self) -> bool:
        return self.scheduler.has_work()

    def _step(self) -> None:
        self.phases.start()  # laps: schedule, forward, sample, postprocess, finish (decode_worker/phases.py)
        plan = self.scheduler.schedule()
        self.phases.lap("schedule")
        if plan is None:
            self.phases.stop()
            return
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            sampled = self._run(plan)
        except Exception as e:  # a bug in a step must not strand requests: report them failed
            log.exception("colocated step failed")
            for seq in self.scheduler.abort_all():
                self._finish(seq, error=f"colocated step failed: {e!r}")
            self.phases.stop()
            return
        prefilled, finished = self.scheduler.postprocess(plan, sampled)
        self.phases.lap("postprocess")
        self._count_step(started, started_cpu, len(plan.rows))
        self.decode_tokens += plan.num_decode
        self.prefill_tokens += plan.num_tokens - plan.num_decode
        for seq in prefilled:
            self._prefill_done(seq)  # keys the prompt's blocks first: those freed next stay cached (evictable)
        self._release_behind_window([s for s in self.scheduler.running if s.prefilled])
        for seq in finished:
            self._finish(seq)
        self.phases.lap("finish")
        self.phases.stop()

    def _run(self, plan: StepPlan) -> list[int]:
        """The plan as one forward (decode rows + prompt chunks), then the keyed sampler on the rows that
        end in a new token: step len(output), so a first token is step 0 as on a PD prefill worker."""
        rows = plan.rows
        picks = plan.sampling_rows
        chosen = [rows[i].seq for i in picks]
        masks = self.masks.begin([s.grammar for s in chosen])  # filled while the forward runs
        if self._compiled is not None and plan.num_decode == len(rows):  # no prompt chunk: every row samples
            logits = self._compiled.run_rows(self.pool, [r.tokens[0] for r in rows], [r.start for r in rows],
                                             [r.seq.block_table for r in rows])
        else:
            logits = self.runner.mixed(self.pool, [list(r.tokens) for r in rows], [r.start for r in rows],
                                       [r.seq.block_table for r in rows], plan.num_decode, picks)
        self.phases.lap("forward")
        if not picks:
            return []
        if masks is not None:
            masks.apply(logits)
        ids = sample(logits, [s.params for s in chosen], [len(s.output) for s in chosen]).tolist()
        self.phases.lap("sample")  # the keyed sampler and the host sync reading its ids
        return ids

    def _accept(self, seq: ColocatedSequence) -> None:
        try:
            seq.grammar = self.grammars.for_request(seq.params)
        except ValueError as e:  # checked when the request arrived: only a bug lands here
            self._finish(seq, error=f"structured output: {e}")
            return
        self.scheduler.add(seq)

    def _abort_in_loop(self, request_id: str) -> None:
        self.scheduler.remove(request_id)
        self._free(request_id)

    def _prefill_done(self, seq: ColocatedSequence) -> None:
        with self._lock:
            self.blocks.register(seq.request_id, seq.prompt)  # the prompt's KV is whole: shareable now
        end = seq.prefill_end or time.time()
        self._prefilled.put(PrefillResult(
            request_id=seq.request_id, first_token=seq.output[0], prefill_start=seq.prefill_start or end,
            prefill_end=end, transfer_start=end, transfer_end=end, transport=Transport.NONE, kv_bytes=0,
            cached_tokens=seq.cached_tokens))

    def _free(self, request_id: str) -> None:
        with self._lock:
            self.requests.pop(request_id, None)
            if self.blocks.holds(request_id):
                self.blocks.free(request_id)

    def _finish(self, seq: ColocatedSequence, error: str | None = None) -> None:
        if error is None:
            with self._lock:  # every token but the newest has its KV in the pool: key those blocks too
                self.blocks.register(seq.request_id, seq.prompt + tuple(seq.output[:-1]))
        self._free(seq.request_id)
        self._results.put(DecodeResult(
            request_id=seq.request_id, token_ids=tuple(seq.output),
            finish_reason=seq.finish_reason or FinishReason.ERROR, admitted_at=seq.prefill_end or time.time(),
            finished_at=time.time(), token_times=tuple(seq.token_times), error=error))
