"""`pdserve bench kvtransfer`: KV caches of the default model's shape through each transport.

The receiver (a decode-side pool in shared memory, its inbox and gRPC server)
runs in its own process, as a decode worker does; the sender streams every
layer of one request's cache as a prefill worker does, and the time runs from
the first byte to the receiver's acknowledgement. Next to each figure: a plain
in-memory copy of the same bytes in this process, measured in the same run.
The receiver checks every delivery bit for bit.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from dataclasses import dataclass

import torch

from engine.kv_cache import BlockManager, KVLayout

TOKEN = "bench-token"
FINGERPRINT = "bench"


@dataclass(frozen=True)
class KVBench:
    tokens: tuple[int, ...] = (1024, 8192, 32768)
    transports: tuple[str, ...] = ("shm", "grpc")
    dtype: str = "bfloat16"
    num_layers: int = 30  # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
    num_kv_heads: int = 3
    head_dim: int = 64
    block_size: int = 16
    repeats: int = 3
    chunk_kib: int = 0  # gRPC chunk size; 0: the transport's default (kvtransfer/wire.py)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _receiver(layout: KVLayout, conn, fingerprint: str = FINGERPRINT) -> None:
    """Decode side, in its own process: pool in shm, inbox, gRPC server; answers commands on `conn`."""
    from kvtransfer.base import KVEndpoint
    from kvtransfer.grpc_transport import KVServer
    from kvtransfer.inbox import KVInbox
    from kvtransfer.shm import SharedKVPool

    torch.set_num_threads(1)
    shared = SharedKVPool(layout)
    inbox = KVInbox(shared.pool)
    blocks = BlockManager(layout.num_blocks, layout.block_size)
    server = KVServer(inbox, receiver_id="bench-decode", model_fingerprint=fingerprint, auth_token=TOKEN)
    conn.send(KVEndpoint("bench-decode", "bench-node", layout, fingerprint, grpc_address=server.address,
                         shm_name=shared.name))
    while True:
        cmd, *args = conn.recv()
        if cmd == "reserve":
            rid, tokens = args
            table = blocks.allocate(rid, tokens)
            inbox.expect(rid, table, tokens)
            conn.send(table)
        elif cmd == "digest":  # gather the request's tokens back through its table
            rid, tokens, transport = args
            table = blocks.table(rid)
            ok = transport == "shm" or inbox.is_complete(rid)
            bs = layout.block_size
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(tokens)])
            data = shared.pool.tensor.flatten(2, 3).index_select(2, slots)
            conn.send((ok, _digest(data)))
            inbox.forget(rid)
            blocks.free(rid)
        elif cmd == "stop":
            server.stop()
            shared.pool = inbox.pool = None  # type: ignore[assignment]
            shared.close()
            conn.send("stopped")
            return


class ReceiverProcess:
    """A decode-side KV endpoint in its own process (benchmarks and tests)."""

    def __init__(self, layout: KVLayout, fingerprint: str = FINGERPRINT) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=_receiver, args=(layout, child, fingerprint), daemon=True)
        self.process.start()
        self.endpoint = self.pipe.recv()

    def reserve(self, request_id: str, tokens: int) -> list[int]:
        self.pipe.send(("reserve", request_id, tokens))
        return self.pipe.recv()

    def digest(self, request_id: str, tokens: int, transport: str) -> tuple[bool, str]:
        self.pipe.send(("digest", request_id, tokens, transport))
        return self.pipe.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            self.pipe.send(("stop",))
            self.pipe.recv()
        self.process.join(timeout=30)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=30)


def _memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _connect(endpoint, transport: str, layout: KVLayout, chunk_kib: int):
    from kvtransfer.base import connect

    kwargs = dict(sender_id="bench-prefill", auth_token=TOKEN, sender_layout=layout, model_fingerprint=FINGERPRINT)
    if transport == "grpc" and chunk_kib:
        from kvtransfer.grpc_transport import GrpcConnection

        return GrpcConnection(endpoint, **kwargs, timeout=30.0, max_chunk_bytes=chunk_kib << 10)
    return connect(endpoint, transport, **kwargs)


def run(bench: KVBench, print_fn=print) -> dict:
    torch.set_num_threads(1)
    biggest = max(bench.tokens)
    probe = KVLayout(bench.num_layers, 1, bench.block_size, bench.num_kv_heads, bench.head_dim, bench.dtype)
    layout = KVLayout(bench.num_layers, probe.blocks_for(biggest) + 8, bench.block_size, bench.num_kv_heads,
                      bench.head_dim, bench.dtype)
    receiver = ReceiverProcess(layout)
    endpoint = receiver.endpoint
    rows = []
    try:
        conns = {t: _connect(endpoint, t, layout, bench.chunk_kib) for t in bench.transports}
        for tokens in bench.tokens:
            g = torch.Generator().manual_seed(tokens)
            kv = torch.randn(layout.num_layers, 2, tokens, layout.num_kv_heads, layout.head_dim,
                             generator=g).to(layout.torch_dtype)
            nbytes = kv.numel() * kv.element_size()
            row = {"tokens": tokens, "mib": nbytes / 2**20, "memcpy_gbps": _memcpy_gbps(nbytes, bench.repeats)}
            for transport, conn in conns.items():
                best = float("inf")
                for rep in range(bench.repeats):
                    rid = f"{transport}-{tokens}-{rep}"
                    table = receiver.reserve(rid, tokens)
                    start = time.perf_counter()
                    handle = conn.begin(rid, table, tokens)
                    for layer in range(layout.num_layers):
                        conn.write_layer(handle, layer, kv[layer, 0], kv[layer, 1])
                    conn.finish(handle, timeout=300)
                    best = min(best, time.perf_counter() - start)
                    complete, digest = receiver.digest(rid, tokens, transport)
                    if not complete or digest != _digest(kv):
                        raise RuntimeError(f"{transport} delivered {tokens} tokens incompletely or not bit-exact")
                row[f"{transport}_gbps"] = nbytes / best / 1e9
                row[f"{transport}_vs_memcpy"] = row[f"{transport}_gbps"] / row["memcpy_gbps"]
            rows.append(row)
            print_fn(_row_text(row, bench.transports))
        for conn in conns.values():
            conn.close()
    finally:
        receiver.stop()
    return {"dtype": bench.dtype, "rows": rows}


def _row_text(row: dict, transports) -> str:
    parts = [f"{row['tokens']:>6} tokens {row['mib']:8.1f} MiB | memcpy {row['memcpy_gbps']:6.2f} GB/s"]
    for t in transports:
        parts.append(f"{t} {row[f'{t}_gbps']:6.2f} GB/s ({row[f'{t}_vs_memcpy']:.2f}x memcpy)")
    return " | ".join(parts)


def last_line(report: dict, transports) -> str:
    """`kvtransfer <transport>_gbps=<x> <transport>_vs_memcpy=<y> ...` at the largest size."""
    row = report["rows"][-1]
    fields = [f"tokens={row['tokens']}"]
    for t in transports:
        fields += [f"{t}_gbps={row[f'{t}_gbps']:.2f}", f"{t}_vs_memcpy={row[f'{t}_vs_memcpy']:.2f}"]
    return "kvtransfer " + " ".join(fields)
