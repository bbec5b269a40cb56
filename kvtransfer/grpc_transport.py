"""gRPC transport (any two nodes): one client stream per request, layers sent as computed.

Client: `write_layer` hands the layer's tensors to a bounded queue and returns
at once; gRPC's sending thread encodes chunks from it while prefill computes
the next layer. The bound is the flow control: a slow receiver stalls prefill
instead of growing memory. Server: every chunk is checked and written into
the reserved blocks through the decode worker's `KVInbox`.
"""

from __future__ import annotations

import queue
import time
from concurrent import futures

import grpc
import torch

from engine.compute_thread import single_threaded
from engine.kv_cache import KVLayout, rows_nbytes
from kvtransfer.base import (
    IncompatiblePeer,
    IntegrityError,
    KVConnection,
    KVEndpoint,
    TransferError,
    TransferHandle,
    TransferStats,
    TransferTimeout,
    Unauthenticated,
)
from kvtransfer.inbox import KVInbox
from kvtransfer.wire import DEFAULT_MAX_CHUNK_BYTES, decode_rows, encode_frames, parse_frame
from proto import kv_transfer_pb2 as pb
from proto import kv_transfer_pb2_grpc as pb_grpc
from proto.kinds import Transport
from proto.messages import TLSFiles

AUTH_HEADER = "x-pdserve-token"
_MAX_MESSAGE = 64 << 20
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE),
                    ("grpc.max_receive_message_length", _MAX_MESSAGE)]
_QUEUED_LAYERS = 8  # per request: layers waiting to be encoded and sent


_SERVICE = "pdserve.kv.KVTransfer"
_PUSH_KV = f"/{_SERVICE}/PushKV"


def _add_servicer(servicer: pb_grpc.KVTransferServicer, server: grpc.Server) -> None:
    """As the generated add_KVTransferServicer_to_server, but PushKV's chunks arrive as `Frame`s:
    the payload stays in the received bytes instead of being copied into a message."""
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            servicer.Handshake, request_deserializer=pb.HandshakeRequest.FromString,
            response_serializer=pb.HandshakeReply.SerializeToString),
        "PushKV": grpc.stream_unary_rpc_method_handler(
            servicer.PushKV, request_deserializer=parse_frame, response_serializer=pb.PushReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)


_LAYOUT_FIELDS = ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype", "kv_cache_dtype")


def layout_spec(layout: KVLayout) -> pb.KVLayoutSpec:
    layers = [pb.LayerKVSpec(num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, window=s.window or 0)
              for s in layout.layers]
    return pb.KVLayoutSpec(num_layers=layout.num_layers, block_size=layout.block_size,
                           num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype,
                           kv_cache_dtype=layout.kv_cache_dtype, layers=layers)


def _spec_value(spec: pb.KVLayoutSpec, name: str) -> object:
    """A field of a peer's layout; a peer from before kv_cache_dtype existed sends "" and stores `auto`."""
    value = getattr(spec, name)
    return (value or "auto") if name == "kv_cache_dtype" else value


def _spec_layers(spec: pb.KVLayoutSpec) -> list[tuple[int, int, int]]:
    """(KV heads, head dim, window or 0) per layer; a peer that sends none has every layer alike, unwindowed."""
    if spec.layers:
        return [(s.num_kv_heads, s.head_dim, s.window) for s in spec.layers]
    return [(spec.num_kv_heads, spec.head_dim, 0)] * spec.num_layers


def layout_problems(mine: pb.KVLayoutSpec, theirs: pb.KVLayoutSpec) -> list[str]:
    """What differs between two peers' layouts, field by field, then layer by layer."""
    problems = [f"{f}: {_spec_value(mine, f)} != {_spec_value(theirs, f)}"
                for f in _LAYOUT_FIELDS if _spec_value(mine, f) != _spec_value(theirs, f)]
    if not problems:
        names = ("num_kv_heads", "head_dim", "window")
        problems = [f"layer {i}: " + ", ".join(f"{n} {x} != {y}" for n, x, y in zip(names, a, b) if x != y)
                    for i, (a, b) in enumerate(zip(_spec_layers(mine), _spec_layers(theirs))) if a != b]
    return problems


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, inbox: KVInbox, receiver_id: str, model_fingerprint: str, auth_token: str) -> None:
        self.inbox, self.receiver_id = inbox, receiver_id
        self.model_fingerprint, self.auth_token = model_fingerprint, auth_token

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        if dict(context.invocation_metadata()).get(AUTH_HEADER) != self.auth_token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeReply:
        self._authenticate(context)
        problems = layout_problems(layout_spec(self.inbox.layout), request.layout)
        if request.model_fingerprint != self.model_fingerprint:
            problems.append(f"model: {self.model_fingerprint} != {request.model_fingerprint}")
        return pb.HandshakeReply(ok=not problems, reason="; ".join(problems), receiver_id=self.receiver_id)

    def PushKV(self, request_iterator, context: grpc.ServicerContext) -> pb.PushReply:
        self._authenticate(context)
        request_id, chunks, nbytes = "", 0, 0
        try:
            for frame in request_iterator:  # Frames: see parse_frame
                chunk = frame.header
                request_id = chunk.request_id
                rows = decode_rows(chunk, self.inbox.layout, frame.data)
                nbytes += self.inbox.accept(chunk.request_id, chunk.layer, chunk.block_start, chunk.num_blocks, *rows)
                chunks += 1
        except IntegrityError as e:
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))
        return pb.PushReply(request_id=request_id, chunks=chunks, bytes=nbytes,
                            complete=bool(request_id) and self.inbox.is_complete(request_id))


class KVServer:
    """The decode worker's gRPC endpoint; binds to `host` (the node's own address), TLS when `tls` is given."""

    def __init__(self, inbox: KVInbox, *, receiver_id: str, model_fingerprint: str, auth_token: str,
                 host: str = "127.0.0.1", port: int = 0, max_workers: int = 16, tls: TLSFiles | None = None) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_CHANNEL_OPTIONS)
        _add_servicer(_Servicer(inbox, receiver_id, model_fingerprint, auth_token), self._server)
        self.tls = tls is not None
        if tls is not None:
            cert, key, _ = tls.read()
            bound = self._server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(key, cert)]))
        else:
            bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind the KV server to {host}:{port}")
        self.address = f"{host}:{bound}"
        self._server.start()

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()


class _Stream:
    """One request's client stream: a bounded queue of layers and the call consuming it."""

    def __init__(self, stub, metadata: list[tuple[str, str]], handle: TransferHandle,
                 block_size: int, max_chunk_bytes: int, timeout: float) -> None:
        self.layers: queue.Queue = queue.Queue(maxsize=_QUEUED_LAYERS)
        self.bytes = 0
        self.busy_s = 0.0  # encoding + handing chunks to gRPC; the wait for the next layer is not counted
        self.drained = 0.0  # perf_counter when the last chunk was handed to gRPC

        def chunks():
            single_threaded()  # gRPC's sending thread
            while True:
                item = self.layers.get()
                if item is None:
                    self.drained = time.perf_counter()
                    return
                started = time.perf_counter()
                layer, (k, v, k_scale, v_scale), copied = item
                if copied is not None:  # a GPU layer staged on a side stream: wait for its copy only
                    copied.synchronize()
                yield from encode_frames(handle.request_id, layer, k, v, block_size, max_chunk_bytes,
                                         handle.first_block, k_scale, v_scale)
                self.busy_s += time.perf_counter() - started

        self.call = stub(chunks(), metadata=metadata, timeout=timeout)


class GrpcConnection(KVConnection):
    transport = Transport.GRPC

    def __init__(self, endpoint: KVEndpoint, *, sender_id: str, auth_token: str, sender_layout: KVLayout,
                 model_fingerprint: str, timeout: float, tls: TLSFiles | None = None,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> None:
        if not endpoint.grpc_address:
            raise ValueError(f"decode worker {endpoint.worker_id} exposes no gRPC address")
        self.endpoint = endpoint
        self.block_size = sender_layout.block_size
        self.max_chunk_bytes = max_chunk_bytes
        self.timeout = timeout
        self._metadata = [(AUTH_HEADER, auth_token)]
        if endpoint.grpc_tls:
            if tls is None:
                raise Unauthenticated(f"decode worker {endpoint.worker_id} requires TLS; no CA configured")
            creds = grpc.ssl_channel_credentials(root_certificates=tls.read()[2])
            self._channel = grpc.secure_channel(endpoint.grpc_address, creds, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(endpoint.grpc_address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.KVTransferStub(self._channel)
        self._push = self._channel.stream_unary(_PUSH_KV, request_serializer=None,  # frames are serialized already
                                                response_deserializer=pb.PushReply.FromString).future
        self._streams: dict[str, _Stream] = {}
        self._copy_stream = None  # CUDA: the side stream that stages layers into pinned host memory
        try:
            reply = self._stub.Handshake(
                pb.HandshakeRequest(sender_id=sender_id, model_fingerprint=model_fingerprint,
                                    layout=layout_spec(sender_layout)),
                metadata=self._metadata, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            self._channel.close()
            raise _typed(e, f"handshake with {endpoint.worker_id} at {endpoint.grpc_address}") from e
        if not reply.ok:
            self._channel.close()
            raise IncompatiblePeer(f"decode worker {endpoint.worker_id} refused {sender_id}: {reply.reason}")

    def begin(self, request_id: str, block_table: list[int], num_tokens: int,
              first_block: int = 0) -> TransferHandle:
        handle = TransferHandle(request_id, tuple(block_table), num_tokens, time.time(), first_block)
        self._streams[request_id] = _Stream(self._push, self._metadata, handle, self.block_size,
                                            self.max_chunk_bytes, self.timeout)
        return handle

    def write_layer(self, handle: TransferHandle, layer: int, k: torch.Tensor, v: torch.Tensor,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        stream = self._streams[handle.request_id]
        deadline = handle.started + self.timeout
        item = (layer, *self._to_host(k, v, k_scale, v_scale))
        while True:
            if stream.call.done():  # the receiver ended the call early: surface its error now
                self._raise_from(stream, handle)
            try:
                stream.layers.put(item, timeout=min(0.5, max(deadline - time.time(), 0.001)))
                break
            except queue.Full as full:
                if time.time() > deadline:
                    self.abort(handle)
                    raise TransferTimeout(
                        f"KV of request {handle.request_id} stalled past {self.timeout:.0f}s") from full
        stream.bytes += rows_nbytes(k, v, k_scale, v_scale)

    def _to_host(self, *rows: torch.Tensor | None) -> tuple[tuple[torch.Tensor | None, ...], object]:
        """(k, v, k_scale, v_scale) on the host. CPU tensors as they are. GPU tensors: copied into pinned
        buffers on a side stream that waits for the layer's compute, so prefill goes on while the copy
        runs; the sender waits on the event."""
        if not rows[0].is_cuda:
            return rows, None
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=rows[0].device)
        side = self._copy_stream
        side.wait_stream(torch.cuda.current_stream(rows[0].device))
        with torch.cuda.stream(side):
            host = tuple(None if t is None else
                         torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in rows)
            copied = torch.cuda.Event()
            copied.record(side)
        for t in rows:
            if t is not None:
                t.record_stream(side)  # the allocator must not reuse them before the copy has read them
        return host, copied

    def finish(self, handle: TransferHandle, timeout: float) -> TransferStats:
        stream = self._streams.pop(handle.request_id)
        try:
            stream.layers.put(None, timeout=timeout)
            reply = stream.call.result(timeout=timeout)
        except queue.Full as e:
            stream.call.cancel()
            raise TransferTimeout(f"KV of request {handle.request_id} stalled past {timeout:.0f}s") from e
        except grpc.FutureTimeoutError as e:
            stream.call.cancel()
            raise TransferTimeout(f"KV of request {handle.request_id} not acknowledged within {timeout:.0f}s") from e
        except grpc.RpcError as e:
            raise _typed(e, f"KV of request {handle.request_id}") from e
        if not reply.complete:
            raise TransferError(f"decode worker {self.endpoint.worker_id} holds only part of the KV of "
                                f"request {handle.request_id}")
        # Waiting for the receiver to take the last chunks and acknowledge is part of moving the bytes.
        busy = stream.busy_s + max(0.0, time.perf_counter() - stream.drained)
        return TransferStats(handle.request_id, self.transport, stream.bytes, handle.started, time.time(), busy)

    def _raise_from(self, stream: _Stream, handle: TransferHandle) -> None:
        self._streams.pop(handle.request_id, None)
        try:
            stream.call.result(timeout=0)
        except grpc.RpcError as e:
            raise _typed(e, f"KV of request {handle.request_id}") from e
        raise TransferError(f"decode worker ended the KV stream of request {handle.request_id} early")

    def abort(self, handle: TransferHandle) -> None:
        stream = self._streams.pop(handle.request_id, None)
        if stream is not None:
            stream.call.cancel()

    def close(self) -> None:
        for stream in self._streams.values():
            stream.call.cancel()
        self._streams.clear()
        self._channel.close()


def _typed(error: grpc.RpcError, what: str) -> TransferError:
    code = error.code() if hasattr(error, "code") else None
    detail = error.details() if hasattr(error, "details") else str(error)
    message = f"{what}: {detail}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(message)
    if code in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT):
        return IntegrityError(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TransferTimeout(message)
    return TransferError(f"{message} ({code.name if code else 'unknown'})")


def open_connection(endpoint: KVEndpoint, **kwargs) -> GrpcConnection:
    return GrpcConnection(endpoint, **kwargs)
