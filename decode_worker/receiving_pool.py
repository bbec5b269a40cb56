"""A KV pool that prefill workers can write into: the pool, its inbox and the transports that fill it.

What a decode-side worker needs to take transferred KV (PD decode workers and hybrid workers): the pool
in the form a same-node peer writes straight into (POSIX shared memory on a CPU, an exported CUDA IPC
handle on a GPU), a `KVInbox` that tracks which requests' KV is complete, a gRPC server for peers on
other nodes, and the `KVEndpoint` that tells a prefill worker all of this. Built on the compute thread
(the shared pool touches every page). `DecodeWorker` still builds the same parts inline; it can move
onto this class when its file is next touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.compute_thread import ComputeThread
from engine.kv_cache import KVLayout, KVPool
from kvtransfer.base import KVEndpoint
from kvtransfer.inbox import KVInbox
from proto.kinds import Transport
from proto.messages import WorkerConfig


@dataclass
class ReceivingPool:
    pool: KVPool
    inbox: KVInbox
    endpoint: KVEndpoint
    shared: Any = None  # kvtransfer.shm.SharedKVPool when the pool lives in /dev/shm
    server: Any = None  # kvtransfer.grpc_transport.KVServer when peers may send over gRPC

    @classmethod
    def open(cls, compute: ComputeThread, config: WorkerConfig, layout: KVLayout, device: str, fingerprint: str,
             node_id: str, node_ip: str) -> ReceivingPool:
        shared, cuda_handle = None, None
        transport = Transport(config.transport)
        if device == "cpu" and transport in (Transport.AUTO, Transport.SHM):
            from kvtransfer.shm import SharedKVPool

            shared = compute.call(SharedKVPool, layout)
            pool = shared.pool
        else:
            pool = compute.call(KVPool.allocate, layout, device)
            if pool.buffer.is_cuda and transport in (Transport.AUTO, Transport.CUDA_IPC):
                from kvtransfer.cuda_ipc import export_pool

                cuda_handle = export_pool(pool)
        inbox = KVInbox(pool)
        server = None
        if transport in (Transport.AUTO, Transport.GRPC):
            from kvtransfer.grpc_transport import KVServer

            server = KVServer(inbox, receiver_id=config.worker_id, model_fingerprint=fingerprint,
                              auth_token=config.auth_token, host=config.kv_host or node_ip, tls=config.tls)
        endpoint = KVEndpoint(worker_id=config.worker_id, node_id=node_id, layout=layout,
                              model_fingerprint=fingerprint, grpc_address=server.address if server else None,
                              grpc_tls=config.tls is not None, shm_name=shared.name if shared else None,
                              cuda_ipc=cuda_handle)
        return cls(pool, inbox, endpoint, shared, server)

    def close(self) -> None:
        """Stop the server and unlink the shared segment (the owner's job; the RAM goes with the last view)."""
        if self.server:
            self.server.stop()
        if self.shared:
            self.inbox.pool = None  # type: ignore[assignment]
            self.shared.close()
