"""Start-up cuts keep their promises: the background prefault of a fresh shared pool changes nothing."""

from __future__ import annotations

import threading
import time

import torch

from engine.kv_cache import KVLayout
from kvtransfer.shm import SharedKVPool


def test_background_prefault_keeps_what_is_written_meanwhile():
    layout = KVLayout(num_layers=4, num_blocks=2048, block_size=16, num_kv_heads=3, head_dim=64, dtype="float32")
    shared = SharedKVPool(layout)  # 192 MiB: three prefault chunks
    try:
        data = torch.randn(layout.shape[1:], generator=torch.Generator().manual_seed(0))
        shared.pool.tensor[0].copy_(data)  # a transfer writing while pages are still being faulted in
        shared.pool.tensor[-1].copy_(data)
        deadline = time.time() + 60
        while any(t.name == "kv-prefault" for t in threading.enumerate()) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(t.name == "kv-prefault" for t in threading.enumerate()), "prefault never finished"
        assert torch.equal(shared.pool.tensor[0], data) and torch.equal(shared.pool.tensor[-1], data)
        assert shared.pool.tensor[1:-1].count_nonzero().item() == 0  # a fresh pool reads as zeros
    finally:
        shared.close()


def test_driver_does_not_import_torch(default_model_dir):
    """run-batch's driver loads torch (~1-2 s) only to declare the actors, on a thread while Ray starts
    (cluster.prefetch_actors): the CLI, configs, tokenizer, router and cluster modules import none of it."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; import pdserve.cli; import pdserve.batch.run; "
            "from pdserve.openai.limits import model_limits; import pdserve.runtime.cluster; "
            "from engine.config import EngineConfig; "
            f"model_limits(EngineConfig(model={str(default_model_dir)!r}, dtype='float32'), 16, False); "
            "print(sorted(m for m in ('torch', 'transformers', 'prefill_worker.worker', 'decode_worker.worker', "
            "'decode_worker.colocated') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
