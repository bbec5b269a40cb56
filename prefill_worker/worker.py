"""The prefill worker: packed prefill of a batch, first token, KV streamed out layer by layer.

Each layer's K/V goes to the request's decode worker as soon as the layer is
computed (the attention context's KV sink), so the transfer of layer i
overlaps the compute of layer i+1. A transfer that fails costs only its own
request: the result carries the error and the router retries it elsewhere.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.compute_thread import ComputeThread
from engine.runner import ModelRunner, model_fingerprint
from engine.sampler import sample
from kvtransfer.base import KVConnection, KVEndpoint, TransferError, TransferHandle, connect, select_transport
from proto.messages import PrefillResult, PrefillTask, WorkerConfig

log = logging.getLogger("pdserve.prefill")


class PrefillWorker:
    def __init__(self, config: WorkerConfig, node_id: str = "local") -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.node_id = node_id
        self.compute = ComputeThread(config.engine.num_threads, name=f"prefill-{self.worker_id}")
        self.runner = self.compute.call(ModelRunner, config.engine)
        self.layout = self.runner.kv_layout(num_blocks=1)  # the shape of what we send; we hold no pool
        self.fingerprint = model_fingerprint(self.runner.folder)
        self._connections: dict[str, tuple[KVEndpoint, KVConnection]] = {}  # by decode worker id
        self._faults_left = config.inject_transfer_failures

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
        errors: dict[str, str] = {}
        handles: list[tuple[KVConnection, TransferHandle] | None] = []
        for t in tasks:
            try:
                conn = self.connection(t.decode)
                handles.append((conn, conn.begin(t.request_id, list(t.block_table), len(t.prompt_token_ids))))
            except (TransferError, ValueError, OSError) as e:
                errors[t.request_id] = f"{type(e).__name__}: KV connection to {t.decode.worker_id} failed: {e}"
                handles.append(None)
        bounds, start = [], 0
        for t in tasks:
            bounds.append((start, start + len(t.prompt_token_ids)))
            start += len(t.prompt_token_ids)

        def ship(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for t, h, (s, e) in zip(tasks, handles, bounds):
                if h is None or t.request_id in errors:
                    continue
                try:
                    h[0].write_layer(h[1], layer, k[s:e], v[s:e])
                except TransferError as err:
                    errors[t.request_id] = f"{type(err).__name__}: KV transfer to {t.decode.worker_id} failed: {err}"

        prefill_start = time.time()
        logits = self.runner.prefill([list(t.prompt_token_ids) for t in tasks], ship)
        first = sample(logits, [t.params for t in tasks], [0] * len(tasks)).tolist()
        prefill_end = time.time()
        results = []
        for t, h, token in zip(tasks, handles, first):
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
            results.append(PrefillResult(
                request_id=t.request_id, first_token=token, prefill_start=prefill_start, prefill_end=prefill_end,
                transfer_start=h[1].started if h else prefill_start,
                transfer_end=stats.end if stats else time.time(),
                transport=h[0].transport if h else "none", kv_bytes=stats.bytes if stats else 0,
                transfer_busy_s=stats.busy_s if stats else 0.0,
                error=errors.get(t.request_id)))
        return results

    def shutdown(self) -> None:
        for _, conn in self._connections.values():
            conn.close()
        self._connections.clear()
        self.compute.shutdown()
