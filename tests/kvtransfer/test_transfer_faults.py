"""KV transfer under failure: receivers that die or stall, TLS, CUDA IPC, and layer-streaming overlap."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from engine.kv_cache import KVLayout
from kvtransfer.base import TransferError, TransferTimeout, Unauthenticated, connect, select_transport
from kvtransfer.grpc_transport import GrpcConnection, KVServer
from pdserve.bench.kvtransfer import TOKEN, ReceiverProcess
from proto import kv_transfer_pb2 as pb
from proto import kv_transfer_pb2_grpc as pb_grpc
from proto.messages import TLSFiles
from tests.kvtransfer.test_transport import FINGERPRINT, Receiver, random_kv, send, smollm_layout


def test_receiver_killed_mid_transfer_gives_a_typed_error_within_the_deadline():
    layout = smollm_layout(num_blocks=4096)
    receiver = ReceiverProcess(layout, fingerprint=FINGERPRINT)
    conn = connect(receiver.endpoint, "grpc", sender_id="p", auth_token=TOKEN, sender_layout=layout,
                   model_fingerprint=FINGERPRINT, timeout=10)
    tokens = 8000
    table = receiver.reserve("r", tokens)
    kv = random_kv(layout, tokens)
    handle = conn.begin("r", table, tokens)
    start = time.time()
    with pytest.raises(TransferError) as err:
        for layer in range(layout.num_layers):
            conn.write_layer(handle, layer, kv[layer, 0], kv[layer, 1])
            if layer == 5:
                receiver.kill()  # the decode process dies with half the cache sent
        conn.finish(handle, timeout=10)
    assert time.time() - start < 15, "the failure must surface within the transfer deadline"
    assert isinstance(err.value, TransferError)
    conn.close()


class _Stalled(pb_grpc.KVTransferServicer):
    """A receiver that accepts the stream and never reads it."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Handshake(self, request, context):
        return pb.HandshakeReply(ok=True, receiver_id="stalled")

    def PushKV(self, request_iterator, context):
        self.release.wait(30)
        return pb.PushReply()


def test_stalled_receiver_hits_the_deadline_instead_of_hanging():
    servicer = _Stalled()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    layout = smollm_layout(num_blocks=4096, dtype="float32")
    from kvtransfer.base import KVEndpoint

    endpoint = KVEndpoint("stalled", "n", layout, FINGERPRINT, grpc_address=f"127.0.0.1:{port}")
    conn = GrpcConnection(endpoint, sender_id="p", auth_token=TOKEN, sender_layout=layout,
                          model_fingerprint=FINGERPRINT, timeout=3)
    kv = random_kv(layout, 4000)  # 92 MB: far more than gRPC's flow-control window
    start = time.time()
    with pytest.raises(TransferTimeout):
        send(conn, "r", list(range(250)), kv)
    elapsed = time.time() - start
    assert elapsed < 8, f"took {elapsed:.1f}s for a 3s deadline"
    servicer.release.set()
    conn.close()
    server.stop(0)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> TLSFiles:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return TLSFiles(str(d / "cert.pem"), str(d / "key.pem"), str(d / "cert.pem"))


def test_tls_endpoint_round_trip_and_refuses_plaintext(tls_files):
    layout = smollm_layout(num_blocks=64)
    receiver = Receiver(layout)
    receiver.server.stop()
    receiver.server = KVServer(receiver.inbox, receiver_id="decode-tls", model_fingerprint=FINGERPRINT,
                               auth_token="secret-token", host="127.0.0.1", tls=tls_files)
    from dataclasses import replace

    endpoint = replace(receiver.endpoint, grpc_address=receiver.server.address, grpc_tls=True)
    try:
        conn = connect(endpoint, "grpc", sender_id="p", auth_token="secret-token", sender_layout=layout,
                       model_fingerprint=FINGERPRINT, tls=tls_files)
        table = receiver.reserve("t", 100)
        kv = random_kv(layout, 100)
        send(conn, "t", table, kv)
        assert torch.equal(receiver.read(table, 100), kv)
        conn.close()
        with pytest.raises(Unauthenticated):  # a client without the CA cannot talk to a TLS endpoint
            connect(endpoint, "grpc", sender_id="p", auth_token="secret-token", sender_layout=layout,
                    model_fingerprint=FINGERPRINT)
        plain = replace(endpoint, grpc_tls=False)
        with pytest.raises(TransferError):  # plaintext against a TLS port fails, it does not hang
            GrpcConnection(plain, sender_id="p", auth_token="secret-token", sender_layout=layout,
                           model_fingerprint=FINGERPRINT, timeout=3)
    finally:
        receiver.inbox.forget("t")
        receiver.close()


def test_transport_selection_by_placement():
    from kvtransfer.base import KVEndpoint

    layout = smollm_layout(num_blocks=4)
    cpu = KVEndpoint("d", "node-a", layout, "m", grpc_address="127.0.0.1:1", shm_name="pdserve-kv-x")
    gpu = KVEndpoint("d", "node-a", layout, "m", grpc_address="127.0.0.1:1", cuda_ipc=b"handle")
    assert select_transport("auto", "node-a", cpu) == "shm"
    assert select_transport("auto", "node-b", cpu) == "grpc"
    assert select_transport("auto", "node-a", gpu) == "cuda_ipc"
    assert select_transport("auto", "node-b", gpu) == "grpc"
    assert select_transport("grpc", "node-a", cpu) == "grpc"
    with pytest.raises(ValueError):
        select_transport("carrier-pigeon", "node-a", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA GPU; this machine has none")
def test_cuda_ipc_round_trip_is_bit_exact():
    import torch.multiprocessing as tmp

    from engine.kv_cache import KVPool
    from kvtransfer.base import KVEndpoint
    from kvtransfer.cuda_ipc import export_pool

    layout = KVLayout(4, 64, 16, 2, 64, "bfloat16")
    pool = KVPool.allocate(layout, "cuda")
    endpoint = KVEndpoint("d", "n", layout, "m", cuda_ipc=export_pool(pool))
    kv = torch.randn(4, 2, 100, 2, 64, device="cuda").to(torch.bfloat16)
    table = list(range(10, 17))
    ctx = tmp.get_context("spawn")
    proc = ctx.Process(target=_cuda_sender, args=(endpoint, table, kv.cpu()))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    bs = layout.block_size
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(100)], device="cuda")
    got = pool.tensor.flatten(2, 3).index_select(2, slots)
    assert torch.equal(got, kv)


def _cuda_sender(endpoint, table, kv):
    conn = connect(endpoint, "cuda_ipc", sender_id="p", auth_token="", sender_layout=endpoint.layout,
                   model_fingerprint="m")
    handle = conn.begin("r", table, kv.shape[2])
    for layer in range(kv.shape[0]):
        conn.write_layer(handle, layer, kv[layer, 0].cuda(), kv[layer, 1].cuda())
    conn.finish(handle, timeout=30)


def test_layer_streaming_overlaps_prefill(default_model_dir, tokenizer, capsys):
    """Prefill a long prompt sending KV over gRPC as layers finish: once prefill ends, little transfer is left."""
    from engine.config import EngineConfig, SamplingParams
    from engine.runner import model_fingerprint
    from prefill_worker.worker import PrefillWorker
    from proto.messages import PrefillTask, WorkerConfig

    engine = EngineConfig(dtype="float32", device="cpu", num_threads=2)
    worker = PrefillWorker(WorkerConfig(engine=engine, worker_id="prefill-test", auth_token=TOKEN,
                                        transport="grpc", transfer_timeout_s=120))
    layout = worker.runner.kv_layout(num_blocks=600)
    receiver = ReceiverProcess(layout, fingerprint=model_fingerprint(worker.runner.folder))
    try:
        text = " ".join(["The quick brown fox jumps over the lazy dog near the quiet river bank."] * 400)
        prompt = tokenizer(text)["input_ids"][:3000]
        table = receiver.reserve("long", len(prompt))
        task = PrefillTask("long", tuple(prompt), SamplingParams(temperature=0, max_tokens=1), receiver.endpoint,
                           tuple(table))
        [res] = worker.prefill([task])
        assert res.error is None and res.transport == "grpc"
        complete, _ = receiver.digest("long", len(prompt), "grpc")
        assert complete
        tail = res.transfer_end - res.prefill_end
        # The same cache sent whole after the fact, for comparison.
        conn = worker.connection(receiver.endpoint)
        kv = torch.randn(layout.num_layers, 2, len(prompt), layout.num_kv_heads, layout.head_dim)
        table2 = receiver.reserve("whole", len(prompt))
        stats = send(conn, "whole", table2, kv)
        receiver.digest("whole", len(prompt), "grpc")
        whole = stats.seconds
        with capsys.disabled():
            print(f"\n3000-token prompt: prefill {res.prefill_end - res.prefill_start:.2f}s, transfer left after "
                  f"prefill {tail:.3f}s = {tail / whole:.1%} of a whole-cache transfer ({whole:.2f}s, "
                  f"{stats.gbps:.2f} GB/s)")
        assert tail < 0.5 * whole
    finally:
        worker.shutdown()
        receiver.stop()
