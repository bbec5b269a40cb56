"""The hybrid worker (`--mode hybrid`): a colocated worker that also takes KV sent by prefill workers.

The router picks a path per request (router/hybrid_rule.py): short or cached prompts go to this worker
with their prompt and are prefilled in chunks inside its decode steps (the colocated path, `submit`);
long ones are prefilled by a prefill worker that streams their KV into blocks reserved here (the PD
path, `reserve` then `admit`). Both kinds end up as rows of the same ChunkScheduler: an admitted
request arrives with its prompt computed and its first token, so it joins the running batch as a
decode row (`ChunkScheduler._admit_prefilled`), exactly as a PD decode worker would run it.

    PD path           reserve -> RESERVED (KV arriving) -> admit -> QUEUED -> WAITING -> RUNNING
    colocated path    submit  -> QUEUED -> WAITING -> PREFILLING -> RUNNING

Threads and locks are ColocatedWorker's; the inbox (which transfers are complete) is guarded by `_lock`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from decode_worker.chunk_scheduler import ColocatedSequence
from decode_worker.colocated import ColocatedWorker
from decode_worker.receiving_pool import ReceivingPool
from decode_worker.status import SeqStatus
from engine.config import SamplingParams
from engine.kv_cache import KVLayout, KVPool
from engine.kv_window import blocks_before_window
from kvtransfer.base import KVEndpoint
from proto.kinds import Transport
from proto.messages import Admission, Grant, Reservation


class HybridWorker(ColocatedWorker):
    def _open_pool(self, layout: KVLayout, fingerprint: str, node_ip: str) -> tuple[KVPool, KVEndpoint]:
        self.receiving = ReceivingPool.open(self.compute, self.config, layout, self.runner.config.device,
                                            fingerprint, self.node_id, node_ip)
        self._transferred: set[str] = set()  # admitted with their first token: they stream from the start
        return self.receiving.pool, self.receiving.endpoint

    # ---- the PD path: router-facing API (DecodeWorkerAPI's reserve and admit) ------------------
    def reserve(self, reservations: list[Reservation], arrived: Sequence[Admission] = ()) -> dict[str, Grant]:
        """Hold blocks for prompt + max_tokens of each request that fits, as a PD decode worker does (leading
        blocks this pool caches are shared and not sent; blocks before a sliding window are not held)."""
        granted: dict[str, Grant] = {}
        with self._lock:
            for a in arrived:
                if a.request_id in self.requests and self._kv_complete(a):
                    self.blocks.register(a.request_id, self.requests[a.request_id].prompt)
            for r in reservations:
                if r.request_id in self.requests:
                    continue  # a duplicate: the first copy holds its blocks
                total, max_shared = r.prompt_tokens + r.max_tokens, (r.prompt_tokens - 1) // self.blocks.block_size
                skip = blocks_before_window(r.prompt_tokens, self.pool.layout.kv_window, self.blocks.block_size)
                if not self.blocks.can_allocate(total, r.prompt_token_ids, max_shared, skip):
                    continue
                table = self.blocks.allocate(r.request_id, total, r.prompt_token_ids, max_shared, skip)
                grant = Grant(tuple(table), self.blocks.shared_blocks(r.request_id), skip)
                self.receiving.inbox.expect(r.request_id, table, r.prompt_tokens, first_block=grant.first_block)
                self.requests[r.request_id] = ColocatedSequence(
                    r.request_id, tuple(r.prompt_token_ids), SamplingParams(), table, status=SeqStatus.RESERVED)
                granted[r.request_id] = grant
        return granted

    def admit(self, admissions: list[Admission]) -> list[str]:
        """Start decoding requests whose KV is in place; return the ids refused (KV incomplete, not reserved)."""
        refused = []
        with self._lock:
            for a in admissions:
                seq = self.requests.get(a.request_id)
                if seq is None or seq.status != SeqStatus.RESERVED or not self._kv_complete(a):
                    refused.append(a.request_id)
                    continue
                self.receiving.inbox.forget(a.request_id)
                self.blocks.register(a.request_id, seq.prompt)  # the prompt's KV is whole: shareable now
                now = time.time()
                seq.params, seq.output, seq.token_times = a.params, [a.first_token], [a.first_token_time]
                seq.computed, seq.prefill_start, seq.prefill_end = len(seq.prompt), a.first_token_time, now
                seq.status = SeqStatus.QUEUED
                self._transferred.add(a.request_id)
                self._loop_queue.put(seq)
        return refused

    def _kv_complete(self, a: Admission) -> bool:
        return Transport(a.transport).writes_in_place or self.receiving.inbox.is_complete(a.request_id)

    # ---- what changes beside the colocated worker -----------------------------------------------
    def _streamable(self) -> list[ColocatedSequence]:
        """Chunked requests once a poll announced their first token; transferred ones at once (the router
        had their first token from the prefill worker)."""
        transferred = [s for s in list(self.scheduler.running) if s.request_id in self._transferred]
        return super()._streamable() + transferred

    def _free(self, request_id: str) -> None:
        super()._free(request_id)
        with self._lock:
            self.receiving.inbox.forget(request_id)
            self._transferred.discard(request_id)

    def shutdown(self) -> None:
        super().shutdown()
        self.pool = None  # type: ignore[assignment]  # drop the views before the segment is unmapped
        self.receiving.close()
