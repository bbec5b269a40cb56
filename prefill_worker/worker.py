"""The prefill worker: packed prefill of a batch, first token, KV streamed out layer by layer.

With prefix caching, prompts are computed from the end of their longest prefix
cached in the worker's own pool (prefix_cache.py); a batch with no hit runs the plain packed
prefill. Each layer's K/V goes to the request's decode worker (only the blocks it does not
already hold) as soon as the layer is computed (the attention context's KV sink), so the transfer of layer i
overlaps the compute of layer i+1. A transfer that fails costs only its own
request: the result carries the error and the router retries it elsewhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from decode_worker.ranks import exchange_pools, start_rank
from engine.attention import KVSink
from engine.compute_thread import ComputeThread
from engine.core_lease import CoreLease, LeaseRole, NodeCoreLease, NoLease, lease_key
from engine.kv_cache import as_stored
from engine.loader import load_tokenizer
from engine.parallel.follow import DriverRunner
from engine.runner import model_fingerprint
from engine.sampler import sample
from engine.structured.bitmask import MaskFiller
from engine.structured.grammars import Grammars
from kvtransfer.base import KVConnection, KVEndpoint, TransferError, TransferHandle, connect, select_transport
from kvtransfer.reshard import whole_layout
from prefill_worker.prefix_cache import PrefillCache
from proto.kinds import Transport
from proto.messages import PrefillResult, PrefillTask, WorkerConfig
from proto.stats import PrefillStats

log = logging.getLogger("pdserve.prefill")

_Handle = tuple[KVConnection, TransferHandle]


class PrefillWorker:
    def __init__(self, config: WorkerConfig, node_id: str = "local") -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.node_id = node_id
        self.compute = ComputeThread(config.engine.num_threads, name=f"prefill-{self.worker_id}")
        # Tensor parallel (decode_worker/ranks.py): rank 0 drives the others, each layer's KV heads are gathered
        # here, and what we send has every head.
        self.tp, self.runner = start_rank(self.compute, config, "prefill")
        self.compute.call(exchange_pools, self.tp, self.runner, None)
        self.layout = whole_layout(self.runner.kv_layout(num_blocks=1), self.runner.shard.arch.num_kv_heads)
        self.fingerprint = model_fingerprint(self.runner.folder)
        engine = config.engine
        # The prefix cache's rows are sent beside gathered ones, so it would need every head: off under TP for now.
        self.cache = (self.compute.call(PrefillCache, self.runner, engine.prefill_cache_gib, self.fingerprint)
                      if engine.enable_prefix_caching and self.tp.size == 1 else None)
        arch = self.runner.arch
        self.grammars = Grammars(lambda: load_tokenizer(self.runner.folder), arch.vocab_size, arch.eos_token_ids)
        self.masks = MaskFiller(arch.vocab_size)
        if self.tp.size > 1:
            self.runner = DriverRunner(self.runner, self.tp)
        self._connections: dict[str, tuple[KVEndpoint, KVConnection]] = {}  # by decode worker id
        self._faults_left = config.inject_transfer_failures
        self.lease: CoreLease = (NodeCoreLease(lease_key(config.auth_token, node_id), LeaseRole.PREFILL)
                                 if config.share_node_cores else NoLease())
        self._counts = {"batches": 0, "prompt_tokens": 0, "computed_tokens": 0}
        self._seconds = {"forward": 0.0, "call": 0.0}

    def connection(self, endpoint: KVEndpoint) -> KVConnection:
        """A cached connection to `endpoint`; a restarted decode worker (new endpoint) gets a new one."""
        cached = self._connections.get(endpoint.worker_id)
        if cached is not None and cached[0] == endpoint:
            return cached[1]
        if cached is not None:
            cached[1].close()
            del self._connections[endpoint.worker_id]
        transport = select_transport(self.config.transport, self.node_id, endpoint)
        conn = connect(endpoint, transport, sender_id=self.worker_id, auth_token=self.config.auth_token,
                       sender_layout=self.layout, model_fingerprint=self.fingerprint,
                       timeout=self.config.transfer_timeout_s, tls=self.config.tls)
        self._connections[endpoint.worker_id] = (endpoint, conn)
        return conn

    def prefill(self, tasks: list[PrefillTask]) -> list[PrefillResult]:
        """Called on any Ray thread; the work runs on the compute thread."""
        return self.compute.call(self._prefill, tasks)

    def _prefill(self, tasks: list[PrefillTask]) -> list[PrefillResult]:
        called = time.perf_counter()
        errors: dict[str, str] = {}
        handles = self._begin_transfers(tasks, errors)
        ids = [t.request_id for t in tasks]
        prompts = [list(t.prompt_token_ids) for t in tasks]
        cached = self.cache.allocate(ids, prompts) if self.cache else None
        computed_from = cached or [0] * len(tasks)  # per prompt: tokens before it come from the cache
        tables = self.cache.tables(ids) if cached is not None else []
        ship = self._shipper(tasks, handles, errors, computed_from, tables)
        prefill_start = time.time()
        try:
            with self.lease.hold():
                started = time.perf_counter()
                logits = self._forward(prompts, cached, tables, ship)
                self._seconds["forward"] += time.perf_counter() - started
        except BaseException:
            if cached is not None:
                self.cache.release(ids)  # the pool's copy is incomplete: nothing gets a key
            raise
        if cached is not None:
            self.cache.commit(ids, prompts)
        self._mask_first_tokens(tasks, logits, errors)
        first = sample(logits, [t.params for t in tasks], [0] * len(tasks)).tolist()
        prefill_end = time.time()
        results = [self._finish(t, h, token, errors, prefill_start, prefill_end, c)
                   for t, h, token, c in zip(tasks, handles, first, computed_from)]
        events = self.cache.blocks.take_events() if self.cache else None
        if results and events:
            results[0] = replace(results[0], kv_events=events)
        self._count(prompts, computed_from, time.perf_counter() - called)
        return results

    def _mask_first_tokens(self, tasks: list[PrefillTask], logits: torch.Tensor, errors: dict[str, str]) -> None:
        """A constrained request's first token is sampled under its grammar's first mask."""
        grammars = []
        for t in tasks:
            try:
                grammars.append(self.grammars.for_request(t.params))
            except ValueError as e:  # checked when the request arrived: only a bug lands here
                errors[t.request_id] = f"structured output: {e}"
                grammars.append(None)
        masks = self.masks.begin(grammars)
        if masks is not None:
            masks.apply(logits)

    def _count(self, prompts: list[list[int]], cached: list[int], seconds: float) -> None:
        self._counts["batches"] += 1
        self._counts["prompt_tokens"] += sum(len(p) for p in prompts)
        self._counts["computed_tokens"] += sum(len(p) - c for p, c in zip(prompts, cached))
        self._seconds["call"] += seconds

    def stats(self) -> PrefillStats:
        return PrefillStats(self.worker_id, **self._counts, forward_seconds=self._seconds["forward"],
                            call_seconds=self._seconds["call"], lease_wait_seconds=self.lease.waited_s)

    def _forward(self, prompts: list[list[int]], cached: list[int] | None, tables: list[list[int]],
                 ship: KVSink) -> torch.Tensor:
        """Last-token logits of `prompts`, every layer's K/V through `ship` (and the cache's pool)."""
        if cached is None:
            return self.runner.prefill(prompts, ship)
        if not any(cached):  # a miss costs what caching off costs: the plain packed prefill
            store = self.cache.full_block_writer(prompts, tables)
            return self.runner.prefill(prompts, lambda layer, k, v: (store(layer, k, v), ship(layer, k, v)))
        chunks = [p[c:] for p, c in zip(prompts, cached)]
        return self.runner.extend(self.cache.pool, chunks, cached, tables, kv_sink=ship)

    def _begin_transfers(self, tasks: list[PrefillTask], errors: dict[str, str]) -> list[_Handle | None]:
        handles: list[_Handle | None] = []
        for t in tasks:
            try:
                conn = self.connection(t.decode)
                handles.append((conn, conn.begin(t.request_id, list(t.block_table), len(t.prompt_token_ids),
                                                 first_block=t.cached_blocks)))
            except (TransferError, ValueError, OSError) as e:
                errors[t.request_id] = f"{type(e).__name__}: KV connection to {t.decode.worker_id} failed: {e}"
                handles.append(None)
        return handles

    def _shipper(self, tasks: list[PrefillTask], handles: list[_Handle | None], errors: dict[str, str],
                 computed_from: list[int], tables: list[list[int]]) -> KVSink:
        """The KV sink: per layer, each request's tokens from its first uncached decode block on.
        Packed k, v hold only the computed tokens; cached ones the decode worker lacks come from our pool.
        What is sent is what the decode pool stores: for --kv-cache-dtype int8 the rows quantized once
        per layer (bit-identical to what a local store would write) and the cached ones as our pool holds them."""
        bs = self.layout.block_size
        bounds, start = [], 0
        for t, c in zip(tasks, computed_from):
            bounds.append((start, start + len(t.prompt_token_ids) - c))
            start = bounds[-1][1]

        def ship(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            packed = as_stored(self.layout, k, v)  # (k, v, k_scale, v_scale); scales None for a float pool
            for i, (t, h, (s, e), c) in enumerate(zip(tasks, handles, bounds, computed_from)):
                if h is None or t.request_id in errors:
                    continue
                send = h[1].first_block * bs
                if send >= c:
                    rows = [None if x is None else x[s + send - c:e] for x in packed]
                else:
                    cached = self.cache.cached_rows(layer, tables[i], send, c)
                    rows = [None if x is None else torch.cat([y, x[s:e]]) for x, y in zip(packed, cached)]
                try:
                    h[0].write_layer(h[1], layer, *rows)
                except TransferError as err:
                    errors[t.request_id] = f"{type(err).__name__}: KV transfer to {t.decode.worker_id} failed: {err}"

        return ship

    def _finish(self, t: PrefillTask, h: _Handle | None, token: int, errors: dict[str, str],
                prefill_start: float, prefill_end: float, cached_tokens: int) -> PrefillResult:
        stats = None
        if h is not None and t.request_id not in errors and self._faults_left > 0:
            self._faults_left -= 1
            h[0].abort(h[1])
            errors[t.request_id] = f"TransferError: injected fault (drill) on the way to {t.decode.worker_id}"
        elif h is not None and t.request_id not in errors:
            try:
                stats = h[0].finish(h[1], timeout=self.config.transfer_timeout_s)
            except TransferError as err:
                errors[t.request_id] = f"{type(err).__name__}: KV transfer to {t.decode.worker_id} failed: {err}"
        elif h is not None:
            h[0].abort(h[1])
        return PrefillResult(
            request_id=t.request_id, first_token=token, prefill_start=prefill_start, prefill_end=prefill_end,
            transfer_start=h[1].started if h else prefill_start,
            transfer_end=stats.end if stats else time.time(),
            transport=h[0].transport if h else Transport.NONE, kv_bytes=stats.bytes if stats else 0,
            transfer_busy_s=stats.busy_s if stats else 0.0,
            error=errors.get(t.request_id), cached_tokens=cached_tokens)

    def barrier(self) -> None:
        """Returns once the prefill calls queued before it have run (their KV writes are over): a
        restarted deployment router frees the blocks they wrote into only after this."""
        self.compute.call(lambda: None)

    def shutdown(self) -> None:
        for _, conn in self._connections.values():
            conn.close()
        self._connections.clear()
        if self.tp.size > 1:
            self.compute.call(self.runner.stop)  # the followers' loops return
        self.compute.shutdown()
        if isinstance(self.lease, NodeCoreLease):
            self.lease.close()
