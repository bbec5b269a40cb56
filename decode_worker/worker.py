"""The decode worker: owns a paged KV pool, receives KV into it, runs continuous batching.

Run as a threaded Ray actor: the model loads and the decode loop runs on one
ComputeThread; `reserve`, `admit`, `release` and `poll` are called by the
router concurrently, and the gRPC server's threads write arriving KV.
Where a request is: `requests` holds each one from reservation to finish, its `status` says where
(decode_worker/status.py).
Ownership:
  - BlockManager, KVInbox and `requests`: guarded by `_lock` (router calls and the loop).
  - ContinuousBatcher: the loop only; others talk to it through `_loop_queue` (step_loop.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence

from decode_worker.batcher import ContinuousBatcher, DecodeSequence
from decode_worker.ranks import POOL, exchange_pools, start_rank
from decode_worker.speculative import build_stepper, spec_summary
from decode_worker.status import SeqStatus
from decode_worker.step_loop import Abort, StepLoopWorker
from decode_worker.stopping import StopChecker
from engine.compute_thread import ComputeThread
from engine.config import SamplingParams
from engine.core_lease import LeaseRole, NodeCoreLease, lease_key
from engine.kv_cache import BlockManager, KVPool
from engine.kv_window import blocks_before_window
from engine.loader import load_tokenizer
from engine.parallel.follow import DriverRunner
from engine.runner import model_fingerprint
from engine.structured.grammars import Grammars
from kvtransfer.base import KVEndpoint
from kvtransfer.inbox import KVInbox
from proto.kinds import FinishReason, Transport
from proto.messages import Admission, DecodeResult, Grant, Reservation, WorkerConfig
from proto.stats import DecodeStats

log = logging.getLogger("pdserve.decode")


class DecodeWorker(StepLoopWorker):
    def __init__(self, config: WorkerConfig, node_id: str = "local", node_ip: str = "127.0.0.1") -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.node_id = node_id
        self.compute = ComputeThread(config.engine.num_threads, name=f"decode-{self.worker_id}")
        self.tp, self.runner = start_rank(self.compute, config, "decode")  # this rank's share (decode_worker/ranks.py)
        layout = self.runner.kv_layout()
        # The pool is exposed once, in the form a same-node peer can write into directly.
        self._shared = None
        cuda_handle = None
        device = self.runner.config.device
        if device == "cpu" and (config.transport in (Transport.AUTO, Transport.SHM) or self.tp.size > 1):
            from kvtransfer.shm import SharedKVPool

            self._shared = self.compute.call(SharedKVPool, layout)  # it touches every page: compute thread
            self.pool = self._shared.pool
        else:
            self.pool = self.compute.call(KVPool.allocate, layout, device)
            if self.pool.buffer.is_cuda and config.transport in (Transport.AUTO, Transport.CUDA_IPC):
                from kvtransfer.cuda_ipc import export_pool

                cuda_handle = export_pool(self.pool)
        # Tensor parallel: every rank's pool, by KV head, for the inbox and the endpoint; rank 0 drives the others.
        self.ranks = self.compute.call(exchange_pools, self.tp, self.runner,
                                       self._shared.name if self._shared else None, self.pool)
        if self.tp.size > 1:
            self.runner = DriverRunner(self.runner, self.tp, {POOL: self.pool})
        fingerprint = model_fingerprint(self.runner.folder)
        self.blocks = BlockManager(layout.num_blocks, layout.block_size, salt=fingerprint,
                                   enable_prefix_caching=config.engine.enable_prefix_caching)
        self.inbox = KVInbox(self.ranks.inbox_pool)
        self._lock = threading.Lock()
        # Every request holding blocks here, by id (decode_worker/status.py). Prompt ids travel on each:
        # its blocks get keys once the KV is complete, and the generated ones too when it finishes.
        self.requests: dict[str, DecodeSequence] = {}
        self._server = None
        if config.transport in (Transport.AUTO, Transport.GRPC):
            from kvtransfer.grpc_transport import KVServer

            self._server = KVServer(self.inbox, receiver_id=self.worker_id, model_fingerprint=fingerprint,
                                    auth_token=config.auth_token, host=config.kv_host or node_ip, tls=config.tls)
        self.endpoint_info = KVEndpoint(
            worker_id=self.worker_id, node_id=node_id, layout=self.ranks.layout, model_fingerprint=fingerprint,
            grpc_address=self._server.address if self._server else None, grpc_tls=config.tls is not None,
            shm_name=self._shared.name if self._shared else None, cuda_ipc=cuda_handle, shards=self.ranks.shards)
        tokenizer = load_tokenizer(self.runner.folder)
        stopper = StopChecker(self.runner.arch.eos_token_ids, tokenizer)
        self.grammars = Grammars(lambda: tokenizer, self.runner.arch.vocab_size, self.runner.arch.eos_token_ids)
        # On CUDA this captures the decode graphs (the start-up log says how long it took).
        self.batcher = self.compute.call(ContinuousBatcher, self.runner, self.pool, stopper,
                                         config.engine.max_num_seqs)
        self.batcher.enable_speculation(build_stepper(self.runner, self.pool, stopper))
        self._start_loop_state(self.batcher.phases)
        if config.share_node_cores:
            self.core_lease = NodeCoreLease(lease_key(config.auth_token, node_id), LeaseRole.DECODE)
        # Sum over steps of each row's position (the context the plan profile's decode step is timed at):
        # / step_rows = the mean context a step ran at, to compare a step's time with the profile's fit.
        self.step_context_tokens = 0
        self._start_loop()

    # ---- router-facing API -------------------------------------------------------------
    def endpoint(self) -> KVEndpoint:
        return self.endpoint_info

    def reserve(self, reservations: list[Reservation], arrived: Sequence[Admission] = ()) -> dict[str, Grant]:
        """Allocate blocks for prompt + max_tokens of each request; those that don't fit are left out.
        Leading prompt blocks this pool already caches are shared and not sent again (at least one
        prompt token always travels, so every request has a transfer that completes it).
        `arrived`: requests whose KV is complete but that are not admitted yet (the router may hold
        admissions): their prompt blocks become shareable now, before these reservations look."""
        granted: dict[str, Grant] = {}
        with self._lock:
            for a in arrived:
                if a.request_id in self.requests and self._kv_complete(a):
                    self.blocks.register(a.request_id, self.requests[a.request_id].prompt_token_ids)
            for r in reservations:
                total = r.prompt_tokens + r.max_tokens
                if self.blocks.holds(r.request_id):  # a retry of a reservation we already hold
                    self._release_locked(r.request_id)
                max_shared = (r.prompt_tokens - 1) // self.blocks.block_size
                # Prompt blocks before every layer's window at the first decode step: not held, not sent.
                skip = blocks_before_window(r.prompt_tokens, self.pool.layout.kv_window, self.blocks.block_size)
                if not self.blocks.can_allocate(total, r.prompt_token_ids, max_shared, skip):
                    continue
                table = self.blocks.allocate(r.request_id, total, r.prompt_token_ids, max_shared, skip)
                grant = Grant(tuple(table), self.blocks.shared_blocks(r.request_id), skip)
                self.inbox.expect(r.request_id, table, r.prompt_tokens, first_block=grant.first_block)
                self.requests[r.request_id] = DecodeSequence(r.request_id, r.prompt_tokens, SamplingParams(), table,
                                                             [], [], prompt_token_ids=r.prompt_token_ids)
                granted[r.request_id] = grant
        return granted

    def admit(self, admissions: list[Admission]) -> list[str]:
        """Start decoding requests whose KV is in place; return ids refused (KV incomplete or not reserved)."""
        refused = []
        with self._lock:
            for a in admissions:
                seq = self.requests.get(a.request_id)
                if seq is None or seq.status != SeqStatus.RESERVED or not self._kv_complete(a):
                    refused.append(a.request_id)
                    continue
                self.inbox.forget(a.request_id)
                # The prompt's KV is whole now: its full blocks may be shared from here on.
                self.blocks.register(a.request_id, seq.prompt_token_ids)
                seq.params, seq.output, seq.token_times = a.params, [a.first_token], [a.first_token_time]
                seq.admitted_at, seq.status = time.time(), SeqStatus.QUEUED
                self._loop_queue.put(seq)
        return refused

    def release(self, request_ids: list[str]) -> int:
        """Abort requests (transfer failed, router gave up): stop them and free their blocks."""
        freed = 0
        with self._lock:
            for rid in request_ids:
                seq = self.requests.get(rid)
                if seq is not None and seq.status.in_loop:
                    self._loop_queue.put(Abort(rid))  # the loop takes it out of the batch, then frees
                else:
                    freed += self._release_locked(rid)
        return freed

    def release_all(self) -> int:
        """Abort every request held here: a restarted router (deployment) knows none of them."""
        with self._lock:
            held = self.blocks.requests()
        return self.release(held)

    def stats(self) -> DecodeStats:
        with self._lock:
            return DecodeStats(self.worker_id, self._pool_stats(), running=len(self.batcher.running),
                               waiting=len(self.batcher.waiting), loop=self.loop_stats(),
                               step_context_tokens=self.step_context_tokens)

    def shutdown(self) -> None:
        self._stop_loop()
        if self.tp.size > 1:
            self.compute.call(self.runner.stop)  # the followers' loops return
            self.ranks.close()
        if isinstance(self.core_lease, NodeCoreLease):
            self.core_lease.close()
        if self._server:
            self._server.stop()
        if self._shared:
            self.pool = None  # type: ignore[assignment]
            self.batcher.pool = None  # type: ignore[assignment]
            self.inbox.pool = None  # type: ignore[assignment]
            self._shared.close()

    # ---- decode loop -------------------------------------------------------------------
    def _kv_complete(self, a: Admission) -> bool:
        # Same-node transports wrote straight into the pool before the prefill call returned.
        return Transport(a.transport).writes_in_place or self.inbox.is_complete(a.request_id)

    def _release_locked(self, request_id: str) -> int:
        self.requests.pop(request_id, None)
        self.inbox.forget(request_id)
        return self.blocks.free(request_id)

    def _has_work(self) -> bool:
        return self.batcher.has_work()

    def _step(self) -> None:
        rows = min(len(self.batcher.running) + len(self.batcher.waiting), self.batcher.max_num_seqs)
        context = sum(s.next_position for s in itertools.islice(
            itertools.chain(self.batcher.running, self.batcher.waiting), rows))
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            finished = self.batcher.step()
        except Exception as e:  # a bug in a step must not strand requests: report them failed
            log.exception("decode step failed")
            for seq in self.batcher.abort_all():
                self._finish(seq, error=f"decode step failed: {e!r}")
            return
        self._count_step(started, started_cpu, rows)
        self.step_context_tokens += context
        self._release_behind_window(self.batcher.running)
        self.phases.start()
        for seq in finished:
            self._finish(seq)
        self.phases.lap("finish")
        self.phases.stop()

    def _accept(self, seq: DecodeSequence) -> None:
        try:  # the grammar's state: the constraint replayed over the prefill worker's first token
            seq.grammar = self.grammars.for_request(seq.params, seq.output)
        except ValueError as e:  # checked when the request arrived: only a bug lands here
            self._finish(seq, error=f"structured output: {e}")
            return
        done = self.batcher.add(seq)
        if done is not None:
            self._finish(done)

    def _abort_in_loop(self, request_id: str) -> None:
        self.batcher.remove(request_id)
        with self._lock:
            self._release_locked(request_id)

    def _streamable(self) -> list[DecodeSequence]:
        return list(self.batcher.running)

    def _progress_key(self) -> int:
        """Steps counted: only a step appends tokens or admits rows, and `_count_step` follows it."""
        return self.steps

    def _finish(self, seq: DecodeSequence, error: str | None = None) -> None:
        with self._lock:
            if error is None and self.blocks.holds(seq.request_id):
                # Every token but the newest has its KV in the pool: key those blocks too.
                self.blocks.register(seq.request_id, seq.prompt_token_ids + tuple(seq.output[:-1]))
            self._release_locked(seq.request_id)
        self._results.put(DecodeResult(
            request_id=seq.request_id, token_ids=tuple(seq.output),
            finish_reason=seq.finish_reason or FinishReason.ERROR,
            admitted_at=seq.admitted_at, finished_at=time.time(), token_times=tuple(seq.token_times), error=error,
            speculative=spec_summary(seq)))
